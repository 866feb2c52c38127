//! The console's JSON endpoints: each calls the `AdminService` method the
//! gRPC API serves (`crate::api`) and answers with its message as JSON; a
//! refusal is `{"error": reason}` with the HTTP status of its gRPC code.
use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use stampede_proto::api::admin_service_server::AdminService;
use stampede_proto::api::{
    GetActivityDeliveryRequest, HostRequest, ListDeadLettersRequest, ListDomainPoliciesRequest,
    ListHostsRequest, PurgeDeadLettersRequest, RemoveDomainPolicyRequest, ReplayDeadLettersRequest,
    SetDomainPolicyRequest, StatusRequest,
};
use tonic::{Code, Status};

use super::{auth, refuse, Console};

/// The answer of one `AdminService` call.
fn answer<T: Serialize>(r: Result<tonic::Response<T>, Status>) -> Response {
    match r {
        Ok(r) => Json(r.into_inner()).into_response(),
        Err(s) => refuse(http_status(s.code()), s.message()),
    }
}

/// The HTTP status of a gRPC code, as the API's errors map them
/// (`stampede_proto::ErrorCode`).
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::Unavailable | Code::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An action's JSON body as the API's request message (absent fields
/// take their defaults), or a 400 saying what is wrong with it.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, (StatusCode, String)> {
    if bytes.len() > 64 * 1024 {
        return Err((StatusCode::PAYLOAD_TOO_LARGE, "body: at most 64 KiB".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| (StatusCode::BAD_REQUEST, format!("body: {e}")))
}

fn req<T>(m: T) -> tonic::Request<T> {
    tonic::Request::new(m)
}

/// `GET /api/session`: the CSRF token of the caller's session, for the
/// page to send on its actions.
pub(crate) async fn session(State(c): State<Console>, headers: HeaderMap) -> Response {
    let s = auth::session_cookie(&headers).unwrap_or_default();
    Json(serde_json::json!({
        "csrf": c.sessions.csrf(s),
        "login": c.sessions.requires_login(),
    }))
    .into_response()
}

/// `GET /api/overview?since=MS`: the overview's points after `since`.
pub(crate) async fn overview(
    State(c): State<Console>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let since = q.get("since").and_then(|s| s.parse().ok()).unwrap_or(0);
    Json(serde_json::json!({
        "bucket_ms": stampede_runtime::rates::BUCKET_MS,
        "points": c.series.since(since),
    }))
    .into_response()
}

/// `GET /api/status`: `Status`.
pub(crate) async fn status(State(c): State<Console>) -> Response {
    answer(c.admin.status(req(StatusRequest {})).await)
}

/// `GET /api/hosts?sort=&limit=`: `ListHosts`.
pub(crate) async fn hosts(
    State(c): State<Console>,
    q: Result<Query<ListHostsRequest>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match q {
        Ok(Query(r)) => answer(c.admin.list_hosts(req(r)).await),
        Err(e) => refuse(StatusCode::BAD_REQUEST, &e.body_text()),
    }
}

/// `POST /api/hosts/pause {"host"}`: `PauseHost`.
pub(crate) async fn pause(State(c): State<Console>, b: Bytes) -> Response {
    match body::<HostRequest>(&b) {
        Ok(r) => answer(c.admin.pause_host(req(r)).await),
        Err((status, reason)) => refuse(status, &reason),
    }
}

/// `POST /api/hosts/resume {"host"}`: `ResumeHost`.
pub(crate) async fn resume(State(c): State<Console>, b: Bytes) -> Response {
    match body::<HostRequest>(&b) {
        Ok(r) => answer(c.admin.resume_host(req(r)).await),
        Err((status, reason)) => refuse(status, &reason),
    }
}

/// `GET /api/domains`: `ListDomainPolicies`.
pub(crate) async fn domains(State(c): State<Console>) -> Response {
    answer(
        c.admin
            .list_domain_policies(req(ListDomainPoliciesRequest {}))
            .await,
    )
}

/// `POST /api/domains {"domain", "policy", "reason"}`: `SetDomainPolicy`.
pub(crate) async fn set_domain(State(c): State<Console>, b: Bytes) -> Response {
    match body::<SetDomainPolicyRequest>(&b) {
        Ok(r) => answer(c.admin.set_domain_policy(req(r)).await),
        Err((status, reason)) => refuse(status, &reason),
    }
}

/// `POST /api/domains/remove {"domain"}`: `RemoveDomainPolicy`.
pub(crate) async fn remove_domain(State(c): State<Console>, b: Bytes) -> Response {
    match body::<RemoveDomainPolicyRequest>(&b) {
        Ok(r) => answer(c.admin.remove_domain_policy(req(r)).await),
        Err((status, reason)) => refuse(status, &reason),
    }
}

/// `GET /api/dead-letters?host=&reason=&limit=`: `ListDeadLetters` for the
/// host, those whose reason contains `reason` (any case) kept.
pub(crate) async fn dead_letters(
    State(c): State<Console>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").filter(|l| !l.is_empty()) {
        None => 0,
        Some(l) => match l.parse::<u32>() {
            Ok(n) => n,
            Err(_) => return refuse(StatusCode::BAD_REQUEST, "limit: a number"),
        },
    };
    let r = ListDeadLettersRequest {
        host: q
            .get("host")
            .map(|h| h.trim().to_ascii_lowercase())
            .unwrap_or_default(),
        limit,
    };
    match c.admin.list_dead_letters(req(r)).await {
        Ok(r) => {
            let mut r = r.into_inner();
            if let Some(want) = q
                .get("reason")
                .map(|r| r.trim().to_lowercase())
                .filter(|r| !r.is_empty())
            {
                r.dead_letters
                    .retain(|d| d.reason.to_lowercase().contains(&want));
            }
            Json(r).into_response()
        }
        Err(s) => refuse(http_status(s.code()), s.message()),
    }
}

/// `POST /api/dead-letters/replay {"id" | "host" | "all"}`: `ReplayDeadLetters`.
pub(crate) async fn replay(State(c): State<Console>, b: Bytes) -> Response {
    match body::<ReplayDeadLettersRequest>(&b) {
        Ok(r) => answer(c.admin.replay_dead_letters(req(r)).await),
        Err((status, reason)) => refuse(status, &reason),
    }
}

/// `POST /api/dead-letters/purge {"host" | "all"}`: `PurgeDeadLetters`.
pub(crate) async fn purge(State(c): State<Console>, b: Bytes) -> Response {
    match body::<PurgeDeadLettersRequest>(&b) {
        Ok(r) => answer(c.admin.purge_dead_letters(req(r)).await),
        Err((status, reason)) => refuse(status, &reason),
    }
}

/// `GET /api/activities/delivery?activity_id=&per_host=true`:
/// `GetActivityDelivery`.
pub(crate) async fn activity_delivery(
    State(c): State<Console>,
    q: Result<Query<GetActivityDeliveryRequest>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match q {
        Ok(Query(r)) => answer(c.admin.get_activity_delivery(req(r)).await),
        Err(e) => refuse(StatusCode::BAD_REQUEST, &e.body_text()),
    }
}

/// `GET /api/activities`: the activities published through this process
/// lately, newest first, each with its delivery counts from
/// `GetActivityDelivery`.
pub(crate) async fn activities(State(c): State<Console>) -> Response {
    let recent: Vec<crate::RecentPublish> = {
        let r = c.ingest.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().rev().cloned().collect()
    };
    let mut out = Vec::with_capacity(recent.len());
    for a in recent {
        let d = c
            .admin
            .get_activity_delivery(req(GetActivityDeliveryRequest {
                activity_id: a.activity_id.clone(),
                per_host: false,
            }))
            .await;
        let (counts, fanned_out) = match d {
            Ok(d) => {
                let d = d.into_inner();
                (d.counts, d.fanned_out)
            }
            Err(s) if s.code() == Code::NotFound => (None, false),
            Err(s) => return refuse(http_status(s.code()), s.message()),
        };
        out.push(serde_json::json!({
            "activity_id": a.activity_id,
            "actor": a.actor,
            "kind": a.kind,
            "published_unix_ms": a.published_unix_ms,
            "fanned_out": fanned_out,
            "counts": counts,
        }));
    }
    Json(serde_json::json!({ "activities": out })).into_response()
}
