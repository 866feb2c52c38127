//! ingest's HTTP side: what remote servers fetch to verify and address us.
use crate::error::http_status;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;

use stampede_core::verify::{has_signature, HttpRequest};
use stampede_core::webfinger::NotLocal;
use stampede_federation::verify::{Verdict, MAX_ID_BYTES};
use stampede_runtime::process::INSTANCE_ACTOR;

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
        .route(
            "/users/{name}/followers_synchronization",
            get(followers_synchronization),
        )
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

/// Followers listed on one page of a followers or following collection.
pub const COLLECTION_PAGE: u32 = 40;
/// How long a public actor document may be kept by caches.
const ACTOR_MAX_AGE: &str = "public, max-age=180";
/// How long a public collection may be kept by caches (they move faster).
const COLLECTION_MAX_AGE: &str = "public, max-age=60";
/// What authorized fetch serves: for the requesting server alone, and
/// answered per signature.
const PRIVATE: &str = "private, max-age=60";

/// Who may GET a document.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Anyone (WebFinger, NodeInfo, the instance actor; the rest unless
    /// `STAMPEDE_AUTHORIZED_FETCH`).
    Public,
    /// A request signed by a key we can verify, from a domain not suspended.
    Signed,
}

/// The GET's signer (the key's owner), verified as the inbox verifies
/// (same verifier, same trust rules; a GET has no body, so no digest), or
/// the answer refusing it: 401 unsigned or not verified, 403 from a
/// suspended (or not allowed) domain, 503 when our own backends failed.
async fn signer(
    s: &Ingest,
    peer: SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<String, Response> {
    let lowered: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let pairs: Vec<(&str, &str)> = lowered
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = HttpRequest {
        method: "GET",
        scheme: s.cfg.public_url.scheme(),
        path_and_query: path,
        headers: &pairs,
        body: b"",
    };
    let refuse = |status: StatusCode, reason: String| {
        let mut r = problem(status, reason);
        private(&mut r);
        r
    };
    if !has_signature(&req) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "a signed request is required".into(),
        ));
    }
    let client = crate::inbox_edge::client_address(peer.ip(), headers, &s.cfg.trusted_proxies);
    let v = s
        .verifier
        .verify(&req, None, &crate::inbox_edge::rate_key(client))
        .await;
    match (v.verdict, v.owner) {
        (Verdict::Accepted, Some(owner)) => Ok(owner),
        (Verdict::Blocked, _) => Err(refuse(StatusCode::FORBIDDEN, v.reason)),
        _ if v.backend => Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "store unavailable".into(),
        )),
        (verdict, _) => Err(refuse(
            StatusCode::UNAUTHORIZED,
            format!(
                "signature not accepted ({}): {}",
                verdict.as_str(),
                v.reason
            ),
        )),
    }
}

/// Marks an answer as for its requester alone (authorized fetch).
fn private(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(PRIVATE));
    h.insert(
        header::VARY,
        HeaderValue::from_static("Signature, Authorization"),
    );
}

/// Serves `body` with the caching its access allows.
fn document(body: serde_json::Value, access: Access, public_max_age: &'static str) -> Response {
    let mut r = activity_json(body);
    match access {
        Access::Public => {
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(public_max_age),
            );
        }
        Access::Signed => private(&mut r),
    }
    r
}

/// Checks a GET of a document of `name` against `STAMPEDE_AUTHORIZED_FETCH`
/// (the instance actor's own document excepted by the caller).
async fn access(
    s: &Ingest,
    peer: SocketAddr,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Access, Response> {
    if !s.cfg.authorized_fetch {
        return Ok(Access::Public);
    }
    signer(s, peer, uri, headers).await.map(|_| Access::Signed)
}

async fn actor(
    State(s): State<Ingest>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    // The instance actor stays public: servers in authorized-fetch mode
    // fetch its key to verify our signed GETs.
    let access = if name == INSTANCE_ACTOR {
        Access::Public
    } else {
        match access(&s, peer, &uri, &headers).await {
            Ok(a) => a,
            Err(r) => return r,
        }
    };
    match lookup(&s, &name).await {
        Ok(a) => document(person(&s.cfg, &a), access, ACTOR_MAX_AGE),
        Err(r) => r,
    }
}

/// The query of a collection: `?page=…` asks for a page, `after` is the
/// last item of the page before (keyset).
#[derive(Deserialize)]
struct PageQuery {
    page: Option<String>,
    after: Option<String>,
}

/// The collection `id` as an `OrderedCollection` pointing at its first page.
fn collection(id: &str, total: Option<u64>) -> serde_json::Value {
    let mut c = json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": id,
        "type": "OrderedCollection",
        "first": format!("{id}?page=true"),
    });
    if let Some(n) = total {
        c["totalItems"] = json!(n);
    }
    c
}

/// One page of the collection `id`: `items`, the page after `after`, and a
/// `next` when `more` follow.
fn page(id: &str, after: Option<&str>, items: &[String], more: bool) -> serde_json::Value {
    let this = match after {
        None => format!("{id}?page=true"),
        Some(a) => format!("{id}?page=true&after={}", encode(a)),
    };
    let mut p = json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": this,
        "type": "OrderedCollectionPage",
        "partOf": id,
        "orderedItems": items,
    });
    if let (true, Some(last)) = (more, items.last()) {
        p["next"] = json!(format!("{id}?page=true&after={}", encode(last)));
    }
    p
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A page's cursor as given, or why it is refused (400): an id at most
/// [`MAX_ID_BYTES`] long.
fn cursor(q: &PageQuery) -> Result<Option<&str>, String> {
    match q.after.as_deref() {
        Some(a) if a.len() > MAX_ID_BYTES || a.is_empty() => Err(format!(
            "after must be a follower id of 1 to {MAX_ID_BYTES} bytes"
        )),
        a => Ok(a),
    }
}

async fn followers(
    State(s): State<Ingest>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Query(q): Query<PageQuery>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let access = match access(&s, peer, &uri, &headers).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let after = match cursor(&q) {
        Ok(a) => a,
        Err(reason) => return problem(StatusCode::BAD_REQUEST, reason),
    };
    let a = match lookup(&s, &name).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = format!("{}/followers", s.cfg.actor_id(&a.name));
    let store = &s.backends.store;
    if q.page.is_none() {
        return match store.follower_count(a.id).await {
            Ok(n) => document(collection(&id, Some(n)), access, COLLECTION_MAX_AGE),
            Err(e) => problem(http_status("follower count", &e), "store unavailable"),
        };
    }
    match store
        .follower_ids(a.id, "", after, COLLECTION_PAGE + 1)
        .await
    {
        Ok(mut ids) => {
            let more = ids.len() > COLLECTION_PAGE as usize;
            ids.truncate(COLLECTION_PAGE as usize);
            document(page(&id, after, &ids, more), access, COLLECTION_MAX_AGE)
        }
        Err(e) => problem(http_status("followers page", &e), "store unavailable"),
    }
}

async fn following(
    State(s): State<Ingest>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Query(q): Query<PageQuery>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let access = match access(&s, peer, &uri, &headers).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let after = match cursor(&q) {
        Ok(a) => a,
        Err(reason) => return problem(StatusCode::BAD_REQUEST, reason),
    };
    match lookup(&s, &name).await {
        // stampede is the federation layer: who a local actor follows is
        // the application's. An empty collection, paged like the others.
        Ok(a) => {
            let id = format!("{}/following", s.cfg.actor_id(&a.name));
            let body = match q.page {
                None => collection(&id, Some(0)),
                Some(_) => page(&id, after, &[], false),
            };
            document(body, access, COLLECTION_MAX_AGE)
        }
        Err(r) => r,
    }
}

async fn outbox(
    State(s): State<Ingest>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Query(q): Query<PageQuery>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let access = match access(&s, peer, &uri, &headers).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let after = match cursor(&q) {
        Ok(a) => a,
        Err(reason) => return problem(StatusCode::BAD_REQUEST, reason),
    };
    let a = match lookup(&s, &name).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = format!("{}/outbox", s.cfg.actor_id(&a.name));
    if q.page.is_some() {
        // Activities are stored for delivery, with their audiences, not
        // served: the application's outbox lists what each reader may see.
        return document(page(&id, after, &[], false), access, COLLECTION_MAX_AGE);
    }
    match s.backends.store.activity_count(a.id).await {
        Ok(n) => document(collection(&id, Some(n)), access, COLLECTION_MAX_AGE),
        Err(e) => problem(http_status("activity count", &e), "store unavailable"),
    }
}

/// `GET /users/{name}/followers_synchronization` (FEP-8fcf): the followers
/// of `name` whose ids share the signer's scheme and authority, to a signed
/// request only (whatever `STAMPEDE_AUTHORIZED_FETCH` says).
async fn followers_synchronization(
    State(s): State<Ingest>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let owner = match signer(&s, peer, &uri, &headers).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    let Some(authority) = stampede_core::followers_sync::authority_of(&owner) else {
        let mut r = problem(
            StatusCode::UNAUTHORIZED,
            format!("the signer {owner} has no scheme and authority to synchronize"),
        );
        private(&mut r);
        return r;
    };
    let a = match lookup(&s, &name).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    // Offered only for the actors whose deliveries carry the header (fewer
    // followers than STAMPEDE_FOLLOWERS_SYNC_MAX): that bounds what one
    // request reads and holds, whoever signs it.
    let max = s.cfg.followers_sync_max;
    let not_offered = |why: String| {
        let mut r = problem(StatusCode::NOT_FOUND, why);
        private(&mut r);
        r
    };
    match s.backends.store.follower_count(a.id).await {
        Ok(n) if max == 0 || n >= max => {
            return not_offered(format!(
                "{name}'s followers are not synchronized (STAMPEDE_FOLLOWERS_SYNC_MAX)"
            ))
        }
        Ok(_) => {}
        Err(e) => return problem(http_status("follower count", &e), "store unavailable"),
    }
    let prefix = format!("{authority}/");
    let mut ids: Vec<String> = Vec::new();
    loop {
        let got = match s
            .backends
            .store
            .follower_ids(a.id, &prefix, ids.last().map(String::as_str), 1000)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                return problem(
                    http_status("followers of a server", &e),
                    "store unavailable",
                )
            }
        };
        let last_page = got.len() < 1000;
        ids.extend(got);
        // Follows added since the count: still no more than it allows.
        if ids.len() as u64 >= max {
            return not_offered(format!(
                "{name}'s followers are not synchronized (STAMPEDE_FOLLOWERS_SYNC_MAX)"
            ));
        }
        if last_page {
            break;
        }
    }
    let actor = s.cfg.actor_id(&a.name);
    document(
        json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("{actor}/followers_synchronization"),
            "type": "OrderedCollection",
            "totalItems": ids.len(),
            "orderedItems": ids,
        }),
        Access::Signed,
        COLLECTION_MAX_AGE,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_link_to_the_next_by_their_last_item_and_cursors_are_bounded() {
        let id = "https://s.example/users/a/followers";
        let c = collection(id, Some(3));
        assert_eq!(c["type"], "OrderedCollection");
        assert_eq!(c["first"], format!("{id}?page=true"));
        assert_eq!(c["totalItems"], 3);
        let items = vec![
            "https://r.example/users/x".to_string(),
            "https://r.example/users/y&z=1".to_string(),
        ];
        let p = page(id, None, &items, true);
        assert_eq!(p["type"], "OrderedCollectionPage");
        assert_eq!(p["partOf"], id);
        assert_eq!(p["id"], format!("{id}?page=true"));
        // The cursor is encoded: an id with `&` cannot add parameters.
        assert_eq!(
            p["next"],
            format!("{id}?page=true&after=https%3A%2F%2Fr.example%2Fusers%2Fy%26z%3D1")
        );
        let last = page(
            id,
            Some("https://r.example/users/y&z=1"),
            &items[..1],
            false,
        );
        assert!(last.get("next").is_none());
        assert_eq!(
            last["id"],
            format!("{id}?page=true&after=https%3A%2F%2Fr.example%2Fusers%2Fy%26z%3D1")
        );
        let q = |after: Option<String>| PageQuery {
            page: Some("true".into()),
            after,
        };
        assert_eq!(cursor(&q(None)), Ok(None));
        assert_eq!(cursor(&q(Some("x".into()))), Ok(Some("x")));
        assert!(cursor(&q(Some(String::new()))).is_err());
        assert!(cursor(&q(Some("x".repeat(MAX_ID_BYTES + 1)))).is_err());
        assert!(cursor(&q(Some("x".repeat(MAX_ID_BYTES)))).is_ok());
    }
}
