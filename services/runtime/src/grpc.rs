//! gRPC plumbing shared by every service: the standard health service with a
//! named service per stampede service that follows real readiness, server
//! reflection, and the API token check.
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::ServingStatus;

use crate::config::Secret;
use crate::Backends;

/// The standard health service; each name in `names` (e.g.
/// `stampede.ingest`) reports SERVING only while the backends answer.
pub fn health(
    names: Vec<String>,
    backends: Backends,
    shutdown: CancellationToken,
) -> HealthServer<impl Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        loop {
            let status = if shutdown.is_cancelled() {
                ServingStatus::NotServing
            } else {
                match backends.ready().await {
                    Ok(()) => ServingStatus::Serving,
                    Err(_) => ServingStatus::NotServing,
                }
            };
            for n in &names {
                reporter.set_service_status(n, status).await;
            }
            reporter.set_service_status("", status).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.cancelled() => {
                    for n in &names {
                        reporter.set_service_status(n, ServingStatus::NotServing).await;
                    }
                    return;
                }
            }
        }
    });
    service
}

/// Server reflection over stampede's schema and the health service.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(stampede_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
}

/// Checks every API call: with `STAMPEDE_API_TOKEN` set, a matching
/// `authorization: Bearer …`; without it, loopback peers only.
#[derive(Clone)]
pub struct Auth {
    token: Option<Secret>,
}

impl Auth {
    /// The check for `token`.
    pub fn new(token: Option<Secret>) -> Self {
        Self { token }
    }

    /// Whether a token is required (`STAMPEDE_API_TOKEN` set); without
    /// one only loopback peers are answered.
    pub fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `given` is the token, compared in constant time; false when
    /// none is set.
    pub fn token_matches(&self, given: &str) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| constant_time_eq(given.as_bytes(), t.expose().as_bytes()))
    }

    /// Whether a caller at `peer` is answered without a token.
    pub fn is_loopback(peer: Option<SocketAddr>) -> bool {
        match peer {
            Some(a) => a.ip().is_loopback(),
            None => true,
        }
    }
}

impl Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match &self.token {
            Some(_) => {
                let given = req
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                if self.token_matches(given) {
                    Ok(req)
                } else {
                    Err(Status::unauthenticated("missing or wrong bearer token"))
                }
            }
            None if Self::is_loopback(req.remote_addr()) => Ok(req),
            None => Err(Status::permission_denied(
                "the API answers loopback only; set STAMPEDE_API_TOKEN to open it",
            )),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
