use stampede_proto::ErrorCode;
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
    /// A failure of the runtime, the federation logic or a backend: its
    /// code says what kind.
    #[error(transparent)]
    Runtime(#[from] stampede_runtime::Error),
}

impl IngestError {
    /// What kind of failure this is (docs/ARCHITECTURE.md, "Errors").
    pub fn code(&self) -> ErrorCode {
        match self {
            IngestError::Invalid(_) => ErrorCode::Invalid,
            IngestError::NotFound(_) => ErrorCode::NotFound,
            IngestError::Runtime(e) => e.code(),
        }
    }
}

impl From<IngestError> for Status {
    /// Ingest's errors as gRPC statuses, by their code. What the caller is
    /// not told (an internal fault, which backend is down) is logged here.
    fn from(e: IngestError) -> Self {
        let code = e.code();
        match code {
            ErrorCode::Internal => tracing::error!(error = %e, "internal error"),
            ErrorCode::Unavailable => tracing::warn!(error = %e, "backend unavailable"),
            _ => {}
        }
        code.status(e)
    }
}

/// The HTTP status of a failed backend call on ingest's HTTP side, by its
/// code (the same map as the gRPC statuses), with the failure logged: what
/// the remote server is told is only whether to come back later.
pub(crate) fn http_status(what: &str, e: &stampede_backends::Error) -> axum::http::StatusCode {
    let code = e.code();
    match code {
        ErrorCode::Internal => tracing::error!(error = %e, what, "internal error"),
        _ => tracing::warn!(error = %e, what, "backend failed"),
    }
    axum::http::StatusCode::from_u16(code.http())
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
}

impl From<stampede_backends::Error> for IngestError {
    fn from(e: stampede_backends::Error) -> Self {
        IngestError::Runtime(e.into())
    }
}

impl From<stampede_core::CoreError> for IngestError {
    fn from(e: stampede_core::CoreError) -> Self {
        IngestError::Invalid(e.to_string())
    }
}
