//! kilnd's web console, served at `/console` on the API listener.
//!
//! The pages are plain HTML, CSS and ES modules with no build step (web/src), and xterm.js
//! vendored from npm at the versions web/package-lock.json pins (web/vendor; the console test
//! checks the two agree). All of it is embedded in kilnd, so the console needs nothing
//! installed beside it. The pages call the REST API like any client: a browser signs in with
//! the API key once and gets a session cookie (HttpOnly, SameSite=Strict, Secure under TLS) and
//! a CSRF token it sends as `X-Kiln-Csrf` on every request that changes something
//! ([`sessions`]).

pub mod sessions;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use kiln_api::{ErrorBody, ErrorCode};
use serde::{Deserialize, Serialize};

pub use sessions::{constant_time_eq, session_cookie, Refusal, Sessions, COOKIE, CSRF_HEADER};

/// What the console's routes need.
#[derive(Clone)]
pub struct Console {
    /// The API key a sign-in must give.
    pub key: Arc<String>,
    pub sessions: Arc<Sessions>,
    /// The API speaks TLS: cookies are `Secure`.
    pub secure: bool,
    /// Where the pages may open connections besides kilnd itself: the ingress, for the
    /// terminal's WebSocket (`ws://127.0.0.1:PORT`, say).
    pub connect_sources: Vec<String>,
}

/// (path under /console/, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!("../web/src/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/src/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/src/style.css"),
    ),
    (
        "vendor/xterm.mjs",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/vendor/xterm.mjs"),
    ),
    (
        "vendor/xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/vendor/xterm.css"),
    ),
    (
        "vendor/addon-fit.mjs",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/vendor/addon-fit.mjs"),
    ),
];

/// The console's routes: its pages at `/console/`, and sign-in at `/console/session`.
pub fn router<S>(console: Console) -> Router<S> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route("/console/", get(asset_root))
        .route(
            "/console/session",
            get(current).post(sign_in).delete(sign_out),
        )
        .route("/console/{*file}", get(asset))
        .with_state(console)
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ErrorBody {
        code,
        message: message.into(),
    };
    (status, Json(body)).into_response()
}

async fn asset_root(State(c): State<Console>) -> Response {
    serve(&c, "")
}

async fn asset(State(c): State<Console>, Path(file): Path<String>) -> Response {
    serve(&c, &file)
}

fn serve(c: &Console, file: &str) -> Response {
    let Some((_, mime, bytes)) = ASSETS.iter().find(|(name, _, _)| *name == file) else {
        return error(
            ErrorCode::ResourceNotFoundException,
            format!("the console has no {file:?}: open /console/"),
        );
    };
    let mut headers = security_headers(c);
    if let Ok(v) = HeaderValue::from_str(mime) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    // The pages change with kilnd: always ask (they are small); the vendored files are the
    // pinned versions, but the same holds for an upgrade of kilnd.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (headers, *bytes).into_response()
}

/// The pages run only kilnd's own scripts, connect only to kilnd and the ingress, and cannot
/// be framed by another site.
fn security_headers(c: &Console) -> HeaderMap {
    let mut h = HeaderMap::new();
    let connect = std::iter::once("'self'".to_string())
        .chain(c.connect_sources.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
         connect-src {connect}; font-src 'self'; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'"
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SignIn {
    api_key: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionView {
    /// Send it as `X-Kiln-Csrf` on every request that changes something.
    csrf_token: String,
}

fn cookie(c: &Console, value: &str, max_age: Option<u64>) -> HeaderValue {
    let mut text = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        text.push_str(&format!("; Max-Age={age}"));
    }
    if c.secure {
        text.push_str("; Secure");
    }
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn session_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session_cookie)
        .map(str::to_string)
}

async fn sign_in(
    State(c): State<Console>,
    body: Result<Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(req)) = body else {
        return error(
            ErrorCode::ValidationException,
            "send {\"apiKey\": \"<the key in KILN_HOME/api-key>\"} as JSON",
        );
    };
    if !sessions::constant_time_eq(req.api_key.trim().as_bytes(), c.key.as_bytes()) {
        return error(
            ErrorCode::UnauthorizedException,
            "that is not this kilnd's API key: it is in KILN_HOME/api-key on the host",
        );
    }
    let (id, csrf) = c.sessions.create();
    let mut headers = HeaderMap::new();
    headers.insert(header::SET_COOKIE, cookie(&c, &id, None));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    (headers, Json(SessionView { csrf_token: csrf })).into_response()
}

/// The signed-in session's CSRF token (a reloaded page gets it again from its cookie).
async fn current(State(c): State<Console>, headers: HeaderMap) -> Response {
    match session_of(&headers).and_then(|id| c.sessions.csrf(&id)) {
        Some(csrf) => {
            let mut h = HeaderMap::new();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            (h, Json(SessionView { csrf_token: csrf })).into_response()
        }
        None => error(
            ErrorCode::UnauthorizedException,
            Refusal::NoSession.message(),
        ),
    }
}

async fn sign_out(State(c): State<Console>, headers: HeaderMap) -> Response {
    let Some(id) = session_of(&headers) else {
        return error(
            ErrorCode::UnauthorizedException,
            Refusal::NoSession.message(),
        );
    };
    let csrf = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    if let Err(refusal) = c.sessions.authorize(&id, false, csrf) {
        return error(ErrorCode::UnauthorizedException, refusal.message());
    }
    c.sessions.revoke(&id);
    let mut h = HeaderMap::new();
    h.insert(header::SET_COOKIE, cookie(&c, "", Some(0)));
    (StatusCode::NO_CONTENT, h).into_response()
}
