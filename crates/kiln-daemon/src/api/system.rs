//! kilnd itself (health, metrics, events, the ingress) and the ingress's auth tokens.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::{
    AuthTokenHeaders, CreateTokenRequest, CreateTokenResponse, ErrorBody, Event, EventList,
    EventsQuery, Health, ImageStatus, IngressInfo, JailInfo, MicrovmState, RotateKeyResponse,
    TokenKind,
};

use super::{ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

#[utoipa::path(
    get, path = "/health", operation_id = "Health", tag = "system",
    description = "Whether kilnd runs, its accelerator, and its jail. Needs no key.",
    responses((status = 200, description = "kilnd runs", body = Health))
)]
pub async fn health(State(m): State<Arc<Manager>>) -> Json<Health> {
    let dev = m.accel.is_dev_mode();
    let jail = match &m.confinement {
        kiln_vmm::Confinement::Jailed(limits) => {
            let facts = kiln_jail::facts(&limits.partition);
            JailInfo {
                enabled: true,
                warning: None,
                uid_range: Some(facts.uid_range),
                uids_in_use: Some(facts.uids_in_use),
                namespaces: facts.namespaces.iter().map(|n| n.to_string()).collect(),
                cgroups: facts.cgroups,
                seccomp: Some(facts.seccomp),
            }
        }
        kiln_vmm::Confinement::Unjailed => JailInfo {
            enabled: false,
            warning: Some("--no-jail: QEMU runs unjailed (development only)".into()),
            uid_range: None,
            uids_in_use: None,
            namespaces: Vec::new(),
            cgroups: Vec::new(),
            seccomp: None,
        },
    };
    Json(Health {
        status: "ok".into(),
        accelerator: m.accel.as_str().into(),
        dev_mode: dev,
        warning: dev.then(|| kiln_vmm::accel::DEV_MODE_WARNING.to_string()),
        jail,
    })
}

/// Per-microVM metering (microVMs not yet terminated), as the seed bills: running seconds,
/// CPU above the baseline (burst), suspended snapshot byte-seconds; plus CPU and credit.
fn pool_metrics(pool: &crate::pool::Pool, out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    out.push_str(&format!(
        "# HELP kiln_prestarted_qemus QEMUs started ahead, waiting for a launch of their image.\n\
         # TYPE kiln_prestarted_qemus gauge\nkiln_prestarted_qemus {}\n\
         # HELP kiln_launches_total Launches since kilnd started, by whether a QEMU started ahead served them.\n\
         # TYPE kiln_launches_total counter\n\
         kiln_launches_total{{qemu=\"prestarted\"}} {}\nkiln_launches_total{{qemu=\"started\"}} {}\n",
        pool.len(),
        pool.served.load(Relaxed),
        pool.started.load(Relaxed)
    ));
}

/// What this node's rounds of object storage collection removed.
fn gc_metrics(gc: &crate::gc::GcCounters, out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    out.push_str(&format!(
        "# HELP kiln_blob_gc_rounds_total Rounds of object storage collection this node ran.\n\
         # TYPE kiln_blob_gc_rounds_total counter\nkiln_blob_gc_rounds_total {}\n\
         # HELP kiln_blob_gc_deleted_total Blobs no image or snapshot named, removed from object storage.\n\
         # TYPE kiln_blob_gc_deleted_total counter\nkiln_blob_gc_deleted_total {}\n\
         # HELP kiln_blob_gc_deleted_bytes_total Bytes of those blobs.\n\
         # TYPE kiln_blob_gc_deleted_bytes_total counter\nkiln_blob_gc_deleted_bytes_total {}\n",
        gc.rounds.load(Relaxed),
        gc.deleted.load(Relaxed),
        gc.bytes.load(Relaxed)
    ));
}

/// The newest sample of every RUNNING microVM as gauges and counters, with `microvm` and
/// `image` labels (see `crate::metrics`).
fn live_metrics(m: &Manager, rows: &[kiln_store::MicrovmRow], out: &mut String) {
    let live: Vec<(&kiln_store::MicrovmRow, kiln_api::MicrovmMetrics)> = rows
        .iter()
        .filter(|r| r.state == MicrovmState::Running)
        .filter_map(|r| m.metrics.latest(&r.id).map(|s| (r, s)))
        .collect();
    type Value = fn(&kiln_api::MicrovmMetrics) -> Option<f64>;
    let series: [(&str, &str, &str, &str, Value); 8] = [
        ("kiln_microvm_cpu_percent", "gauge", "", "CPU used over the last tick, percent of one CPU.", |s| Some(s.cpu_percent)),
        ("kiln_microvm_memory_bytes", "gauge", "host", "Memory: the QEMU's PSS on the host (host), the guest's total and available (guest_*).", |s| Some(s.host_memory_bytes as f64)),
        ("kiln_microvm_memory_bytes", "", "guest_total", "", |s| s.guest_memory_total_bytes.map(|v| v as f64)),
        ("kiln_microvm_memory_bytes", "", "guest_available", "", |s| s.guest_memory_available_bytes.map(|v| v as f64)),
        ("kiln_microvm_disk_bytes", "gauge", "host", "Disk: the overlay's blocks on the host (host), the guest root filesystem's size and use (guest_*).", |s| Some(s.host_disk_bytes as f64)),
        ("kiln_microvm_disk_bytes", "", "guest_total", "", |s| s.guest_disk_total_bytes.map(|v| v as f64)),
        ("kiln_microvm_disk_bytes", "", "guest_used", "", |s| s.guest_disk_used_bytes.map(|v| v as f64)),
        ("kiln_microvm_network_bytes_total", "counter", "", "Bytes through the egress backend since launch, by direction.", |_| None),
    ];
    for (name, kind, which, help, value) in series {
        if !kind.is_empty() {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        }
        for (r, s) in &live {
            let labels = format!("microvm=\"{}\",image=\"{}\"", r.id, r.image_name);
            if name == "kiln_microvm_network_bytes_total" {
                out.push_str(&format!(
                    "{name}{{{labels},direction=\"in\"}} {}\n",
                    s.network_bytes_in
                ));
                out.push_str(&format!(
                    "{name}{{{labels},direction=\"out\"}} {}\n",
                    s.network_bytes_out
                ));
            } else if let Some(v) = value(s) {
                let kind_label = if which.is_empty() {
                    String::new()
                } else {
                    format!(",kind=\"{which}\"")
                };
                out.push_str(&format!("{name}{{{labels}{kind_label}}} {v}\n"));
            }
        }
    }
}

fn metering(rows: &[kiln_store::MicrovmRow], out: &mut String) {
    type Field = fn(&kiln_api::Usage) -> f64;
    let series: [(&str, &str, Field, &str); 5] = [
        (
            "kiln_microvm_running_seconds_total",
            "counter",
            |u| u.running_seconds,
            "Seconds a microVM ran.",
        ),
        (
            "kiln_microvm_cpu_seconds_total",
            "counter",
            |u| u.cpu_seconds,
            "CPU-seconds a microVM used (its cgroup).",
        ),
        (
            "kiln_microvm_burst_cpu_seconds_total",
            "counter",
            |u| u.cpu_seconds_above_baseline,
            "CPU-seconds above the microVM's baseline.",
        ),
        (
            "kiln_microvm_suspended_snapshot_byte_seconds_total",
            "counter",
            |u| u.suspended_snapshot_byte_seconds,
            "Byte-seconds of suspended snapshot state.",
        ),
        (
            "kiln_microvm_cpu_credit_seconds",
            "gauge",
            |u| u.cpu_credit_seconds,
            "Burst credit left (CPU-seconds above the baseline).",
        ),
    ];
    let live: Vec<(&kiln_store::MicrovmRow, kiln_api::Usage)> = rows
        .iter()
        .filter(|r| r.state != MicrovmState::Terminated)
        .map(|r| {
            (
                r,
                serde_json::from_value(r.usage.clone()).unwrap_or_default(),
            )
        })
        .collect();
    for (name, kind, field, help) in series {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (r, usage) in &live {
            out.push_str(&format!(
                "{name}{{microvm=\"{}\",image=\"{}\"}} {}\n",
                r.id,
                r.image_name,
                field(usage)
            ));
        }
    }
}

#[utoipa::path(
    get, path = "/metrics", operation_id = "Metrics", tag = "system",
    description = "Prometheus metrics: microVMs by state, images by status, per-microVM \
        metering. Needs no key.",
    responses(
        (status = 200, description = "Prometheus text format", body = String,
            content_type = "text/plain; version=0.0.4"),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn metrics(State(m): State<Arc<Manager>>) -> ApiResult<Response> {
    let rows = crate::cluster::own_microvms(&m, None)?;
    let mut out =
        String::from("# HELP kiln_microvms MicroVMs by state.\n# TYPE kiln_microvms gauge\n");
    for state in MicrovmState::ALL {
        let n = rows.iter().filter(|r| r.state == state).count();
        out.push_str(&format!("kiln_microvms{{state=\"{state}\"}} {n}\n"));
    }
    metering(&rows, &mut out);
    live_metrics(&m, &rows, &mut out);
    out.push_str("# HELP kiln_images Images by latest build status.\n# TYPE kiln_images gauge\n");
    let images = m.store().images()?;
    for status in ImageStatus::ALL {
        let n = images.iter().filter(|i| i.status == status).count();
        out.push_str(&format!("kiln_images{{status=\"{status}\"}} {n}\n"));
    }
    out.push_str(&format!("# HELP kiln_dev_mode 1 when guests run under emulation.\n# TYPE kiln_dev_mode gauge\nkiln_dev_mode {}\n", u8::from(m.accel.is_dev_mode())));
    pool_metrics(&m.pool, &mut out);
    if m.blobs.is_some() {
        gc_metrics(&m.gc, &mut out);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

pub(super) fn event_view(e: kiln_store::EventRow) -> Event {
    Event {
        seq: e.seq,
        at_ms: e.at_ms,
        microvm_id: e.microvm_id,
        image_id: e.image_id,
        kind: e.kind,
        from_state: e.from_state,
        to_state: e.to_state,
        reason: e.reason,
    }
}

#[utoipa::path(
    get, path = "/v1/events", operation_id = "ListEvents", tag = "system", security(("bearer" = [])),
    description = "Lifecycle events, oldest first, after a cursor.",
    params(EventsQuery),
    responses(
        (status = 200, description = "Events and the next cursor", body = EventList),
        (status = 400, description = "A malformed query", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn events(
    State(m): State<Arc<Manager>>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Json<EventList>> {
    let since = q.since.unwrap_or(0);
    if since < 0 {
        return Err(ApiError::bad_request(format!(
            "since {since} must be 0 or more"
        )));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} must be 1 to 1000"
        )));
    }
    let rows = m.store().events_since(since, limit)?;
    let next_cursor = rows.last().map(|e| e.seq).unwrap_or(since);
    let events = rows.into_iter().map(event_view).collect();
    Ok(Json(EventList {
        events,
        next_cursor,
    }))
}

#[utoipa::path(
    get, path = "/v1/ingress", operation_id = "GetIngress", tag = "system", security(("bearer" = [])),
    description = "How clients reach microVM endpoints: the ingress address, domain, whether \
        it speaks TLS, and kilnd's own CA certificate when it serves one.",
    responses(
        (status = 200, description = "The ingress", body = IngressInfo),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn ingress_info(State(m): State<Arc<Manager>>) -> ApiResult<Json<IngressInfo>> {
    let cfg = &m.cfg;
    let ca = crate::tls::own_ca(&cfg.home, cfg.ingress_tls_cert.as_deref())
        .map(std::fs::read_to_string)
        .transpose()
        .map_err(ApiError::internal)?;
    Ok(Json(IngressInfo {
        domain: cfg.ingress_domain.clone(),
        port: cfg.ingress_port,
        endpoint_style: match cfg.endpoint_style {
            crate::config::EndpointStyle::Path => kiln_api::EndpointStyle::Path,
            _ => kiln_api::EndpointStyle::Host,
        },
        listen: cfg.ingress_listen.to_string(),
        tls: cfg.ingress_tls_cert.is_some(),
        ca_certificate: ca,
    }))
}

#[utoipa::path(
    post, path = "/v1/auth-tokens", operation_id = "CreateMicrovmAuthToken", tag = "tokens", security(("bearer" = [])),
    description = "CreateMicrovmAuthToken: a token scoped to one microVM, its ports and an \
        expiry, for the ingress.",
    request_body = CreateTokenRequest,
    responses(
        (status = 200, description = "The token", body = CreateTokenResponse),
        (status = 400, description = "A value is out of range or malformed", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "The microVM is TERMINATED", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn create_token(
    State(m): State<Arc<Manager>>,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> ApiResult<Json<CreateTokenResponse>> {
    use kiln_proxy::token::MAX_EXPIRATION_MINUTES;
    if req.expiration_in_minutes == 0 || req.expiration_in_minutes > MAX_EXPIRATION_MINUTES {
        return Err(ApiError::bad_request(format!(
            "expirationInMinutes must be 1 to {MAX_EXPIRATION_MINUTES}"
        )));
    }
    let mut ports: Vec<u16> = req.allowed_ports.iter().map(|p| p.port).collect();
    if ports.is_empty() {
        ports.push(kiln_proxy::server::DEFAULT_PORT);
    }
    if ports.contains(&0) {
        return Err(ApiError::bad_request("allowedPorts: port 0 is not a port"));
    }
    let row = m.row(&req.microvm_identifier)?;
    if row.state == MicrovmState::Terminated {
        return Err(ApiError::conflict(format!(
            "microVM {} is TERMINATED",
            row.id
        )));
    }
    let hook_port = Manager::config_of(&row)?.hook_port;
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
    Ok(Json(CreateTokenResponse {
        auth_token: AuthTokenHeaders {
            aws_proxy_auth: token.clone(),
            kiln_auth: token,
        },
        token_id: claims.jti,
        expires_at: claims.exp,
        endpoint: m.endpoint(&row.id),
    }))
}

#[utoipa::path(
    delete, path = "/v1/auth-tokens/{id}", operation_id = "RevokeAuthToken", tag = "tokens", security(("bearer" = [])),
    description = "Revokes one token (by its tokenId). Revoking an unknown id is no error.",
    params(("id" = String, Path, description = "The token's tokenId")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
    )
)]
pub async fn revoke_token(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    m.tokens.revoke_token(&id);
    crate::cluster::share_tokens(&m);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/revoke-tokens", operation_id = "RevokeMicrovmAuthTokens", tag = "tokens", security(("bearer" = [])),
    description = "Revokes every token of a microVM issued until now.",
    params(("id" = String, Path, description = "The microVM's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn revoke_microvm_tokens(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    m.row(&id)?;
    m.tokens.revoke_microvm(&id);
    crate::cluster::share_tokens(&m);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/v1/auth-tokens/rotate-key", operation_id = "RotateAuthTokenKey", tag = "tokens", security(("bearer" = [])),
    description = "Makes a new signing key current; tokens signed before stay valid until \
        they expire.",
    responses(
        (status = 200, description = "The new key's id", body = RotateKeyResponse),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 500, description = "kilnd could not write the key file", body = ErrorBody),
    )
)]
pub async fn rotate_token_key(State(m): State<Arc<Manager>>) -> ApiResult<Json<RotateKeyResponse>> {
    let key_id = m
        .tokens
        .rotate_with(&kiln_vmm::fault::point)
        .map_err(ApiError::internal)?;
    crate::cluster::share_tokens(&m);
    Ok(Json(RotateKeyResponse { key_id }))
}
