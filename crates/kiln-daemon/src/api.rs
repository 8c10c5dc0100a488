//! The REST API (JSON, field names as in the seed's calls). Every route except /health and
//! /metrics needs the bearer key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_image::BuildSpec;
use kiln_store::MicrovmRow;
use kiln_types::MicrovmState;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::manager::{IdlePolicy, Manager};
use kiln_vmm::kiln_net::Connector;

/// `Json` whose rejections are API errors (400 with a message that says what is wrong).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::bad_request(
                "send the request body as JSON with Content-Type: application/json",
            )),
            Err(e) => Err(ApiError::bad_request(format!(
                "invalid request body: {}",
                e.body_text()
            ))),
        }
    }
}

pub fn router(manager: Arc<Manager>, key: Arc<String>) -> Router {
    let protected = Router::new()
        .route(
            "/v1/artifacts",
            post(upload_artifact).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/images", post(create_image).get(list_images))
        .route("/v1/images/{id}", get(get_image).delete(delete_image))
        .route("/v1/images/{id}/logs", get(image_logs))
        .route("/v1/microvms", post(run_microvm).get(list_microvms))
        .route(
            "/v1/microvms/{id}",
            get(get_microvm).delete(terminate_microvm),
        )
        .route("/v1/microvms/{id}/suspend", post(suspend_microvm))
        .route("/v1/microvms/{id}/resume", post(resume_microvm))
        .route("/v1/microvms/{id}/terminate", post(terminate_microvm))
        .route("/v1/microvms/{id}/exec", post(exec_microvm))
        .route("/v1/microvms/{id}/logs", get(microvm_logs))
        .route("/v1/microvms/{id}/disk", get(microvm_disk))
        .route("/v1/events", get(events))
        .route("/v1/ingress", get(ingress_info))
        .route("/v1/auth-tokens", post(create_token))
        .route("/v1/auth-tokens/rotate-key", post(rotate_token_key))
        .route("/v1/auth-tokens/{id}", axum::routing::delete(revoke_token))
        .route(
            "/v1/microvms/{id}/revoke-tokens",
            post(revoke_microvm_tokens),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            key,
            crate::auth::require_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(protected)
        .layer(DefaultBodyLimit::max(64 * 1024))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "UnknownOperation",
                "no such route: see spec/openapi.yaml",
            )
        })
        .with_state(manager)
}

/// Every route the router serves, for the OpenAPI agreement test.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/metrics"),
    ("post", "/v1/artifacts"),
    ("post", "/v1/images"),
    ("get", "/v1/images"),
    ("get", "/v1/images/{id}"),
    ("delete", "/v1/images/{id}"),
    ("get", "/v1/images/{id}/logs"),
    ("post", "/v1/microvms"),
    ("get", "/v1/microvms"),
    ("get", "/v1/microvms/{id}"),
    ("delete", "/v1/microvms/{id}"),
    ("post", "/v1/microvms/{id}/suspend"),
    ("post", "/v1/microvms/{id}/resume"),
    ("post", "/v1/microvms/{id}/terminate"),
    ("post", "/v1/microvms/{id}/exec"),
    ("get", "/v1/microvms/{id}/logs"),
    ("get", "/v1/microvms/{id}/disk"),
    ("get", "/v1/events"),
    ("get", "/v1/ingress"),
    ("post", "/v1/auth-tokens"),
    ("post", "/v1/auth-tokens/rotate-key"),
    ("delete", "/v1/auth-tokens/{id}"),
    ("post", "/v1/microvms/{id}/revoke-tokens"),
];

async fn health(State(m): State<Arc<Manager>>) -> Json<Value> {
    let dev = m.accel.is_dev_mode();
    Json(json!({
        "status": "ok",
        "accelerator": m.accel.as_str(),
        "devMode": dev,
        "warning": dev.then_some(kiln_vmm::accel::DEV_MODE_WARNING),
        "jail": match m.confinement {
            kiln_vmm::Confinement::Jailed(_) => json!(kiln_jail::facts()),
            kiln_vmm::Confinement::Unjailed => json!({
                "enabled": false,
                "warning": "--no-jail: QEMU runs unjailed (development only)",
            }),
        },
    }))
}

/// Per-microVM metering (microVMs not yet terminated), as the seed bills: running seconds,
/// CPU above the baseline (burst), suspended snapshot byte-seconds; plus CPU and credit.
fn metering(rows: &[kiln_store::MicrovmRow], out: &mut String) {
    let series: [(&str, &str, &str, &str); 5] = [
        (
            "kiln_microvm_running_seconds_total",
            "counter",
            "runningSeconds",
            "Seconds a microVM ran.",
        ),
        (
            "kiln_microvm_cpu_seconds_total",
            "counter",
            "cpuSeconds",
            "CPU-seconds a microVM used (its cgroup).",
        ),
        (
            "kiln_microvm_burst_cpu_seconds_total",
            "counter",
            "cpuSecondsAboveBaseline",
            "CPU-seconds above the microVM's baseline.",
        ),
        (
            "kiln_microvm_suspended_snapshot_byte_seconds_total",
            "counter",
            "suspendedSnapshotByteSeconds",
            "Byte-seconds of suspended snapshot state.",
        ),
        (
            "kiln_microvm_cpu_credit_seconds",
            "gauge",
            "cpuCreditSeconds",
            "Burst credit left (CPU-seconds above the baseline).",
        ),
    ];
    let live: Vec<_> = rows.iter().filter(|r| r.state != "TERMINATED").collect();
    for (name, kind, field, help) in series {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for r in &live {
            let v = r.usage[field].as_f64().unwrap_or(0.0);
            out.push_str(&format!(
                "{name}{{microvm=\"{}\",image=\"{}\"}} {v}\n",
                r.id, r.image_name
            ));
        }
    }
}

async fn metrics(State(m): State<Arc<Manager>>) -> ApiResult<Response> {
    let rows = m.store().microvms(None, None)?;
    let mut out =
        String::from("# HELP kiln_microvms MicroVMs by state.\n# TYPE kiln_microvms gauge\n");
    for state in ["PENDING", "RUNNING", "SUSPENDED", "RESUMING", "TERMINATED"] {
        let n = rows.iter().filter(|r| r.state == state).count();
        out.push_str(&format!("kiln_microvms{{state=\"{state}\"}} {n}\n"));
    }
    metering(&rows, &mut out);
    out.push_str("# HELP kiln_images Images by latest build status.\n# TYPE kiln_images gauge\n");
    let images = m.store().images()?;
    for status in [
        "CREATING",
        "SUCCESSFUL",
        "FAILED",
        crate::recovery::REBUILD_REQUIRED,
    ] {
        let n = images.iter().filter(|i| i.status == status).count();
        out.push_str(&format!("kiln_images{{status=\"{status}\"}} {n}\n"));
    }
    out.push_str(&format!("# HELP kiln_dev_mode 1 when guests run under emulation.\n# TYPE kiln_dev_mode gauge\nkiln_dev_mode {}\n", u8::from(m.accel.is_dev_mode())));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// Streams an upload to disk (never whole in memory), under `--max-artifact-mib`, then
/// names it with a random id: two uploads at once never share a name.
async fn upload_artifact(
    State(m): State<Arc<Manager>>,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let dir = crate::images::artifacts_dir(&m);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(ApiError::internal)?;
    let mut nonce = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let id = format!("art-{}", hex::encode(nonce));
    let partial = dir.join(format!(".{id}.upload"));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .await
        .map_err(ApiError::internal)?;
    let outcome = async {
        let mut body = body;
        let mut head = Vec::new();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len() as u64;
            if total > m.cfg.max_artifact_bytes {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "ValidationException",
                    format!(
                        "the artifact is over {} MiB: leave large files out of the context \
                         (.dockerignore), or raise kilnd --max-artifact-mib",
                        m.cfg.max_artifact_bytes >> 20
                    ),
                ));
            }
            if head.len() < 262 {
                head.extend_from_slice(&data[..data.len().min(262 - head.len())]);
            }
            file.write_all(&data).await.map_err(ApiError::internal)?;
        }
        file.sync_all().await.map_err(ApiError::internal)?;
        let kind = if head.starts_with(b"PK\x03\x04") {
            "zip"
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            "tar"
        } else {
            return Err(ApiError::bad_request(
                "the artifact must be a zip or tar archive of the build context",
            ));
        };
        Ok((kind, total))
    }
    .await;
    match outcome {
        Ok((kind, total)) => {
            tokio::fs::rename(&partial, dir.join(format!("{id}.{kind}")))
                .await
                .map_err(ApiError::internal)?;
            Ok(Json(
                json!({"artifactId": id, "bytes": total, "format": kind}),
            ))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(e)
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CodeArtifact {
    artifact_id: String,
}

/// CreateMicrovmImage's request. Recorded with the build (`buildRequest` in
/// GetMicrovmImage) so that `kiln image rebuild` can submit it again.
#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateImage {
    name: String,
    code_artifact: CodeArtifact,
    #[serde(default)]
    dockerfile: Option<String>,
    #[serde(default)]
    memory_size_mib: Option<u32>,
    #[serde(default)]
    vcpus: Option<u8>,
    /// CPUs the microVM is held to once its burst credit is spent (fractions allowed);
    /// it bursts to 4x. Default: a quarter of `vcpus`.
    #[serde(default)]
    cpu_baseline: Option<f64>,
    #[serde(default)]
    disk_size_mib: Option<u32>,
    #[serde(default)]
    hook_port: Option<u16>,
    #[serde(default)]
    ready_timeout_seconds: Option<u64>,
    #[serde(default)]
    wait_for_ready: Option<bool>,
    #[serde(default)]
    validate: Option<bool>,
    #[serde(default)]
    build_args: BTreeMap<String, String>,
    /// Accepted for compatibility with the seed's calls; kiln needs no roles.
    #[serde(default)]
    build_role_arn: Option<String>,
    #[serde(default)]
    base_image_arn: Option<String>,
    /// Egress connectors of the build's RUN steps; `[{"type": "internet"}]` when absent.
    #[serde(default)]
    connectors: Option<Vec<Connector>>,
}

/// Most a root disk may grow to, and longest a build may wait for `/ready`.
pub const MAX_DISK_MIB: u32 = 256 * 1024;
pub const MAX_READY_TIMEOUT_SECONDS: u64 = 3600;

/// Range checks of CreateMicrovmImage's numbers, before anything is started.
fn check_image_sizes(req: &CreateImage) -> ApiResult<()> {
    if let Some(d) = req
        .disk_size_mib
        .filter(|d| !(64..=MAX_DISK_MIB).contains(d))
    {
        return Err(ApiError::bad_request(format!(
            "diskSizeMib {d} must be 64 to {MAX_DISK_MIB}"
        )));
    }
    if let Some(t) = req
        .ready_timeout_seconds
        .filter(|t| !(1..=MAX_READY_TIMEOUT_SECONDS).contains(t))
    {
        return Err(ApiError::bad_request(format!(
            "readyTimeoutSeconds {t} must be 1 to {MAX_READY_TIMEOUT_SECONDS}"
        )));
    }
    if let Some(v) = req.vcpus.filter(|v| !(1..=8).contains(v)) {
        return Err(ApiError::bad_request(format!("vcpus {v} must be 1 to 8")));
    }
    if let Some(b) = req.cpu_baseline {
        crate::cpu::check_baseline(b).map_err(ApiError::bad_request)?;
    }
    Ok(())
}

async fn create_image(
    State(m): State<Arc<Manager>>,
    ApiJson(req): ApiJson<CreateImage>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let _ = (&req.build_role_arn, &req.base_image_arn);
    check_image_sizes(&req)?;
    let recorded = serde_json::to_value(&req).map_err(ApiError::internal)?;
    let id = &req.code_artifact.artifact_id;
    if !id.starts_with("art-") || !id[4..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(format!(
            "codeArtifact.artifactId {id:?} is not an artifact id"
        )));
    }
    let dir = crate::images::artifacts_dir(&m);
    let path = ["zip", "tar"]
        .iter()
        .map(|k| dir.join(format!("{id}.{k}")))
        .find(|p| p.is_file())
        .ok_or_else(|| ApiError::not_found("artifact", id))?;
    let connectors = req
        .connectors
        .unwrap_or_else(crate::egress::default_connectors);
    let policy = m.egress.compile(&connectors)?;
    let mut spec = BuildSpec::new(&req.name, &path);
    spec.request = Some(recorded);
    // Builds have no microVM id to attach events to: their denials are logged.
    spec.network = kiln_vmm::NetworkAttachment::egress(policy);
    if let Some(d) = req.dockerfile {
        spec.dockerfile = d;
    }
    spec.memory_mib = req.memory_size_mib.unwrap_or(512);
    let baseline = req
        .cpu_baseline
        .unwrap_or(f64::from(req.vcpus.unwrap_or(1)) / crate::cpu::BURST_FACTOR);
    crate::cpu::check_baseline(baseline).map_err(ApiError::bad_request)?;
    spec.cpu_baseline = baseline;
    spec.vcpus = req.vcpus.unwrap_or(1).max(crate::cpu::vcpus_for(baseline));
    spec.disk_mib = req.disk_size_mib;
    spec.hook_port = req
        .hook_port
        .unwrap_or(kiln_image::build::DEFAULT_HOOK_PORT);
    spec.ready_timeout = Duration::from_secs(req.ready_timeout_seconds.unwrap_or(60));
    spec.wait_ready = req.wait_for_ready.unwrap_or(true);
    spec.validate = req.validate.unwrap_or(false);
    spec.build_args = req.build_args;
    if !(512..=8192).contains(&spec.memory_mib) {
        return Err(ApiError::bad_request(format!(
            "memorySizeMib {} must be 512 to 8192",
            spec.memory_mib
        )));
    }
    if spec.name.is_empty()
        || spec.name.len() > 40
        || !spec
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ApiError::bad_request(
            "name: use 1-40 characters of a-z, 0-9 and '-'",
        ));
    }
    let name = spec.name.clone();
    let _admission = m.admission.lock().unwrap_or_else(|p| p.into_inner());
    let building = m.store().count_building_images()?;
    if building >= m.cfg.max_concurrent_builds {
        return Err(ApiError::quota(format!(
            "{building} image builds are running and the limit is {}: wait for one to finish, \
             or raise kilnd --max-concurrent-builds",
            m.cfg.max_concurrent_builds
        )));
    }
    let image_id = crate::images::start_build(&m, spec);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"imageIdentifier": image_id, "name": name, "status": "CREATING"})),
    ))
}

fn image_view(row: &kiln_store::ImageRow) -> Value {
    let r = &row.record;
    json!({
        "imageIdentifier": row.id,
        "name": row.name,
        "status": row.status,
        "statusReason": row.reason,
        "createdAt": row.created_at / 1000,
        "memorySizeMib": r["memory_mib"],
        "vcpus": r["vcpus"],
        "cpuBaseline": r["cpu_baseline"],
        "hookPort": r["hook_port"],
        "exposedPorts": r["runtime"]["exposed_ports"],
        "steps": r["steps"],
        "logTail": r["log_tail"],
        "buildRequest": r["request"],
    })
}

async fn list_images(State(m): State<Arc<Manager>>) -> ApiResult<Json<Value>> {
    let rows = m.store().images()?;
    Ok(Json(
        json!({"images": rows.iter().map(image_view).collect::<Vec<_>>()}),
    ))
}

async fn get_image(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = m
        .store()
        .image(&id)?
        .ok_or_else(|| ApiError::not_found("image", &id))?;
    Ok(Json(image_view(&row)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

async fn image_logs(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    let row = m
        .store()
        .image(&id)?
        .ok_or_else(|| ApiError::not_found("image", &id))?;
    let path = m.builder.build_dir(&row.name, &row.id).join("build.log");
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !q.follow {
        return Ok((text, std::fs::read_to_string(&path).unwrap_or_default()).into_response());
    }
    // Stream the log as it grows until the build is no longer CREATING.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    let (manager, image_id) = (m.clone(), row.id.clone());
    tokio::spawn(async move {
        // Only what was appended since the last read is read (the file is capped per build,
        // but a follower should cost nothing for the part it has).
        let mut sent = 0u64;
        loop {
            let done = manager
                .store()
                .image(&image_id)
                .ok()
                .flatten()
                .map(|r| r.status != "CREATING")
                .unwrap_or(true);
            loop {
                let chunk = read_from(&path, sent).await;
                if chunk.is_empty() {
                    break;
                }
                sent += chunk.len() as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok((text, axum::body::Body::from_stream(ChannelStream(rx))).into_response())
}

/// Up to 1 MiB of `path` from byte `offset` (empty at its end or if it cannot be read).
async fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(1 << 20).read_to_end(&mut buf).await;
    buf
}

/// A receiver as a body stream.
struct ChannelStream(tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>);

impl futures_core::Stream for ChannelStream {
    type Item = Result<Vec<u8>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

async fn delete_image(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let row = m
        .store()
        .image(&id)?
        .ok_or_else(|| ApiError::not_found("image", &id))?;
    let users = m.store().live_microvms_of_image(&row.id)?;
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "image {} is used by microVMs {users:?}: terminate them first",
            row.id
        )));
    }
    if row.status == "CREATING" {
        return Err(ApiError::conflict(format!(
            "image {} is still being built",
            row.id
        )));
    }
    m.store().delete_image(&row.id)?;
    let _ = std::fs::remove_dir_all(m.builder.build_dir(&row.name, &row.id));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunMicrovm {
    image_identifier: String,
    #[serde(default)]
    idle_policy: Option<IdlePolicy>,
    #[serde(default)]
    run_hook_payload: Option<String>,
    #[serde(default)]
    max_duration_seconds: Option<u64>,
    /// Accepted and ignored: kiln has no IAM roles.
    #[serde(default)]
    execution_role_arn: Option<String>,
    /// Egress connectors; `[{"type": "internet"}]` when absent.
    #[serde(default)]
    connectors: Option<Vec<Connector>>,
}

fn microvm_view(m: &Manager, row: &MicrovmRow) -> Value {
    let mut usage = row.usage.clone();
    if let (Some(live), Some(obj)) = (m.egress.counters(&row.id), usage.as_object_mut()) {
        obj.insert("network".into(), json!(live));
    }
    json!({
        "microvmId": row.id,
        "imageIdentifier": row.image_id,
        "imageName": row.image_name,
        "state": row.state,
        "stateReason": row.state_reason,
        "endpoint": m.endpoint(&row.id),
        "createdAt": row.created_at / 1000,
        "lastActivityAt": row.last_activity_at / 1000,
        "idlePolicy": row.config["idlePolicy"],
        "maxDurationSeconds": row.config["maxDurationSeconds"],
        "usage": usage,
        "connectors": row.config["connectors"],
        "resumeBlockedReason": m.not_resumable(&row.id),
    })
}

async fn run_microvm(
    State(m): State<Arc<Manager>>,
    ApiJson(req): ApiJson<RunMicrovm>,
) -> ApiResult<Json<Value>> {
    let _ = &req.execution_role_arn;
    let row = m.run(
        &req.image_identifier,
        req.idle_policy.unwrap_or_default(),
        req.run_hook_payload,
        req.max_duration_seconds,
        req.connectors,
    )?;
    Ok(Json(
        json!({"microvmId": row.id, "endpoint": m.endpoint(&row.id), "state": row.state}),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    image_identifier: Option<String>,
}

async fn list_microvms(
    State(m): State<Arc<Manager>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    if let Some(s) = &q.state {
        s.parse::<kiln_types::MicrovmState>()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let state = q.state.map(|s| s.to_ascii_uppercase());
    let rows = m
        .store()
        .microvms(state.as_deref(), q.image_identifier.as_deref())?;
    Ok(Json(
        json!({"microvms": rows.iter().map(|r| microvm_view(&m, r)).collect::<Vec<_>>()}),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GetQuery {
    /// Answer once the microVM is in this state (or TERMINATED), or when the wait ends.
    wait_for: Option<String>,
    /// How long to wait (default 60 s, at most `MAX_WAIT_SECONDS`).
    timeout_seconds: Option<u64>,
}

async fn get_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    Query(q): Query<GetQuery>,
) -> ApiResult<Json<Value>> {
    let row = match q.wait_for {
        None => m.row(&id)?,
        Some(state) => {
            let target: MicrovmState = state.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "waitFor must be PENDING, RUNNING, SUSPENDED, RESUMING or TERMINATED \
                     (got {state:?})"
                ))
            })?;
            let seconds = q.timeout_seconds.unwrap_or(60);
            if seconds > crate::manager::MAX_WAIT_SECONDS {
                return Err(ApiError::bad_request(format!(
                    "timeoutSeconds is at most {} (got {seconds})",
                    crate::manager::MAX_WAIT_SECONDS
                )));
            }
            m.wait_for(&id, target, Duration::from_secs(seconds))
                .await?
        }
    };
    Ok(Json(microvm_view(&m, &row)))
}

async fn suspend_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    m.row(&id)?;
    let row = m.suspend(&id, "SuspendMicrovm").await?;
    Ok(Json(microvm_view(&m, &row)))
}

async fn resume_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    m.row(&id)?;
    let row = m.resume(&id, "ResumeMicrovm").await?;
    Ok(Json(microvm_view(&m, &row)))
}

async fn terminate_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    m.row(&id)?;
    let row = m.terminate(&id, "TerminateMicrovm").await?;
    Ok(Json(microvm_view(&m, &row)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ExecBody {
    command: Vec<String>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AppLogsQuery {
    max_bytes: Option<u32>,
}

/// The app's output (stdout and stderr, interleaved) as the guest keeps it: the newest
/// `maxBytes` (64 KiB by default, 1 MiB at most).
async fn microvm_logs(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    Query(q): Query<AppLogsQuery>,
) -> ApiResult<Json<Value>> {
    let max = q.max_bytes.unwrap_or(64 << 10).clamp(1, 1 << 20);
    let logs = m.app_logs(&id, max).await?;
    Ok(Json(
        json!({"microvmId": id, "logs": String::from_utf8_lossy(&logs)}),
    ))
}

/// A SUSPENDED microVM's whole disk as one standalone qcow2 (its files, for a microVM this
/// host can no longer resume, or a backup).
async fn microvm_disk(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<axum::response::Response> {
    let (file, bytes) = m.export_disk(&id).await?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    axum::response::Response::builder()
        .header("content-type", "application/x-qemu-disk")
        .header("content-length", bytes)
        .header(
            "content-disposition",
            format!("attachment; filename=\"{id}.qcow2\""),
        )
        .body(body)
        .map_err(ApiError::internal)
}

async fn exec_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecBody>,
) -> ApiResult<Json<Value>> {
    m.row(&id)?;
    let out = m
        .exec(
            &id,
            req.command,
            Duration::from_secs(req.timeout_seconds.unwrap_or(60).clamp(1, 3600)),
        )
        .await?;
    Ok(Json(json!({
        "stdout": out.stdout_text(),
        "stderr": out.stderr_text(),
        "exitCode": out.status.code,
        "signal": out.status.signal,
        "timedOut": out.status.timed_out,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowedPort {
    port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateToken {
    microvm_identifier: String,
    expiration_in_minutes: u64,
    #[serde(default)]
    allowed_ports: Vec<AllowedPort>,
    #[serde(default)]
    kind: Option<kiln_proxy::token::TokenKind>,
}

/// How clients reach microVM endpoints: the ingress address, domain, whether it speaks TLS,
/// and kilnd's own CA certificate when it serves one (`--ingress-tls-self-signed`).
async fn ingress_info(State(m): State<Arc<Manager>>) -> ApiResult<Json<Value>> {
    let cfg = &m.cfg;
    let ca = crate::tls::own_ca(&cfg.home, cfg.ingress_tls_cert.as_deref())
        .map(std::fs::read_to_string)
        .transpose()
        .map_err(ApiError::internal)?;
    Ok(Json(json!({
        "domain": cfg.ingress_domain,
        "port": cfg.ingress_port,
        "listen": cfg.ingress_listen.to_string(),
        "tls": cfg.ingress_tls_cert.is_some(),
        "caCertificate": ca,
    })))
}

/// CreateMicrovmAuthToken: a token scoped to one microVM, its ports and an expiry.
async fn create_token(
    State(m): State<Arc<Manager>>,
    ApiJson(req): ApiJson<CreateToken>,
) -> ApiResult<Json<Value>> {
    use kiln_proxy::token::{TokenKind, MAX_EXPIRATION_MINUTES};
    if req.expiration_in_minutes == 0 || req.expiration_in_minutes > MAX_EXPIRATION_MINUTES {
        return Err(ApiError::bad_request(format!(
            "expirationInMinutes must be 1 to {MAX_EXPIRATION_MINUTES}"
        )));
    }
    let row = m.row(&req.microvm_identifier)?;
    if row.state == "TERMINATED" {
        return Err(ApiError::conflict(format!(
            "microVM {} is TERMINATED",
            row.id
        )));
    }
    let mut ports: Vec<u16> = req.allowed_ports.iter().map(|p| p.port).collect();
    if ports.is_empty() {
        ports.push(kiln_proxy::server::DEFAULT_PORT);
    }
    if ports.contains(&0) {
        return Err(ApiError::bad_request("allowedPorts: port 0 is not a port"));
    }
    let hook_port = row.config["hookPort"].as_u64().unwrap_or(0) as u16;
    if ports.contains(&hook_port) {
        return Err(ApiError::bad_request(format!(
            "allowedPorts: {hook_port} is the lifecycle hook port, which is never reachable"
        )));
    }
    let claims = m.tokens.claims(
        &row.id,
        ports,
        req.expiration_in_minutes,
        req.kind.unwrap_or(TokenKind::Ingress),
    );
    let token = m.tokens.issue(&claims);
    Ok(Json(json!({
        "authToken": {"X-aws-proxy-auth": token, "X-Kiln-Auth": token},
        "tokenId": claims.jti,
        "expiresAt": claims.exp,
        "endpoint": m.endpoint(&row.id),
    })))
}

async fn revoke_token(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    m.tokens.revoke_token(&id);
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke_microvm_tokens(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    m.row(&id)?;
    m.tokens.revoke_microvm(&id);
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_token_key(State(m): State<Arc<Manager>>) -> ApiResult<Json<Value>> {
    let kid = m.tokens.rotate().map_err(ApiError::internal)?;
    Ok(Json(json!({"keyId": kid})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<i64>,
    limit: Option<i64>,
}

async fn events(
    State(m): State<Arc<Manager>>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Json<Value>> {
    let since = q.since.unwrap_or(0);
    let events = m
        .store()
        .events_since(since, q.limit.unwrap_or(100).clamp(1, 1000))?;
    let next = events.last().map(|e| e.seq).unwrap_or(since);
    Ok(Json(json!({"events": events, "nextCursor": next})))
}
