//! The admin console (README, "Admin console"): a web page for the people
//! who run the instance, served on ingest's admin listener
//! (`STAMPEDE_ADMIN_ADDR`), never the public one. Its JSON endpoints call
//! the very `AdminService` methods the gRPC API serves and answer with the
//! same messages, so the page, the CLI and the application see one truth.
//! The page is plain HTML, CSS and JavaScript compiled into the binary.
mod auth;
mod endpoints;
mod overview;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::{AdminApi, Ingest, IngestError};

/// What the console's handlers share.
#[derive(Clone)]
pub(crate) struct Console(Arc<ConsoleParts>);

pub(crate) struct ConsoleParts {
    admin: AdminApi,
    ingest: Ingest,
    sessions: auth::Sessions,
    series: overview::Series,
}

impl std::ops::Deref for Console {
    type Target = ConsoleParts;
    fn deref(&self) -> &ConsoleParts {
        &self.0
    }
}

/// The console's files, compiled in.
const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Serves the console on `listener` until `shutdown`, with the overview's
/// sampler beside it.
pub async fn serve(
    ingest: Ingest,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let token = ingest
        .cfg
        .api_token
        .as_ref()
        .map(|t| t.expose().to_string());
    let sessions = auth::Sessions::new(
        stampede_runtime::grpc::Auth::new(ingest.cfg.api_token.clone()),
        token.as_deref(),
    )
    .map_err(stampede_runtime::Error::Internal)?;
    let console = Console(Arc::new(ConsoleParts {
        admin: AdminApi(ingest.clone()),
        ingest,
        sessions,
        series: overview::Series::default(),
    }));
    let sampler = {
        let c = console.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { c.series.run(c.ingest.backends.clone(), stop).await })
    };
    let addr = listener.local_addr().ok();
    tracing::info!(
        ?addr,
        login = console.sessions.requires_login(),
        "admin console listening"
    );
    let app = router(console);
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await;
    sampler.abort();
    served.map_err(|e| stampede_runtime::Error::Internal(format!("admin console: {e}")).into())
}

fn router(console: Console) -> Router {
    let api = Router::new()
        .route("/session", get(endpoints::session))
        .route("/overview", get(endpoints::overview))
        .route("/status", get(endpoints::status))
        .route("/hosts", get(endpoints::hosts))
        .route("/hosts/pause", post(endpoints::pause))
        .route("/hosts/resume", post(endpoints::resume))
        .route(
            "/domains",
            get(endpoints::domains).post(endpoints::set_domain),
        )
        .route("/domains/remove", post(endpoints::remove_domain))
        .route("/dead-letters", get(endpoints::dead_letters))
        .route("/dead-letters/replay", post(endpoints::replay))
        .route("/dead-letters/purge", post(endpoints::purge))
        .route("/activities", get(endpoints::activities))
        .route("/activities/delivery", get(endpoints::activity_delivery));
    Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/assets/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/assets/app.css",
            get(|| asset(APP_CSS, "text/css; charset=utf-8")),
        )
        .nest("/api", api)
        .layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

fn now_secs() -> i64 {
    stampede_backends::clock::now_ms() / 1000
}

/// Every request: the peer check (loopback only without a token), then a
/// valid session for everything but the page, its assets and the login,
/// then the CSRF token on every action (every method but GET and HEAD).
/// Every answer gets the headers that keep it out of frames and caches.
async fn guard(State(c): State<Console>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a);
    let mut resp = if let Some(reason) = c.sessions.refuse_peer(peer, req.headers()) {
        refuse(StatusCode::FORBIDDEN, reason)
    } else {
        let path = req.uri().path();
        let open = matches!(path, "/" | "/login" | "/favicon.ico") || path.starts_with("/assets/");
        let session = auth::session_cookie(req.headers())
            .filter(|s| c.sessions.valid(s, now_secs()))
            .map(str::to_string);
        let safe = matches!(*req.method(), Method::GET | Method::HEAD);
        match session {
            None if !open => refuse(StatusCode::UNAUTHORIZED, "log in first: no valid session"),
            Some(s)
                if !safe
                    && path != "/login"
                    && !req
                        .headers()
                        .get(auth::CSRF_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|t| c.sessions.csrf_matches(&s, t)) =>
            {
                refuse(StatusCode::FORBIDDEN, "missing or wrong CSRF token")
            }
            _ => next.run(req).await,
        }
    };
    let h = resp.headers_mut();
    for (k, v) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    resp
}

/// A refusal with its reason, as JSON (`{"error": …}`).
pub(crate) fn refuse(status: StatusCode, reason: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": reason }))).into_response()
}

fn asset(body: &'static str, kind: &'static str) -> impl std::future::Future<Output = Response> {
    std::future::ready(([(header::CONTENT_TYPE, kind)], body).into_response())
}

fn html(status: StatusCode, body: String, cookie: Option<String>) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// The page: the console with a valid session; otherwise the login form
/// (with a token) or the console with a new session (loopback only).
async fn index(State(c): State<Console>, headers: axum::http::HeaderMap) -> Response {
    let valid = auth::session_cookie(&headers).is_some_and(|s| c.sessions.valid(s, now_secs()));
    if valid {
        return html(StatusCode::OK, INDEX.into(), None);
    }
    if c.sessions.requires_login() {
        return html(StatusCode::OK, LOGIN.replace("{{error}}", ""), None);
    }
    match c.sessions.issue(now_secs()) {
        Ok(s) => html(
            StatusCode::OK,
            INDEX.into(),
            Some(auth::set_cookie(&s, &headers)),
        ),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// The login form's POST (`token=…`): a session cookie and back to the
/// page, or the form again with the reason.
async fn login(
    State(c): State<Console>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    // A login posted by another site's page is refused: its Origin differs.
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if let (Some(origin), Some(host)) = (
        headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()),
        host,
    ) {
        let bare = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if bare != host {
            return refuse(StatusCode::FORBIDDEN, "login from another origin");
        }
    }
    let token = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if !c.sessions.requires_login() {
        return redirect_home(None);
    }
    if !c.sessions.token_matches(token.trim()) {
        tracing::warn!("admin console: login with a wrong token");
        return html(
            StatusCode::UNAUTHORIZED,
            LOGIN.replace(
                "{{error}}",
                "<p class=\"error\" id=\"login-error\">wrong token</p>",
            ),
            None,
        );
    }
    match c.sessions.issue(now_secs()) {
        Ok(s) => redirect_home(Some(auth::set_cookie(&s, &headers))),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn logout(headers: axum::http::HeaderMap) -> Response {
    redirect_home(Some(auth::set_cookie("", &headers)))
}

fn redirect_home(cookie: Option<String>) -> Response {
    let mut r = Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, "/")
        .body(Body::empty())
        .unwrap_or_default();
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}
