use stampede_proto::ErrorCode;
use thiserror::Error;

/// Errors of the runtime and of the federation logic built on it. Services
/// hand theirs down to this, and [`Error::code`] says what kind each is; gRPC
/// and HTTP statuses derive from that code in one place
/// ([`stampede_proto::ErrorCode`]).
#[derive(Debug, Error)]
pub enum Error {
    /// A configuration variable holds a bad value; start-up stops.
    #[error("{var}: {reason}")]
    Config {
        /// The environment variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A backend (queue, store, cache) failed.
    #[error(transparent)]
    Backend(#[from] stampede_backends::Error),
    /// The request is malformed; the reason says how.
    #[error("{0}")]
    Invalid(String),
    /// A named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A thing that must be unique exists already.
    #[error("{0}")]
    Conflict(String),
    /// An outbound request was refused by the SSRF guard.
    #[error("refused: {0}")]
    Refused(String),
    /// An outbound HTTP request failed.
    #[error("http: {0}")]
    Http(String),
    /// An outbound request could not be made because this process or
    /// machine ran out of something a connection needs (file descriptors,
    /// local ports, socket buffers, memory): not the remote's fault.
    #[error("out of local resources: {0}")]
    Exhausted(String),
    /// The protocol core refused something.
    #[error(transparent)]
    Core(#[from] stampede_core::CoreError),
    /// A listener or file failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A fault of ours that is none of the above (a worker thread gone, a
    /// key generation failed, a server that could not start).
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// What kind of failure this is (docs/ARCHITECTURE.md, "Errors").
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Backend(e) => e.code(),
            Error::Invalid(_) | Error::Core(_) => ErrorCode::Invalid,
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::Refused(_) => ErrorCode::Refused,
            Error::Http(_) | Error::Exhausted(_) => ErrorCode::Unavailable,
            Error::Config { .. } | Error::Io(_) | Error::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Result with the runtime's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_failures_keep_their_kind() {
        let conflict = Error::from(stampede_backends::Error::Conflict("name".into()));
        assert_eq!(conflict.code(), ErrorCode::Conflict);
        let queue = Error::from(stampede_backends::Error::Queue("nack".into()));
        assert_eq!(queue.code(), ErrorCode::Unavailable);
        assert_eq!(Error::Internal("keygen".into()).code(), ErrorCode::Internal);
        assert_eq!(Error::Invalid("bad".into()).code(), ErrorCode::Invalid);
    }
}
