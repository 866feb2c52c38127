use stampede_proto::ErrorCode;
use thiserror::Error;

/// Errors of the backends.
#[derive(Debug, Error)]
pub enum Error {
    /// A backend's configuration (URL, data directory) is unusable; start-up
    /// stops.
    #[error("{var}: {reason}")]
    Config {
        /// The environment variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed.
    #[error("database: {0}")]
    Db(String),
    /// The broker failed or refused a message.
    #[error("queue: {0}")]
    Queue(String),
    /// The cache failed.
    #[error("cache: {0}")]
    Cache(String),
    /// A row that must be unique already exists.
    #[error("{0}")]
    Conflict(String),
    /// A file of the embedded backends failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// What kind of failure this is (docs/ARCHITECTURE.md, "Errors").
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Config { .. } | Error::Io(_) => ErrorCode::Internal,
            Error::Db(_) | Error::Queue(_) | Error::Cache(_) => ErrorCode::Unavailable,
            Error::Conflict(_) => ErrorCode::Conflict,
        }
    }
}

/// Result with the backends' error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION {
                return Error::Conflict(db.message().to_string());
            }
            return Error::Db(db.message().to_string());
        }
        // "error connecting to server" says little: the cause (refused,
        // too many clients) is its source.
        match std::error::Error::source(&e) {
            Some(cause) => Error::Db(format!("{e}: {cause}")),
            None => Error::Db(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            // The server's own words ("sorry, too many clients already"),
            // not the pool's "db error".
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Error::Db(other.to_string()),
        }
    }
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Queue(e.to_string())
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Cache(e.to_string())
    }
}
