//! Library: what every stampede service runs on. Configuration from the
//! environment, telemetry, metrics and health endpoints, shutdown, the small
//! backend traits the services are written against (queue, cache, store) with
//! their RabbitMQ/Redis/PostgreSQL and embedded (SQLite, in-memory) implementations, the SSRF-guarded HTTP
//! client and the RSA signing pool.

pub mod amqp;
pub mod backends;
pub mod cache;
pub mod config;
pub mod embedded_queue;
pub mod embedded_store;
mod error;
pub mod grpc;
pub mod hosts;
pub mod http;
pub mod inbound;
pub mod keys;
pub mod memory_cache;
pub mod metrics;
pub mod outbound;
pub mod parked;
pub mod postgres;
pub mod process;
pub mod queue;
pub mod redis_cache;
pub mod remote;
pub mod shutdown;
pub mod signer;
pub mod sqlite;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use backends::Backends;
pub use config::Config;
pub use error::{Error, Result};
