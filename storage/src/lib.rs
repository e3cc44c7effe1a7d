//! rill-storage: the local durable log and the metadata beside it.
//!
//! The log is the source of truth: per-topic append-only segment files of CRC32C-framed
//! record batches ([`format`], [`segment`], [`log`]), appended under group commit
//! ([`topic`]), recovered after a crash by truncating a torn tail. Metadata (dedup sets,
//! subscription cursors, checkpoints) sits in a [`meta::MetaStore`] (sled in production) and
//! is derived state: it carries the log offset it covers and is rebuilt from the log tail.
//!
//! Architecture invariant: this crate knows nothing of peers, sockets or async runtimes.
//! All disk access goes through [`fs::FileSystem`] and [`meta::MetaStore`] so that a
//! simulated disk can replace the real one.

pub mod blobs;
pub mod dedup;
pub mod error;
pub mod format;
pub mod fs;
pub mod hex;
pub mod keys;
pub mod log;
pub mod message;
pub mod meta;
pub mod metalog;
pub mod name;
pub mod rangeset;
pub mod segment;
pub mod store;
pub mod subscription;
pub mod topic;

pub use error::StorageError;
pub use message::{Message, MessageId, ProducerId, StoredMessage};
pub use name::{NameError, NamespaceName, NodeName, TopicName};
