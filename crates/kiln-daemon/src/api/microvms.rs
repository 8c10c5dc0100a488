//! MicroVMs: RunMicrovm, Get/ListMicrovms, suspend, resume, fork, save as image, terminate,
//! exec, logs, disk.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::{
    AppLogs, AppLogsQuery, CreateImageResponse, ErrorBody, ExecRequest, ExecResponse,
    ForkMicrovmRequest, ForkMicrovmResponse, GetMicrovmQuery, ListMicrovmsQuery, MetricsQuery,
    Microvm, MicrovmList, MicrovmMetricsHistory, RunMicrovmRequest, RunMicrovmResponse,
    SaveMicrovmImageRequest, UpdateLabelsRequest, MAX_WAIT_SECONDS,
};
use kiln_store::MicrovmRow;

use super::{ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

/// A microVM row as the API shows it, with live network counters while it runs.
pub fn microvm_view(m: &Manager, row: &MicrovmRow) -> Microvm {
    microvm_view_in(m, row, None)
}

/// [`microvm_view`], with what its owner, another node, last shared of it (`crate::live`).
pub fn microvm_view_in(
    m: &Manager,
    row: &MicrovmRow,
    shared: Option<&crate::live::LiveVm>,
) -> Microvm {
    let config = Manager::config_of(row).ok();
    let mut usage: kiln_api::Usage = serde_json::from_value(row.usage.clone()).unwrap_or_default();
    if let Some(live) = m
        .egress
        .counters(&row.id)
        .or_else(|| shared.and_then(|s| s.network))
    {
        usage.network = live;
    }
    Microvm {
        microvm_id: row.id.clone(),
        image_identifier: row.image_id.clone(),
        image_name: row.image_name.clone(),
        state: row.state,
        state_reason: row.state_reason.clone(),
        endpoint: m.endpoint(&row.id),
        created_at: row.created_at / 1000,
        last_activity_at: m.last_activity(&row.id, row.last_activity_at) / 1000,
        idle_policy: config
            .as_ref()
            .map(|c| c.idle_policy.clone())
            .unwrap_or_default(),
        max_duration_seconds: config.as_ref().map_or(0, |c| c.max_duration_seconds),
        usage,
        connectors: config.map(|c| c.connectors).unwrap_or_default(),
        resume_blocked_reason: m.not_resumable(&row.id),
        labels: row.labels.clone(),
        metrics: (row.state == kiln_api::MicrovmState::Running)
            .then(|| {
                m.metrics
                    .latest(&row.id)
                    .or_else(|| shared.and_then(|s| s.metrics.clone()))
            })
            .flatten(),
        node: row.node.clone(),
        unreachable: crate::cluster::unreachable(m, row),
    }
}

#[utoipa::path(
    post, path = "/v1/microvms", operation_id = "RunMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "RunMicrovm: launches a microVM from an image's snapshot. Answers at once \
        (PENDING); GET /v1/microvms/{id}?waitFor=RUNNING waits for it.",
    request_body = RunMicrovmRequest,
    responses(
        (status = 200, description = "Launching", body = RunMicrovmResponse),
        (status = 400, description = "A value is out of range or malformed", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 409, description = "The image is not SUCCESSFUL", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 429, description = "--max-microvms are not TERMINATED, the node's --capacity-memory-mib (in a cluster: every reachable node's) is taken, or KILN_HOME's disk is at --min-free-disk-mib", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn run_microvm(
    State(m): State<Arc<Manager>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<RunMicrovmRequest>,
) -> ApiResult<Response> {
    use crate::placement::Target;
    // In a cluster: on the node with the most room that can run the image (see
    // `placement`), the next one if that one turns out full.
    let forwarded = headers.contains_key(crate::cluster::FORWARDED_BY);
    let targets = crate::placement::targets(&m, &req.image_identifier, forwarded)?;
    let last = targets.len().saturating_sub(1);
    for (i, target) in targets.into_iter().enumerate() {
        let more = i < last;
        match target {
            Target::Here => {
                let template = crate::placement::template_here(&m, &req.image_identifier).await?;
                match m.run(req.clone(), template) {
                    Ok(row) => {
                        return Ok(Json(RunMicrovmResponse {
                            endpoint: m.endpoint(&row.id),
                            microvm_id: row.id,
                            state: row.state,
                        })
                        .into_response())
                    }
                    Err(e)
                        if more && e.code == kiln_api::ErrorCode::ServiceQuotaExceededException =>
                    {
                        tracing::info!("placing on the next node: {}", e.message);
                    }
                    Err(e) => return Err(e),
                }
            }
            Target::Node(node) => {
                match crate::cluster::forward_json(&m, &node, "/v1/microvms", &req).await {
                    Ok(r) if more && r.status() == StatusCode::TOO_MANY_REQUESTS => {
                        tracing::info!(
                            node = node.name,
                            "full after all: placing on the next node"
                        );
                    }
                    Err(e) if more => {
                        tracing::info!(node = node.name, "placing on the next node: {}", e.message);
                    }
                    other => return other,
                }
            }
        }
    }
    Err(ApiError::internal("no node to place the microVM on"))
}

#[utoipa::path(
    get, path = "/v1/microvms", operation_id = "ListMicrovms", tag = "microvms", security(("bearer" = [])),
    description = "ListMicrovms: oldest first, one page at a time (`limit`, then `cursor` = \
        the previous page's `nextCursor`), filtered on the server by state, image and labels \
        (`label=team=a&label=env`: every one must match).",
    params(ListMicrovmsQuery),
    responses(
        (status = 200, description = "The microVMs", body = MicrovmList),
        (status = 400, description = "A malformed query", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn list_microvms(
    State(m): State<Arc<Manager>>,
    ApiQuery(q): ApiQuery<ListMicrovmsQuery>,
) -> ApiResult<Json<MicrovmList>> {
    let filters = super::list::filters(&q.label)?;
    let image = q.image_identifier.as_deref().or(q.image.as_deref());
    let rows: Vec<MicrovmRow> = m
        .store()
        .microvms(q.state, image)?
        .into_iter()
        .filter(|r| super::list::matches(&filters, &r.labels))
        .collect();
    let (rows, next_cursor) = super::list::page(
        rows,
        |r| super::list::by_age(r.created_at, &r.id),
        q.limit,
        q.cursor.as_deref(),
    )?;
    Ok(Json(MicrovmList {
        microvms: {
            // Another node's RUNNING microVMs: their live figures as it last shared them.
            let shared = crate::live::of_others(&m, &rows);
            rows.iter()
                .map(|r| microvm_view_in(&m, r, shared.get(&r.id)))
                .collect()
        },
        next_cursor,
    }))
}

#[utoipa::path(
    patch, path = "/v1/microvms/{id}", operation_id = "UpdateMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "UpdateMicrovm: sets labels (a value) and removes them (`null`); labels \
        not named are kept. Any state, TERMINATED included.",
    params(("id" = String, Path, description = "The microVM's id")),
    request_body = UpdateLabelsRequest,
    responses(
        (status = 200, description = "The microVM", body = Microvm),
        (status = 400, description = "A label is malformed, or there would be over 64", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn update_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateLabelsRequest>,
) -> ApiResult<Json<Microvm>> {
    // Read, merge and write under the store's lock: concurrent updates never lose one.
    let found = m.write(|s| -> ApiResult<bool> {
        let Some(row) = s.microvm(&id)? else {
            return Ok(false);
        };
        let labels = kiln_types::labels::merge(&row.labels, &req.labels)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(s.set_microvm_labels(&id, &labels)?)
    })?;
    if !found {
        return Err(ApiError::not_found("microVM", &id));
    }
    Ok(Json(microvm_view(&m, &m.row(&id)?)))
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}", operation_id = "GetMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "GetMicrovm. With `waitFor`, answers once the microVM is in that state (or \
        TERMINATED), or after `timeoutSeconds` with the microVM as it is then: no polling.",
    params(("id" = String, Path, description = "The microVM's id"), GetMicrovmQuery),
    responses(
        (status = 200, description = "The microVM", body = Microvm),
        (status = 400, description = "A malformed query", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn get_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<GetMicrovmQuery>,
) -> ApiResult<Json<Microvm>> {
    let seconds = q.timeout_seconds.unwrap_or(60);
    if seconds > MAX_WAIT_SECONDS {
        return Err(ApiError::bad_request(format!(
            "timeoutSeconds is at most {MAX_WAIT_SECONDS} (got {seconds})"
        )));
    }
    let row = match q.wait_for {
        None => m.row(&id)?,
        Some(target) => {
            m.wait_for(&id, target, Duration::from_secs(seconds))
                .await?
        }
    };
    Ok(Json(microvm_view(&m, &row)))
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/suspend", operation_id = "SuspendMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "SuspendMicrovm: runs the app's /suspend hook, then saves memory and disk.",
    params(("id" = String, Path, description = "The microVM's id")),
    responses(
        (status = 200, description = "SUSPENDED (or TERMINATED if saving failed)", body = Microvm),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 429, description = "Its memory does not fit above --min-free-disk-mib: it keeps running", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn suspend_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Microvm>> {
    m.row(&id)?;
    let row = m.suspend(&id, "SuspendMicrovm").await?;
    Ok(Json(microvm_view(&m, &row)))
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/fork", operation_id = "ForkMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "ForkMicrovm: pauses a RUNNING microVM for a moment and copies its memory, \
        processes and disk into `count` new microVMs (each its own id, endpoint, tokens, random \
        seed and VM generation ID; the app's /resume hook runs in each). The parent runs on. \
        Answers once the clones are recorded; GET /v1/microvms/{id}?waitFor=RUNNING waits for one.",
    params(("id" = String, Path, description = "The microVM to copy")),
    request_body = ForkMicrovmRequest,
    responses(
        (status = 200, description = "The clones, on their way to RUNNING", body = ForkMicrovmResponse),
        (status = 400, description = "count is not 1 to 100, or the body is malformed", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not RUNNING, or it cannot be copied (the parent runs on)", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 429, description = "The clones would pass --max-microvms or the node's --capacity-memory-mib, or KILN_HOME's disk is at --min-free-disk-mib", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn fork_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ForkMicrovmRequest>,
) -> ApiResult<Json<ForkMicrovmResponse>> {
    let rows = m.fork(&id, req.count.unwrap_or(1)).await?;
    Ok(Json(ForkMicrovmResponse {
        parent_microvm_id: id,
        microvms: rows
            .into_iter()
            .map(|row| RunMicrovmResponse {
                endpoint: m.endpoint(&row.id),
                microvm_id: row.id,
                state: row.state,
            })
            .collect(),
    }))
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/image", operation_id = "SaveMicrovmImage", tag = "microvms", security(("bearer" = [])),
    description = "SaveMicrovmImage (\"save as image\"): pauses a RUNNING microVM for a moment \
        and makes its memory, processes and disk a new image that RunMicrovm launches like any \
        other (the image's hook port, sizing and hooks are its source image's). The microVM runs \
        on. Answers once its state is captured, with the image CREATING while its template is \
        written; GET /v1/images/{id} shows it SUCCESSFUL (or FAILED and why).",
    params(("id" = String, Path, description = "The microVM to save")),
    request_body = SaveMicrovmImageRequest,
    responses(
        (status = 202, description = "Captured; the image is CREATING", body = CreateImageResponse),
        (status = 400, description = "The name is not valid, or the body is malformed", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not RUNNING or cannot be copied (it runs on), or the name has a Dockerfile build", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 429, description = "KILN_HOME's disk is at --min-free-disk-mib or --max-disk-mib", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn save_microvm_image(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SaveMicrovmImageRequest>,
) -> ApiResult<(StatusCode, Json<CreateImageResponse>)> {
    let saved = m.save_image(&id, &req.name, req.labels).await?;
    Ok((StatusCode::ACCEPTED, Json(saved)))
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/resume", operation_id = "ResumeMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "ResumeMicrovm: restores a SUSPENDED microVM and runs the app's /resume hook.",
    params(("id" = String, Path, description = "The microVM's id")),
    responses(
        (status = 200, description = "RUNNING (or TERMINATED if restoring failed)", body = Microvm),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not SUSPENDED, or this host cannot resume it", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn resume_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Microvm>> {
    m.row(&id)?;
    let row = m.resume(&id, "ResumeMicrovm").await?;
    Ok(Json(microvm_view(&m, &row)))
}

async fn terminate(m: Arc<Manager>, id: String) -> ApiResult<Json<Microvm>> {
    m.row(&id)?;
    let row = m.terminate(&id, "TerminateMicrovm").await?;
    Ok(Json(microvm_view(&m, &row)))
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/terminate", operation_id = "TerminateMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "TerminateMicrovm: runs the app's /terminate hook, stops it, deletes its files.",
    params(("id" = String, Path, description = "The microVM's id")),
    responses(
        (status = 200, description = "TERMINATED", body = Microvm),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is already TERMINATED", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn terminate_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Microvm>> {
    terminate(m, id).await
}

#[utoipa::path(
    delete, path = "/v1/microvms/{id}", operation_id = "DeleteMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "TerminateMicrovm, as a DELETE.",
    params(("id" = String, Path, description = "The microVM's id")),
    responses(
        (status = 200, description = "TERMINATED", body = Microvm),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is already TERMINATED", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn delete_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Microvm>> {
    terminate(m, id).await
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/metrics", operation_id = "GetMicrovmMetrics", tag = "microvms", security(("bearer" = [])),
    description = "GetMicrovmMetrics: the samples kilnd keeps of a RUNNING microVM (one per \
        `--tick-ms`, the last 300, oldest first): CPU, host memory (PSS) and disk, the guest's \
        own memory and disk figures, network bytes. Empty for a microVM that is not running; \
        kept in memory only (a restart of kilnd starts the history again).",
    params(("id" = String, Path, description = "The microVM's id"), MetricsQuery),
    responses(
        (status = 200, description = "The samples", body = MicrovmMetricsHistory),
        (status = 400, description = "A malformed query", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn microvm_metrics(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<MetricsQuery>,
) -> ApiResult<Json<MicrovmMetricsHistory>> {
    if let Some(t) = q.since_ms.filter(|t| *t < 0) {
        return Err(ApiError::bad_request(format!(
            "sinceMs is a time in Unix milliseconds, 0 or more (got {t})"
        )));
    }
    let row = m.row(&id)?;
    Ok(Json(MicrovmMetricsHistory {
        samples: m.metrics.history(&row.id, q.since_ms),
        microvm_id: row.id,
        interval_ms: m.cfg.tick.as_millis() as u64,
    }))
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/logs", operation_id = "GetMicrovmLogs", tag = "microvms", security(("bearer" = [])),
    description = "The app's output (stdout and stderr, interleaved) as the guest keeps it. \
        Reading logs is not activity: it does not keep a microVM from idling.",
    params(("id" = String, Path, description = "The microVM's id"), AppLogsQuery),
    responses(
        (status = 200, description = "The newest `maxBytes` of output", body = AppLogs),
        (status = 400, description = "A malformed query", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not RUNNING (answered at once, never waits)", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn microvm_logs(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<AppLogsQuery>,
) -> ApiResult<Json<AppLogs>> {
    let max = q.max_bytes.unwrap_or(64 << 10).clamp(1, 1 << 20);
    let logs = m.app_logs(&id, max).await?;
    Ok(Json(AppLogs {
        microvm_id: id,
        logs: String::from_utf8_lossy(&logs).into_owned(),
    }))
}

/// A disk download's body, for the spec.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct DiskBytes(#[allow(dead_code)] Vec<u8>);

#[utoipa::path(
    get, path = "/v1/microvms/{id}/disk", operation_id = "GetMicrovmDisk", tag = "microvms", security(("bearer" = [])),
    description = "A SUSPENDED microVM's whole disk as one standalone qcow2 (its files, for a \
        microVM this host can no longer resume, or a backup).",
    params(("id" = String, Path, description = "The microVM's id")),
    responses(
        (status = 200, description = "The disk", body = DiskBytes, content_type = "application/x-qemu-disk"),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not SUSPENDED", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn microvm_disk(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<axum::response::Response> {
    m.row(&id)?;
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

#[utoipa::path(
    post, path = "/v1/microvms/{id}/exec", operation_id = "ExecMicrovm", tag = "microvms", security(("bearer" = [])),
    description = "Runs a command in a RUNNING microVM and answers with its output (8 MiB at \
        most). An exec counts as activity.",
    params(("id" = String, Path, description = "The microVM's id")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "It ran (see exitCode, signal, timedOut)", body = ExecResponse),
        (status = 400, description = "No program, or a malformed body", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not RUNNING (answered at once, never waits)", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn exec_microvm(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    m.row(&id)?;
    let timeout = req.timeout_seconds.unwrap_or(60);
    if !(1..=3600).contains(&timeout) {
        return Err(ApiError::bad_request(format!(
            "timeoutSeconds {timeout} must be 1 to 3600"
        )));
    }
    let out = m
        .exec(&id, req.command, Duration::from_secs(timeout))
        .await?;
    Ok(Json(ExecResponse {
        stdout: out.stdout_text(),
        stderr: out.stderr_text(),
        exit_code: out.status.code,
        signal: out.status.signal,
        timed_out: out.status.timed_out,
    }))
}
