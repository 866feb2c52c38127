//! Library: the process platform every stampede service runs on
//! (docs/ARCHITECTURE.md, "Crates"): configuration from the environment,
//! telemetry, metrics and health endpoints, gRPC plumbing, the worker loop
//! that consumes a queue, the RSA signing pool, the SSRF-guarded outbound
//! HTTP client, shutdown, and [`Backends`], the queue, store and cache
//! chosen by configuration (implemented in `stampede-backends`).

pub mod backends;
pub mod config;
mod error;
pub mod grpc;
pub mod http_client;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod rates;
pub mod role;
pub mod shutdown;
pub mod signature_styles;
pub mod signer;
pub mod telemetry;
pub mod worker;

pub use backends::Backends;
pub use config::Config;
pub use error::{Error, Result};
pub use role::{Role, ServiceKind};
