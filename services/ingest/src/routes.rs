//! ingest's HTTP side: what remote servers fetch to verify and address us.
use crate::error::http_status;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use stampede_core::webfinger::NotLocal;

use crate::documents::person;
use crate::Ingest;

const ACTIVITY_JSON: &str = "application/activity+json; charset=utf-8";

/// The HTTP routes of ingest.
pub fn router(ingest: Ingest) -> Router {
    Router::new()
        .route("/users/{name}", get(actor))
        .route("/users/{name}/followers", get(followers))
        .route("/users/{name}/following", get(following))
        .route("/users/{name}/outbox", get(outbox))
        .route("/.well-known/webfinger", get(webfinger))
        .route("/.well-known/nodeinfo", get(nodeinfo_links))
        .route("/nodeinfo/2.1", get(nodeinfo))
        .route("/inbox", post(crate::inbox_edge::shared_inbox))
        .route("/users/{name}/inbox", post(crate::inbox_edge::actor_inbox))
        .with_state(ingest)
}

fn activity_json(body: serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, ACTIVITY_JSON)], body.to_string()).into_response()
}

fn problem(status: StatusCode, reason: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        reason.into() + "\n",
    )
        .into_response()
}

/// The actor `name` without its private key (nothing served here needs it).
async fn lookup(
    s: &Ingest,
    name: &str,
) -> Result<stampede_backends::store::ActorProfile, Response> {
    match s.backends.store.actor_profile_by_name(name).await {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(problem(
            StatusCode::NOT_FOUND,
            format!("no actor named {name}"),
        )),
        Err(e) => Err(problem(
            http_status("actor lookup", &e),
            "store unavailable",
        )),
    }
}

async fn actor(State(s): State<Ingest>, Path(name): Path<String>) -> Response {
    match lookup(&s, &name).await {
        Ok(a) => activity_json(person(&s.cfg, &a)),
        Err(r) => r,
    }
}

async fn followers(State(s): State<Ingest>, Path(name): Path<String>) -> Response {
    let a = match lookup(&s, &name).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    match s.backends.store.follower_count(a.id).await {
        Ok(n) => activity_json(json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("{}/followers", s.cfg.actor_id(&a.name)),
            "type": "OrderedCollection",
            "totalItems": n,
        })),
        Err(e) => problem(http_status("follower count", &e), "store unavailable"),
    }
}

async fn following(State(s): State<Ingest>, Path(name): Path<String>) -> Response {
    match lookup(&s, &name).await {
        // stampede is the federation layer: who a local actor follows is the application's.
        Ok(a) => activity_json(json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("{}/following", s.cfg.actor_id(&a.name)),
            "type": "OrderedCollection",
        })),
        Err(r) => r,
    }
}

async fn outbox(State(s): State<Ingest>, Path(name): Path<String>) -> Response {
    let a = match lookup(&s, &name).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    match s.backends.store.activity_count(a.id).await {
        Ok(n) => activity_json(json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("{}/outbox", s.cfg.actor_id(&a.name)),
            "type": "OrderedCollection",
            "totalItems": n,
        })),
        Err(e) => problem(http_status("activity count", &e), "store unavailable"),
    }
}

#[derive(Deserialize)]
struct Finger {
    resource: Option<String>,
}

async fn webfinger(State(s): State<Ingest>, Query(q): Query<Finger>) -> Response {
    let Some(resource) = q.resource else {
        return problem(StatusCode::BAD_REQUEST, "missing resource parameter");
    };
    let host = s.cfg.public_host();
    let users = s.cfg.actors_prefix();
    let name = match stampede_core::webfinger::local_name(&resource, &host, &users) {
        Ok(name) => name.to_string(),
        Err(NotLocal::Elsewhere) => return problem(StatusCode::NOT_FOUND, "not a local account"),
        Err(NotLocal::Malformed) => {
            return problem(StatusCode::BAD_REQUEST, "resource must be acct:name@host")
        }
    };
    let a = match lookup(&s, &name).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = s.cfg.actor_id(&a.name);
    (
        [(header::CONTENT_TYPE, "application/jrd+json; charset=utf-8")],
        json!({
            "subject": format!("acct:{}@{host}", a.name),
            "aliases": [id],
            "links": [
                {"rel": "self", "type": "application/activity+json", "href": id},
                {"rel": "http://webfinger.net/rel/profile-page", "type": "text/html", "href": id}
            ]
        })
        .to_string(),
    )
        .into_response()
}

async fn nodeinfo_links(State(s): State<Ingest>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({"links": [{
            "rel": "http://nodeinfo.diaspora.software/ns/schema/2.1",
            "href": format!("{}/nodeinfo/2.1", s.cfg.base()),
        }]})
        .to_string(),
    )
        .into_response()
}

async fn nodeinfo(State(s): State<Ingest>) -> Response {
    let users = match s.backends.store.actor_count().await {
        Ok(n) => n,
        Err(e) => return problem(http_status("actor count", &e), "store unavailable"),
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/json; profile=\"http://nodeinfo.diaspora.software/ns/schema/2.1#\"",
        )],
        json!({
            "version": "2.1",
            "software": {"name": "stampede", "version": env!("CARGO_PKG_VERSION")},
            "protocols": ["activitypub"],
            "services": {"inbound": [], "outbound": []},
            "openRegistrations": false,
            "usage": {"users": {"total": users}},
            "metadata": {},
        })
        .to_string(),
    )
        .into_response()
}
