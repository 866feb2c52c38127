//! Library: the backends stampede runs on, behind three small traits the
//! services are written against (docs/ARCHITECTURE.md, "Backends"):
//!
//! - [`queue::Queue`]: RabbitMQ ([`queue::amqp`]) or a SQLite file
//!   ([`queue::embedded`]);
//! - [`store::Store`]: PostgreSQL ([`store::postgres`]) or a SQLite file
//!   ([`store::embedded`]);
//! - [`cache::Cache`]: Redis ([`cache::redis`]) or process memory
//!   ([`cache::memory`]).
//!
//! Both implementations of each trait pass one contract suite
//! (`tests/contract/`). The embedded ones share the SQLite engine in
//! [`sqlite`]. Depends on the protocol core and the generated messages only.

pub mod cache;
pub mod clock;
mod error;
pub mod queue;
pub mod sqlite;
pub mod store;
pub mod trace;

pub use error::{Error, Result};
