//! What kind of failure an error is. Every crate's error enum answers
//! `code()` with one of these, and gRPC and HTTP statuses derive from it
//! here, in one place (docs/ARCHITECTURE.md, "Errors").

/// The kind of a failure, as a caller needs to act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed; the message says how. Do not retry as is.
    Invalid,
    /// A named thing does not exist.
    NotFound,
    /// A thing that must be unique exists already.
    Conflict,
    /// Refused by policy (the SSRF guard, a blocked domain).
    Refused,
    /// A backend or remote cannot serve now; retrying later may succeed.
    Unavailable,
    /// A fault of ours; details are logged, never sent.
    Internal,
}

impl ErrorCode {
    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            ErrorCode::Invalid => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::Conflict => tonic::Code::AlreadyExists,
            ErrorCode::Refused => tonic::Code::PermissionDenied,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status code.
    pub fn http(self) -> u16 {
        match self {
            ErrorCode::Invalid => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Refused => 403,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// The gRPC status for an error of this kind with `message`. An
    /// internal error's message stays in the logs: the caller gets
    /// "internal error"; an unavailable backend's is replaced by advice.
    pub fn status(self, message: impl std::fmt::Display) -> tonic::Status {
        match self {
            ErrorCode::Internal => tonic::Status::internal("internal error"),
            ErrorCode::Unavailable => tonic::Status::unavailable(
                "a backend cannot take the request now; retry (a publish with the same idempotency key)",
            ),
            code => tonic::Status::new(code.grpc(), message.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn internal_details_are_not_sent() {
        let s = ErrorCode::Internal.status("password=hunter2 in the connection string");
        assert_eq!(s.code(), tonic::Code::Internal);
        assert_eq!(s.message(), "internal error");
        let s = ErrorCode::Conflict.status("actor `alice` exists already");
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        assert_eq!(s.message(), "actor `alice` exists already");
        assert_eq!(ErrorCode::Unavailable.http(), 503);
    }
}
