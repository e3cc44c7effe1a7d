//! The storage crate's error type.
use std::{io, path::PathBuf};

/// What can go wrong in the log or the metadata store. Each variant names the file,
/// position or topic involved so that an operator can act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The operating system refused an operation on a file or directory.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Data on disk is damaged somewhere other than a torn tail; rill refuses to skip it.
    #[error("corrupt log segment {path} at byte {position}: {reason}")]
    Corruption {
        /// The segment file.
        path: PathBuf,
        /// Byte position of the damaged frame in that file.
        position: u64,
        /// What check failed.
        reason: String,
    },
    /// A batch or message exceeds a configured size limit.
    #[error("{what} of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// A message breaks a rule of the log (for example the reserved seq `u64::MAX`).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Meta(String),
    /// Metadata could not be decoded.
    #[error("metadata record {key} is unreadable: {reason}")]
    MetaCorrupt {
        /// The key of the record.
        key: String,
        /// Why decoding failed.
        reason: String,
    },
    /// The topic could not be opened at start-up (for example a corrupt segment); the rest
    /// of the node keeps serving.
    #[error("topic {topic} is unavailable: {reason}")]
    Unavailable {
        /// The topic.
        topic: String,
        /// Why it could not be opened.
        reason: String,
    },
    /// A message's id is held with a different content (a digest of key, headers and
    /// payload): the producer broke its promise that an id names one message. Nothing of
    /// the request was stored.
    #[error(
        "message {id} conflicts with the message stored under that id at offset {offset} (same id, different content); nothing of the request was stored"
    )]
    Conflict {
        /// The id, as `producer:seq` or `producer@epoch:seq`.
        id: String,
        /// Where the first content is stored.
        offset: u64,
    },
    /// A message's id belongs to a producer session the node dropped after its namespace's
    /// dedup horizon, at or below the highest seq that session held: it may have been
    /// stored and deleted since. Nothing of the request was stored.
    #[error(
        "message {id} is expired: its producer session was idle past the namespace's dedup horizon and the node keeps only its highest seq; send new messages under a new seq or epoch (nothing of the request was stored)"
    )]
    Expired {
        /// The id.
        id: String,
    },
    /// A write or sync of the topic's log failed: nothing written since its last good sync
    /// is stored, and the next write first cuts the log back to that point.
    #[error("topic {topic}: a disk write failed ({reason}); nothing since the last sync was stored, retry")]
    Poisoned {
        /// The topic.
        topic: String,
        /// The error that poisoned it.
        reason: String,
        /// The disk (or a quota) was full.
        disk_full: bool,
    },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io { path: path.into(), source }
    }

    /// True when the error says the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => is_full(source.kind()),
            StorageError::Poisoned { disk_full, .. } => *disk_full,
            _ => false,
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// True for the error kinds of a full disk or quota.
pub(crate) fn is_full(kind: io::ErrorKind) -> bool {
    kind == io::ErrorKind::StorageFull || kind == io::ErrorKind::QuotaExceeded
}
