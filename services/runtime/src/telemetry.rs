//! Structured logs with `tracing`: `RUST_LOG` filters (default `info`),
//! `STAMPEDE_LOG_FORMAT=json` switches to one JSON object per line.
use tracing_subscriber::EnvFilter;

/// The W3C `traceparent` of the current span, when traces are exported.
pub fn current_traceparent() -> Option<String> {
    None
}

/// Installs the global subscriber once; later calls do nothing.
pub fn init() {
    init_with_default("info,tokio_postgres=warn");
}

/// [`init`] with another filter when `RUST_LOG` is unset.
pub fn init_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("STAMPEDE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.compact().try_init()
    };
}
