//! The REST API. Handlers take and return kiln-api's types; each is annotated with the
//! OpenAPI operation it serves (utoipa), and the router and the spec are built from the same
//! list ([`routes`]), so neither can have what the other lacks. `spec/openapi.yaml` is this
//! spec, checked in (tests/openapi.rs fails when it is stale). Every route except /health and
//! /metrics needs the bearer key.

mod event_stream;
mod files;
mod images;
mod list;
mod microvms;
mod nodes;
mod processes;
mod system;
mod unread;
mod webhooks;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::{Json, Router};
use kiln_api::ErrorCode;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

/// The largest JSON body kilnd reads (uploads have their own limit).
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// StartProcess's: its arguments and environment may be up to 256 KiB, JSON-escaped.
pub const MAX_START_BODY: usize = 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kiln control API (kilnd)",
        description = "Self-hostable microVM sandboxes. Field names follow the AWS Lambda \
            MicroVMs calls (imageIdentifier, idlePolicy.maxIdleDurationSeconds, microvmId, \
            endpoint, …). Every route except /health and /metrics needs `Authorization: Bearer \
            <key>` with the key from KILN_HOME/api-key. Errors are JSON: {\"code\": \"...\", \
            \"message\": \"what to fix\"}; clients branch on `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((url = "http://127.0.0.1:7070", description = "kilnd's default address")),
    modifiers(&BearerScheme),
    // The `data` of server-sent events: the streams' schemas describe the events, not these.
    components(schemas(
        kiln_api::ErrorBody,
        kiln_api::ErrorCode,
        kiln_api::ProcessOutputEvent,
        kiln_api::FileEvent
    )),
    tags(
        (name = "images", description = "Images baked from a Dockerfile into a snapshot"),
        (name = "microvms", description = "MicroVMs launched from images"),
        (name = "files", description = "A running microVM's files, as a guest user"),
        (name = "processes", description = "Processes that run on in a microVM, streamed and controlled"),
        (name = "tokens", description = "Short-lived tokens the ingress admits"),
        (name = "system", description = "kilnd itself"),
    )
)]
struct ApiDoc;

/// The `bearer` security scheme every protected operation names.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The key in KILN_HOME/api-key"))
                    .build(),
            ),
        );
    }
}

/// Every operation, documented and routed from one list.
fn routes(auth: crate::auth::Auth) -> OpenApiRouter<Arc<Manager>> {
    let protected = OpenApiRouter::new()
        .routes(routes!(images::upload_artifact).layer(DefaultBodyLimit::disable()))
        .routes(routes!(images::create_image, images::list_images))
        .routes(routes!(
            images::get_image,
            images::delete_image,
            images::update_image
        ))
        .routes(routes!(images::image_logs))
        .routes(routes!(microvms::run_microvm, microvms::list_microvms))
        .routes(routes!(
            microvms::get_microvm,
            microvms::delete_microvm,
            microvms::update_microvm
        ))
        .routes(routes!(microvms::suspend_microvm))
        .routes(routes!(microvms::resume_microvm))
        .routes(routes!(microvms::fork_microvm))
        .routes(routes!(microvms::save_microvm_image))
        .routes(routes!(microvms::terminate_microvm))
        .routes(routes!(microvms::exec_microvm))
        .routes(routes!(microvms::microvm_logs))
        .routes(routes!(microvms::microvm_metrics))
        .routes(routes!(microvms::microvm_disk))
        .routes(routes!(files::list_files, files::remove_file))
        .routes(routes!(files::stat_file))
        .routes(routes!(files::read_file, files::write_file).layer(DefaultBodyLimit::disable()))
        .routes(
            routes!(files::download_archive, files::upload_archive)
                .layer(DefaultBodyLimit::disable()),
        )
        .routes(routes!(files::make_directory))
        .routes(routes!(files::move_file))
        .routes(routes!(files::watch_files))
        .routes(
            routes!(processes::start_process, processes::list_processes)
                .layer(DefaultBodyLimit::max(MAX_START_BODY)),
        )
        .routes(routes!(processes::get_process))
        .routes(routes!(processes::process_output))
        .routes(routes!(processes::write_process_stdin))
        .routes(routes!(processes::signal_process))
        .routes(routes!(processes::resize_process))
        .routes(routes!(system::events))
        .routes(routes!(event_stream::stream_events))
        .routes(routes!(system::ingress_info))
        .routes(routes!(system::create_token))
        .routes(routes!(system::rotate_token_key))
        .routes(routes!(system::revoke_token))
        .routes(routes!(system::revoke_microvm_tokens))
        .routes(routes!(webhooks::create_webhook, webhooks::list_webhooks))
        .routes(routes!(webhooks::delete_webhook))
        .routes(routes!(webhooks::webhook_deliveries))
        .routes(routes!(nodes::list_nodes))
        .routes(routes!(nodes::drain_node))
        .routes(routes!(nodes::undrain_node))
        .routes(routes!(nodes::remove_node))
        // Inside the key check: a call about another node's microVM goes there once
        // authenticated here.
        .route_layer(axum::middleware::from_fn(crate::cluster::to_owner))
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            crate::auth::require_key,
        ));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(system::health))
        .routes(routes!(system::metrics))
        .merge(protected)
}

/// The OpenAPI document of what [`router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let auth = crate::auth::Auth {
        key: Arc::new(String::new()),
        sessions: Arc::default(),
    };
    let mut api = routes(auth).split_for_parts().1;
    // WriteProcessStdin with no body and `eof=true` only closes stdin. utoipa makes a body
    // optional only for an `Option` type, which would also make the bytes' schema nullable.
    let stdin = "/v1/microvms/{id}/processes/{pid}/stdin";
    if let Some(body) = api
        .paths
        .paths
        .get_mut(stdin)
        .and_then(|item| item.post.as_mut())
        .and_then(|op| op.request_body.as_mut())
    {
        body.required = Some(utoipa::openapi::Required::False);
    }
    document_unavailable(&mut api);
    api
}

/// Every operation that can fail inside kilnd (it documents 500) can also find the
/// database unreachable in a cluster: 503, retry later.
fn document_unavailable(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, ResponseBuilder};
    let internal = "500".to_string();
    for item in api.paths.paths.values_mut() {
        let ops = [
            item.get.as_mut(),
            item.post.as_mut(),
            item.put.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ];
        for op in ops.into_iter().flatten() {
            let Some(RefOr::T(r500)) = op.responses.responses.get(&internal).cloned() else {
                continue;
            };
            let r503 = ResponseBuilder::new()
                .description(
                    "The database (a cluster's PostgreSQL) is unreachable: nothing was changed; retry",
                )
                .content(
                    "application/json",
                    r500.content.get("application/json").cloned().unwrap_or_default(),
                )
                .build();
            op.responses
                .responses
                .insert("503".to_string(), RefOr::T(r503));
        }
    }
}

/// Every `(method, path)` the spec documents (and so the router serves).
pub fn operations() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in openapi().paths.paths {
        for (method, op) in [
            ("get", item.get.is_some()),
            ("post", item.post.is_some()),
            ("put", item.put.is_some()),
            ("delete", item.delete.is_some()),
            ("patch", item.patch.is_some()),
        ] {
            if op {
                out.push((method.to_string(), path.clone()));
            }
        }
    }
    out
}

/// [`openapi`] as the YAML checked in as `spec/openapi.yaml`.
pub fn openapi_yaml() -> Result<String, String> {
    openapi().to_yaml().map_err(|e| e.to_string())
}

/// The API, and the web console beside it (`/console`, not part of the spec).
pub fn router(manager: Arc<Manager>, key: Arc<String>, console: crate::ConsoleOptions) -> Router {
    let auth = crate::auth::Auth {
        key: key.clone(),
        sessions: manager.console.clone(),
    };
    let (router, _) = routes(auth.clone()).split_for_parts();
    let console = kiln_console::router(kiln_console::Console {
        key,
        sessions: manager.console.clone(),
        secure: console.secure,
        connect_sources: console.connect_sources,
    });
    // Node to node: ingress traffic for a microVM this node owns (see crate::tunnel).
    let tunnel = Router::new()
        .route(
            crate::tunnel::ROUTE,
            axum::routing::get(crate::tunnel::serve),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            crate::auth::require_key,
        ));
    router
        .merge(console)
        .merge(tunnel)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::Extension(manager.clone()))
        .fallback(|| async {
            ApiError::new(
                ErrorCode::UnknownOperation,
                "no such route: see spec/openapi.yaml",
            )
        })
        .layer(axum::middleware::from_fn(unread::close_if_unread))
        .with_state(manager)
}

/// `Json` whose rejections are API errors (400, or 413 for a body over the limit, with a
/// message that says what is wrong).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::bad_request(
                "send the request body as JSON with Content-Type: application/json",
            )),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the request body is over this operation's limit ({MAX_JSON_BODY} bytes; \
                     {MAX_START_BODY} to start a process)"
                ),
            )),
            Err(e) => Err(ApiError::bad_request(format!(
                "invalid request body: {}",
                e.body_text()
            ))),
        }
    }
}

/// An SSE client's `Last-Event-ID` (where to resume a stream), if it sent one: 400 unless it
/// is `what` (a number kilnd gave out as an event id).
pub(crate) fn last_event_id<T: std::str::FromStr>(
    headers: &axum::http::HeaderMap,
    what: &str,
) -> ApiResult<Option<T>> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<T>().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("Last-Event-ID must be {what}"))),
    }
}

/// `Path` whose rejections are API errors (400 naming the parameter that is not what the
/// route takes, e.g. a pid that is not a number).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::bad_request(format!(
                "invalid path: {}",
                e.body_text()
            ))),
        }
    }
}

/// `Query` whose rejections are API errors (400 with what is wrong in the query string).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let _ = state;
        // serde_html_form, not serde_urlencoded: a repeated key (`label=a&label=b`) is a list;
        // serde_path_to_error names the parameter that was wrong.
        let query = parts.uri.query().unwrap_or("");
        let de = serde_html_form::Deserializer::from_bytes(query.as_bytes());
        serde_path_to_error::deserialize::<_, T>(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    ApiError::bad_request(format!("invalid query string: {inner}"))
                } else {
                    ApiError::bad_request(format!("invalid query string: {path}: {inner}"))
                }
            })
    }
}

/// How much of a refused body kilnd still reads, and for how long, before it answers.
const LINGER_BYTES: u64 = 16 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops the rest of a body refused part way (over its cap), up to a bound, so a
/// client that sends all of it before reading the answer gets the 413 rather than a reset
/// connection (the "lingering close" of HTTP servers). A sender of more than the bound, or a
/// slow one, is cut off: the drain never costs more than `LINGER_BYTES` and `LINGER_TIME`.
pub(crate) async fn linger(body: &mut axum::body::Body) {
    use http_body_util::BodyExt;
    let drain = async {
        let mut dropped = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            dropped += frame.data_ref().map_or(0, |d| d.len() as u64);
            if dropped > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}
