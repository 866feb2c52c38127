use thiserror::Error;
use tonic::Status;

/// What ingest refuses or fails at.
#[derive(Debug, Error)]
pub enum IngestError {
    /// The request is malformed; the reason says how.
    #[error("{0}")]
    Invalid(String),
    /// A named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A unique thing exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The queue could not take the work; nothing was lost, the caller retries.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// A backend failed.
    #[error(transparent)]
    Runtime(#[from] stampede_runtime::Error),
}

impl From<IngestError> for Status {
    /// The one place ingest errors become gRPC statuses. Internal details are
    /// logged here, not sent.
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Invalid(m) => Status::invalid_argument(m),
            IngestError::NotFound(m) => Status::not_found(m),
            IngestError::AlreadyExists(m) => Status::already_exists(m),
            IngestError::Unavailable(m) => {
                tracing::warn!(error = %m, "queue unavailable");
                Status::unavailable(
                    "the queue cannot take the activity now; retry with the same idempotency key",
                )
            }
            IngestError::Runtime(stampede_runtime::Error::Conflict(m)) => Status::already_exists(m),
            IngestError::Runtime(e) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

impl From<stampede_core::CoreError> for IngestError {
    fn from(e: stampede_core::CoreError) -> Self {
        IngestError::Invalid(e.to_string())
    }
}
