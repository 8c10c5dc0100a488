//! Images: artifacts, CreateMicrovmImage, Get/List/DeleteMicrovmImage, build logs.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_api::{
    Artifact, ArtifactFormat, CreateImageRequest, CreateImageResponse, ErrorBody, ErrorCode, Image,
    ImageList, ImageStatus, ListImagesQuery, LogsQuery, UpdateLabelsRequest, MAX_DISK_MIB,
    MAX_READY_TIMEOUT_SECONDS,
};
use kiln_image::BuildSpec;

use super::{ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

/// Body of an artifact upload, for the spec: the archive's bytes.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ArchiveBytes(#[allow(dead_code)] Vec<u8>);

// Streams an upload to disk (never whole in memory), under `--max-artifact-mib`, then
// names it with a random id: two uploads at once never share a name.
#[utoipa::path(
    post, path = "/v1/artifacts", operation_id = "UploadArtifact", tag = "images", security(("bearer" = [])),
    description = "Uploads a build context: a zip or tar archive (at most kilnd \
        --max-artifact-mib). Give its `artifactId` to CreateMicrovmImage.",
    request_body(content = ArchiveBytes, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Stored", body = Artifact),
        (status = 400, description = "Not a zip or tar archive", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 413, description = "Over --max-artifact-mib", body = ErrorBody),
        (status = 429, description = "KILN_HOME's disk is at --min-free-disk-mib", body = ErrorBody),
        (status = 500, description = "kilnd could not store it", body = ErrorBody),
    )
)]
pub async fn upload_artifact(
    State(m): State<Arc<Manager>>,
    body: axum::body::Body,
) -> ApiResult<Json<Artifact>> {
    m.check_disk("no upload", 0)?;
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
        let (head, total) = receive(&m, body, &mut file).await?;
        file.sync_all().await.map_err(ApiError::internal)?;
        let format = if head.starts_with(b"PK\x03\x04") {
            ArtifactFormat::Zip
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            ArtifactFormat::Tar
        } else {
            return Err(ApiError::bad_request(
                "the artifact must be a zip or tar archive of the build context",
            ));
        };
        Ok((format, total))
    }
    .await;
    match outcome {
        Ok((format, bytes)) => {
            let ext = match format {
                ArtifactFormat::Zip => "zip",
                ArtifactFormat::Tar => "tar",
            };
            tokio::fs::rename(&partial, dir.join(format!("{id}.{ext}")))
                .await
                .map_err(ApiError::internal)?;
            Ok(Json(Artifact {
                artifact_id: id,
                bytes,
                format,
            }))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(e)
        }
    }
}

/// Copies an upload's body into `file` under the limit; returns its first 262 bytes (enough
/// to tell zip from tar) and its size.
async fn receive(
    m: &Manager,
    mut body: axum::body::Body,
    file: &mut tokio::fs::File,
) -> ApiResult<(Vec<u8>, u64)> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let mut head = Vec::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > m.cfg.max_artifact_bytes {
            super::linger(&mut body).await;
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
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
    Ok((head, total))
}

/// Range checks of CreateMicrovmImage's values, before anything is started.
fn check_image_request(req: &CreateImageRequest) -> ApiResult<()> {
    let name = &req.name;
    if name.is_empty()
        || name.len() > 40
        || name.starts_with('-')
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ApiError::bad_request(
            "name: use 1-40 characters of a-z, 0-9 and '-', not starting with '-'",
        ));
    }
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
    if let Some(mem) = req.memory_size_mib.filter(|m| !(512..=8192).contains(m)) {
        return Err(ApiError::bad_request(format!(
            "memorySizeMib {mem} must be 512 to 8192"
        )));
    }
    if req.hook_port == Some(0) {
        return Err(ApiError::bad_request("hookPort: port 0 is not a port"));
    }
    if let Some(b) = req.cpu_baseline {
        crate::cpu::check_baseline(b).map_err(ApiError::bad_request)?;
    }
    let id = &req.code_artifact.artifact_id;
    if !id.starts_with("art-") || !id[4..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(format!(
            "codeArtifact.artifactId {id:?} is not an artifact id"
        )));
    }
    Ok(())
}

#[utoipa::path(
    post, path = "/v1/images", operation_id = "CreateMicrovmImage", tag = "images", security(("bearer" = [])),
    description = "CreateMicrovmImage: bakes a Dockerfile into a memory + disk snapshot, \
        taken once the app answers /ready. Answers at once (CREATING); follow the build with \
        GetMicrovmImage or its logs.",
    request_body = CreateImageRequest,
    responses(
        (status = 202, description = "The build started", body = CreateImageResponse),
        (status = 400, description = "A value is out of range or malformed", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such artifact", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 429, description = "--max-concurrent-builds are running, or KILN_HOME's disk is at --min-free-disk-mib", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn create_image(
    State(m): State<Arc<Manager>>,
    ApiJson(req): ApiJson<CreateImageRequest>,
) -> ApiResult<(StatusCode, Json<CreateImageResponse>)> {
    check_image_request(&req)?;
    let labels = req.labels.clone().unwrap_or_default();
    kiln_types::labels::check(&labels).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let recorded = serde_json::to_value(&req).map_err(ApiError::internal)?;
    let id = &req.code_artifact.artifact_id;
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
    let name = spec.name.clone();
    m.check_disk("no new build", 0)?;
    let _admission = m.admission.lock().unwrap_or_else(|p| p.into_inner());
    let building = m.store().count_building_images()?;
    if building >= m.cfg.max_concurrent_builds {
        return Err(ApiError::quota(format!(
            "{building} image builds are running and the limit is {}: wait for one to finish, \
             or raise kilnd --max-concurrent-builds",
            m.cfg.max_concurrent_builds
        )));
    }
    let image_id = crate::images::start_build(&m, spec, labels);
    Ok((
        StatusCode::ACCEPTED,
        Json(CreateImageResponse {
            image_identifier: image_id,
            name,
            status: ImageStatus::Creating,
        }),
    ))
}

/// An image row as the API shows it.
pub fn image_view(row: &kiln_store::ImageRow) -> Image {
    let r = &row.record;
    let field = |name: &str| r.get(name).cloned().unwrap_or_default();
    let small = |name: &str| r.get(name).and_then(|v| v.as_u64());
    Image {
        image_identifier: row.id.clone(),
        name: row.name.clone(),
        status: row.status,
        status_reason: row.reason.clone(),
        created_at: row.created_at / 1000,
        memory_size_mib: small("memory_mib").and_then(|v| u32::try_from(v).ok()),
        vcpus: small("vcpus").and_then(|v| u8::try_from(v).ok()),
        cpu_baseline: r.get("cpu_baseline").and_then(|v| v.as_f64()),
        hook_port: small("hook_port").and_then(|v| u16::try_from(v).ok()),
        exposed_ports: r
            .get("runtime")
            .and_then(|rt| rt.get("exposed_ports"))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default(),
        steps: serde_json::from_value(field("steps")).unwrap_or_default(),
        log_tail: r.get("log_tail").and_then(|v| v.as_str()).map(String::from),
        build_request: serde_json::from_value(field("request")).ok(),
        source_microvm_id: r
            .get("saved_from")
            .and_then(|v| v.as_str())
            .map(String::from),
        labels: row.labels.clone(),
    }
}

#[utoipa::path(
    get, path = "/v1/images", operation_id = "ListMicrovmImages", tag = "images", security(("bearer" = [])),
    description = "ListMicrovmImages: the newest build of every image name, by name, one \
        page at a time (`limit`, then `cursor` = the previous page's `nextCursor`), filtered \
        on the server by status and labels (`label=team=a&label=env`: every one must match).",
    params(ListImagesQuery),
    responses(
        (status = 200, description = "The images", body = ImageList),
        (status = 400, description = "A malformed query", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn list_images(
    State(m): State<Arc<Manager>>,
    ApiQuery(q): ApiQuery<ListImagesQuery>,
) -> ApiResult<Json<ImageList>> {
    let filters = super::list::filters(&q.label)?;
    let rows: Vec<kiln_store::ImageRow> = m
        .store()
        .images()?
        .into_iter()
        .filter(|r| q.status.is_none_or(|s| r.status == s))
        .filter(|r| super::list::matches(&filters, &r.labels))
        .collect();
    let (rows, next_cursor) =
        super::list::page(rows, |r| r.name.clone(), q.limit, q.cursor.as_deref())?;
    Ok(Json(ImageList {
        images: rows.iter().map(image_view).collect(),
        next_cursor,
    }))
}

#[utoipa::path(
    patch, path = "/v1/images/{id}", operation_id = "UpdateMicrovmImage", tag = "images", security(("bearer" = [])),
    description = "UpdateMicrovmImage: sets labels (a value) and removes them (`null`) on a \
        build (by id, or by name its newest successful build); labels not named are kept.",
    params(("id" = String, Path, description = "Image name or build id")),
    request_body = UpdateLabelsRequest,
    responses(
        (status = 200, description = "The image", body = Image),
        (status = 400, description = "A label is malformed, or there would be over 64", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn update_image(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateLabelsRequest>,
) -> ApiResult<Json<Image>> {
    // Read, merge and write under the store's lock: concurrent updates never lose one.
    let row = m.write(|s| -> ApiResult<Option<kiln_store::ImageRow>> {
        let Some(mut row) = s.image(&id)? else {
            return Ok(None);
        };
        row.labels = kiln_types::labels::merge(&row.labels, &req.labels)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        s.set_image_labels(&row.id, &row.labels)?;
        Ok(Some(row))
    })?;
    let row = row.ok_or_else(|| ApiError::not_found("image", &id))?;
    Ok(Json(image_view(&row)))
}

fn image_row(m: &Manager, id: &str) -> ApiResult<kiln_store::ImageRow> {
    m.store()
        .image(id)?
        .ok_or_else(|| ApiError::not_found("image", id))
}

#[utoipa::path(
    get, path = "/v1/images/{id}", operation_id = "GetMicrovmImage", tag = "images", security(("bearer" = [])),
    description = "GetMicrovmImage: a build by id, or by name its newest successful build.",
    params(("id" = String, Path, description = "Image name or build id")),
    responses(
        (status = 200, description = "The image", body = Image),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn get_image(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Image>> {
    Ok(Json(image_view(&image_row(&m, &id)?)))
}

#[utoipa::path(
    get, path = "/v1/images/{id}/logs", operation_id = "GetMicrovmImageLogs", tag = "images", security(("bearer" = [])),
    description = "A build's log; with `follow=true`, streamed as it grows until the build ends.",
    params(("id" = String, Path, description = "Image name or build id"), LogsQuery),
    responses(
        (status = 200, description = "The log", body = String, content_type = "text/plain"),
        (status = 400, description = "A malformed query", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn image_logs(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Response> {
    let row = image_row(&m, &id)?;
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
                .map(|r| r.status != ImageStatus::Creating)
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

#[utoipa::path(
    delete, path = "/v1/images/{id}", operation_id = "DeleteMicrovmImage", tag = "images", security(("bearer" = [])),
    description = "DeleteMicrovmImage: a build and its files, once no microVM uses it.",
    params(("id" = String, Path, description = "Image name or build id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 409, description = "MicroVMs use it, or it is still building", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn delete_image(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let row = image_row(&m, &id)?;
    let users = m.store().live_microvms_of_image(&row.id)?;
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "image {} is used by microVMs {users:?}: terminate them first",
            row.id
        )));
    }
    if row.status == ImageStatus::Creating {
        return Err(ApiError::conflict(format!(
            "image {} is still being built",
            row.id
        )));
    }
    m.store().delete_image(&row.id)?;
    let dir = m.builder.build_dir(&row.name, &row.id);
    m.pool.forget_under(&m, &dir);
    let _ = std::fs::remove_dir_all(dir);
    crate::share::forget(&m, &row.id);
    Ok(StatusCode::NO_CONTENT)
}
