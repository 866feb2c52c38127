use thiserror::Error;

/// Errors of the runtime and its backends.
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
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Db(String),
    /// The broker failed or refused a message.
    #[error("queue: {0}")]
    Queue(String),
    /// Redis failed.
    #[error("cache: {0}")]
    Cache(String),
    /// The request is malformed; the reason says how.
    #[error("{0}")]
    Invalid(String),
    /// A named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A row that must be unique already exists.
    #[error("already exists: {0}")]
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
}

/// Result with the runtime's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            if db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION {
                return Error::Conflict(db.message().to_string());
            }
            return Error::Db(db.message().to_string());
        }
        Error::Db(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::Db(e.to_string())
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
