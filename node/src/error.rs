//! The node's domain errors. Subsystems (the topic registry, dispatchers, replication,
//! retention) return these; only the client edge (`server.rs`, `consume.rs`) turns one
//! into a wire [`Response`], through `From`, so every error keeps its type until it leaves
//! the node and its wire code is chosen in one place.
use rill_storage::{NameError, StorageError};

use crate::protocol::{ErrorCode, Response};

/// Why the node could not do what a client asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeError {
    /// A topic, namespace, subscription or producer name is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Another invalid name (a producer id), with why.
    #[error("{0}")]
    InvalidName(String),
    /// No such subscription.
    #[error("{0}")]
    NotFound(String),
    /// The subscription refuses the consumer, or is in use.
    #[error("{0}")]
    SubscriptionBusy(String),
    /// The node or the part that would do the work is stopping.
    #[error("{0}")]
    ShuttingDown(&'static str),
    /// The namespace's backlog quota is full (`on_full = reject`).
    #[error("{0}")]
    BacklogFull(String),
    /// A message is larger than `message_bytes_max`.
    #[error("{0}")]
    TooLarge(String),
    /// A request breaks the protocol.
    #[error("{0}")]
    Malformed(String),
    /// A namespace edit was refused.
    #[error("{0}")]
    Namespace(String),
    /// The principal may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The log or the metadata store failed, or refused a write (conflict, expired id).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl NodeError {
    /// The wire code a client branches on.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            NodeError::Name(_) | NodeError::InvalidName(_) => ErrorCode::InvalidName,
            NodeError::NotFound(_) => ErrorCode::NotFound,
            NodeError::SubscriptionBusy(_) => ErrorCode::SubscriptionBusy,
            NodeError::ShuttingDown(_) => ErrorCode::ShuttingDown,
            NodeError::BacklogFull(_) => ErrorCode::BacklogFull,
            NodeError::TooLarge(_) => ErrorCode::TooLarge,
            NodeError::Malformed(_) => ErrorCode::Malformed,
            NodeError::Namespace(_) => ErrorCode::Namespace,
            NodeError::Forbidden(_) => ErrorCode::Forbidden,
            NodeError::Storage(StorageError::Conflict { .. }) => ErrorCode::Conflict,
            NodeError::Storage(StorageError::Expired { .. }) => ErrorCode::Expired,
            NodeError::Storage(e) if e.is_disk_full() => ErrorCode::DiskFull,
            NodeError::Storage(_) => ErrorCode::Storage,
        }
    }
}

impl From<NodeError> for Response {
    fn from(e: NodeError) -> Response {
        Response::Error { code: e.code(), message: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_refusals_keep_their_own_codes() {
        let conflict = StorageError::Conflict { id: "p:1".into(), offset: 3 };
        assert_eq!(NodeError::from(conflict).code(), ErrorCode::Conflict);
        let name = rill_storage::TopicName::parse("a/b").unwrap_err();
        let response = Response::from(NodeError::from(name));
        assert!(
            matches!(response, Response::Error { code: ErrorCode::InvalidName, message } if message.contains("a/b"))
        );
    }
}
