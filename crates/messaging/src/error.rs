//! The crate's error type.

use orderflow_store::StoreError;

/// What can go wrong in the messaging layer, by cause.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    /// The NATS connection could not be set up or was not ready in time.
    #[error("NATS connection: {0}")]
    Connect(String),
    /// A JetStream API call failed (stream/consumer management, publish ack, fetch).
    #[error("JetStream {operation}: {message}")]
    JetStream {
        /// What we were doing.
        operation: &'static str,
        /// The client's error, rendered.
        message: String,
    },
    /// A stream or consumer on the server differs from its declaration in a way that cannot
    /// be updated in place.
    #[error("{kind} {name} differs from its declaration and cannot be updated: {details}")]
    Drift {
        /// `stream` or `consumer`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Which settings differ.
        details: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl MessagingError {
    pub(crate) fn js(operation: &'static str, err: impl std::fmt::Display) -> Self {
        Self::JetStream {
            operation,
            message: err.to_string(),
        }
    }
}
