//! The files API: a RUNNING microVM's filesystem as a guest user. Transfers stream both
//! ways (kilnd never holds a whole file), count as activity and keep the microVM from
//! idling while they run; a watch is a server-sent event stream.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::Json;
use http_body_util::BodyExt;
use kiln_api::files::{
    check_path, check_user, format_mode, parse_mode, DEFAULT_LIST_ENTRIES, MAX_ARCHIVE_BYTES,
    MAX_LIST_ENTRIES,
};
use kiln_api::{
    ErrorBody, ErrorCode, FileEntry, FileEvent, FileEventKind, FileKind, FileList, FilePathQuery,
    FileWatchSse, ListFilesQuery, MakeDirectoryRequest, MoveFileRequest, RemoveFileQuery,
    WriteFileQuery,
};
use kiln_proto::{FileRef, FsOp};
use kiln_vmm::agent_files::Upload;
use tokio::sync::mpsc;

use super::{ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::files::{agent, body, error, fail, Busy, Channel};
use crate::manager::Manager;

/// Raw bytes of a file or tar stream, for the spec.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct FileBytes(#[allow(dead_code)] Vec<u8>);

pub fn entry_view(e: kiln_proto::FileEntry) -> FileEntry {
    FileEntry {
        name: e.name,
        path: e.path,
        kind: match e.kind {
            kiln_proto::FileKind::File => FileKind::File,
            kiln_proto::FileKind::Directory => FileKind::Directory,
            kiln_proto::FileKind::Symlink => FileKind::Symlink,
            kiln_proto::FileKind::Other => FileKind::Other,
        },
        size: e.size,
        mode: format_mode(e.mode),
        uid: e.uid,
        gid: e.gid,
        modified_ms: e.modified_ms,
        link_target: e.link_target,
    }
}

/// A checked path and user as the agent takes them.
fn file_ref(name: &str, path: &str, user: Option<&str>) -> ApiResult<FileRef> {
    check_path(name, path).map_err(ApiError::bad_request)?;
    check_user(user).map_err(ApiError::bad_request)?;
    Ok(FileRef {
        path: path.to_string(),
        user: user.map(str::to_string),
    })
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/files", operation_id = "ListFiles", tag = "files", security(("bearer" = [])),
    description = "A directory's entries by name (not following symlinks), as the guest user \
        sees them.",
    params(("id" = String, Path, description = "The microVM's id"), ListFilesQuery),
    responses(
        (status = 200, description = "The entries", body = FileList),
        (status = 400, description = "A malformed path, user or limit, or not a directory", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not list it", body = ErrorBody),
        (status = 404, description = "No such microVM or directory", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn list_files(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ListFilesQuery>,
) -> ApiResult<Json<FileList>> {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_ENTRIES);
    if !(1..=MAX_LIST_ENTRIES).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} must be 1 to {MAX_LIST_ENTRIES}"
        )));
    }
    let f = file_ref("path", &q.path, q.user.as_deref())?;
    let agent = agent(&m, &id)?;
    m.record_activity(&id);
    let mut entries = agent
        .list_dir(f.path, limit + 1, f.user)
        .await
        .map_err(error)?;
    let truncated = entries.len() > limit as usize;
    entries.truncate(limit as usize);
    Ok(Json(FileList {
        path: q.path,
        entries: entries.into_iter().map(entry_view).collect(),
        truncated,
    }))
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/files/stat", operation_id = "StatFile", tag = "files", security(("bearer" = [])),
    description = "One path's metadata (a final symlink is not followed).",
    params(("id" = String, Path, description = "The microVM's id"), FilePathQuery),
    responses(
        (status = 200, description = "The entry", body = FileEntry),
        (status = 400, description = "A malformed path or user", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not reach it", body = ErrorBody),
        (status = 404, description = "No such microVM or path", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn stat_file(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FilePathQuery>,
) -> ApiResult<Json<FileEntry>> {
    let f = file_ref("path", &q.path, q.user.as_deref())?;
    let agent = agent(&m, &id)?;
    m.record_activity(&id);
    let e = agent
        .fs_entry(FsOp::Stat { path: f.path }, f.user)
        .await
        .map_err(error)?;
    Ok(Json(entry_view(e)))
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/files/mkdir", operation_id = "MakeDirectory", tag = "files", security(("bearer" = [])),
    description = "Makes a directory (by default like `mkdir -p`), owned by the guest user.",
    params(("id" = String, Path, description = "The microVM's id")),
    request_body = MakeDirectoryRequest,
    responses(
        (status = 200, description = "The directory", body = FileEntry),
        (status = 400, description = "A malformed path, user or mode", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not make it", body = ErrorBody),
        (status = 404, description = "No such microVM, or a parent is missing (parents: false)", body = ErrorBody),
        (status = 409, description = "It is not RUNNING, or the path exists (parents: false)", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn make_directory(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MakeDirectoryRequest>,
) -> ApiResult<Json<FileEntry>> {
    let f = file_ref("path", &req.path, req.user.as_deref())?;
    let mode = parse_mode(req.mode.as_deref().unwrap_or("0755")).map_err(ApiError::bad_request)?;
    let agent = agent(&m, &id)?;
    m.record_activity(&id);
    let op = FsOp::Mkdir {
        path: f.path,
        mode,
        parents: req.parents.unwrap_or(true),
    };
    let e = agent.fs_entry(op, f.user).await.map_err(error)?;
    Ok(Json(entry_view(e)))
}

#[utoipa::path(
    post, path = "/v1/microvms/{id}/files/move", operation_id = "MoveFile", tag = "files", security(("bearer" = [])),
    description = "Renames a file or directory (`mv` within one filesystem; an existing file at \
        `to` is replaced).",
    params(("id" = String, Path, description = "The microVM's id")),
    request_body = MoveFileRequest,
    responses(
        (status = 200, description = "The entry at its new path", body = FileEntry),
        (status = 400, description = "A malformed path or user, or across filesystems", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not move it", body = ErrorBody),
        (status = 404, description = "No such microVM or path", body = ErrorBody),
        (status = 409, description = "It is not RUNNING, or `to` is a non-empty directory", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn move_file(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MoveFileRequest>,
) -> ApiResult<Json<FileEntry>> {
    let from = file_ref("from", &req.from, req.user.as_deref())?;
    check_path("to", &req.to).map_err(ApiError::bad_request)?;
    let agent = agent(&m, &id)?;
    m.record_activity(&id);
    let op = FsOp::Rename {
        from: from.path,
        to: req.to,
    };
    let e = agent.fs_entry(op, from.user).await.map_err(error)?;
    Ok(Json(entry_view(e)))
}

#[utoipa::path(
    delete, path = "/v1/microvms/{id}/files", operation_id = "RemoveFile", tag = "files", security(("bearer" = [])),
    description = "Removes a file, a symlink, an empty directory, or with `recursive=true` a \
        directory and everything in it.",
    params(("id" = String, Path, description = "The microVM's id"), RemoveFileQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "A malformed path or user, or `/`", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not remove it", body = ErrorBody),
        (status = 404, description = "No such microVM or path", body = ErrorBody),
        (status = 409, description = "It is not RUNNING, or the directory is not empty", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn remove_file(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<RemoveFileQuery>,
) -> ApiResult<axum::http::StatusCode> {
    let f = file_ref("path", &q.path, q.user.as_deref())?;
    let agent = agent(&m, &id)?;
    m.record_activity(&id);
    agent
        .remove_path(f.path, q.recursive.unwrap_or(false), f.user)
        .await
        .map_err(error)?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/files/content", operation_id = "ReadFile", tag = "files", security(("bearer" = [])),
    description = "A file's bytes, streamed as the guest reads them (Content-Length is its size \
        when opened). A failure midway breaks the transfer rather than ending it short.",
    params(("id" = String, Path, description = "The microVM's id"), FilePathQuery),
    responses(
        (status = 200, description = "The file", body = FileBytes, content_type = "application/octet-stream"),
        (status = 400, description = "A malformed path or user, or not a regular file", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not read it", body = ErrorBody),
        (status = 404, description = "No such microVM or file", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn read_file(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FilePathQuery>,
) -> ApiResult<Response> {
    let f = file_ref("path", &q.path, q.user.as_deref())?;
    let agent = agent(&m, &id)?;
    let busy = Busy::new(&m, &id);
    let mut download = agent.read_file(f).await.map_err(error)?;
    let size = download.size;
    let body = body(|tx| async move {
        let _busy = busy;
        loop {
            match download.next_chunk().await {
                Ok(Some(c)) => {
                    if tx.send(Ok(c.into())).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => break fail(&tx, &e).await,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .body(body)
        .map_err(ApiError::internal)
}

/// The Content-Length an upload must carry.
fn content_length(headers: &HeaderMap) -> ApiResult<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::LengthRequired,
                "send the file with a Content-Length header (its size in bytes)",
            )
        })
}

/// Streams the request body into an upload; `limit` bounds a body without a fixed size.
async fn pump(body: Body, upload: &mut Upload, limit: u64) -> ApiResult<()> {
    let mut body = body;
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        sent += data.len() as u64;
        if sent > limit {
            super::linger(&mut body).await;
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body is over {limit} bytes"),
            ));
        }
        upload.send(&data).await.map_err(error)?;
    }
    Ok(())
}

#[utoipa::path(
    put, path = "/v1/microvms/{id}/files/content", operation_id = "WriteFile", tag = "files", security(("bearer" = [])),
    description = "Writes a file from the request body, streamed (any size the guest's disk \
        takes; Content-Length required). It is written beside the target and renamed over it: \
        readers never see half of it, and a failed upload leaves the old file. The new file \
        belongs to the guest user.",
    params(("id" = String, Path, description = "The microVM's id"), WriteFileQuery),
    request_body(content = FileBytes, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "The written file", body = FileEntry),
        (status = 400, description = "A malformed path, user or mode, or a directory", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not write there", body = ErrorBody),
        (status = 404, description = "No such microVM, or the parent is missing (createParents=false)", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 411, description = "No Content-Length", body = ErrorBody),
        (status = 413, description = "The guest's disk is full", body = ErrorBody),
        (status = 429, description = "KILN_HOME's disk is at --min-free-disk-mib", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn write_file(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<WriteFileQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<FileEntry>> {
    let file = file_ref("path", &q.path, q.user.as_deref())?;
    let mode = q
        .mode
        .as_deref()
        .map(parse_mode)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let size = content_length(&headers)?;
    let agent = agent(&m, &id)?;
    m.check_disk("writing a file", size)?;
    let _busy = Busy::new(&m, &id);
    let req = kiln_proto::WriteFileRequest {
        file,
        mode,
        size,
        create_parents: q.create_parents.unwrap_or(true),
    };
    let mut upload = agent.write_file(req).await.map_err(error)?;
    pump(body, &mut upload, size).await?;
    match upload.finish().await.map_err(error)? {
        Some(e) => Ok(Json(entry_view(e))),
        None => Err(ApiError::internal(
            "the guest answered a write without the file",
        )),
    }
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/files/archive", operation_id = "DownloadArchive", tag = "files", security(("bearer" = [])),
    description = "A directory as a tar stream (paths relative to it, symlinks as symlinks), \
        built as it is sent. A failure midway (a file the user may not read) breaks the \
        transfer.",
    params(("id" = String, Path, description = "The microVM's id"), FilePathQuery),
    responses(
        (status = 200, description = "The tar stream", body = FileBytes, content_type = "application/x-tar"),
        (status = 400, description = "A malformed path or user", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn download_archive(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FilePathQuery>,
) -> ApiResult<Response> {
    let f = file_ref("path", &q.path, q.user.as_deref())?;
    let agent = agent(&m, &id)?;
    let busy = Busy::new(&m, &id);
    let mut archive = agent.read_archive(f).await.map_err(error)?;
    // The first chunk, or the guest's refusal, before the status line is sent.
    let first = archive.next_chunk().await.map_err(error)?;
    let body = body(|tx| async move {
        let _busy = busy;
        if let Some(c) = first {
            if tx.send(Ok(c.into())).await.is_err() {
                return;
            }
        } else {
            return;
        }
        loop {
            match archive.next_chunk().await {
                Ok(Some(c)) => {
                    if tx.send(Ok(c.into())).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => break fail(&tx, &e).await,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(body)
        .map_err(ApiError::internal)
}

#[utoipa::path(
    put, path = "/v1/microvms/{id}/files/archive", operation_id = "UploadArchive", tag = "files", security(("bearer" = [])),
    description = "Unpacks a tar stream (the request body, at most 64 GiB) into a directory, \
        made when missing, as the guest user, who owns what is unpacked. Entries may not \
        escape the directory. Sent as `application/x-tar` or `application/octet-stream` \
        (the bytes are what count).",
    params(("id" = String, Path, description = "The microVM's id"), FilePathQuery),
    request_body(content(
        (FileBytes = "application/x-tar"),
        (FileBytes = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "The directory", body = FileEntry),
        (status = 400, description = "A malformed path, user or archive, or an entry that escapes", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not write there", body = ErrorBody),
        (status = 404, description = "No such microVM", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 413, description = "Over 64 GiB, or the guest's disk is full", body = ErrorBody),
        (status = 429, description = "KILN_HOME's disk is at --min-free-disk-mib", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn upload_archive(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FilePathQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<FileEntry>> {
    let dest = file_ref("path", &q.path, q.user.as_deref())?;
    if axum::body::HttpBody::size_hint(&body).exact() == Some(0) {
        return Err(ApiError::bad_request(
            "the request has no body: send the tar stream to unpack (`tar -c -C DIR .`)",
        ));
    }
    let agent = agent(&m, &id)?;
    m.check_disk(
        "unpacking an archive",
        content_length(&headers).unwrap_or(0),
    )?;
    let _busy = Busy::new(&m, &id);
    let req = kiln_proto::UnpackRequest {
        dest: dest.clone(),
        max_bytes: MAX_ARCHIVE_BYTES,
    };
    let mut upload = agent.unpack_archive(req).await.map_err(error)?;
    pump(body, &mut upload, MAX_ARCHIVE_BYTES).await?;
    upload.finish().await.map_err(error)?;
    let e = agent
        .fs_entry(FsOp::Stat { path: dest.path }, dest.user)
        .await
        .map_err(error)?;
    Ok(Json(entry_view(e)))
}

#[utoipa::path(
    get, path = "/v1/microvms/{id}/files/watch", operation_id = "WatchFiles", tag = "files", security(("bearer" = [])),
    description = "Watches a directory (not its subdirectories): a server-sent event stream \
        whose `file` events carry a FileEvent (create, modify, delete) as JSON. It ends with an \
        `end` event when the directory goes away, or an `error` event when the microVM stops \
        running (a suspend ends every watch). A watch is not activity: it does not keep the \
        microVM from idling. At most 8 per microVM.",
    params(("id" = String, Path, description = "The microVM's id"), FilePathQuery),
    responses(
        (status = 200, description = "The event stream", body = FileWatchSse, content_type = "text/event-stream"),
        (status = 400, description = "A malformed path or user, or not a directory", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 403, description = "The guest user may not list it", body = ErrorBody),
        (status = 404, description = "No such microVM or directory", body = ErrorBody),
        (status = 409, description = "It is not RUNNING", body = ErrorBody),
        (status = 429, description = "It already has 8 open watches", body = ErrorBody),
        (status = 502, description = "The guest agent failed", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn watch_files(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<FilePathQuery>,
) -> ApiResult<Response> {
    let f = file_ref("path", &q.path, q.user.as_deref())?;
    let agent = agent(&m, &id)?;
    let slot = m.watches.take(&id)?;
    let mut watcher = agent.watch(f).await.map_err(error)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let event = tokio::select! {
                next = watcher.next() => next,
                () = tx.closed() => break,
            };
            let sse = match event {
                Ok(Some(e)) => Event::default()
                    .event("file")
                    .json_data(event_view(e))
                    .unwrap_or_default(),
                Ok(None) => {
                    let _ = tx
                        .send(Ok(Event::default().event("end").data("gone")))
                        .await;
                    break;
                }
                Err(e) => {
                    let why = format!(
                        "the watch ended: {} (a suspended or stopped microVM ends its watches)",
                        crate::manager::error_chain(&e)
                    );
                    let _ = tx.send(Ok(Event::default().event("error").data(why))).await;
                    break;
                }
            };
            if tx.send(Ok(sse)).await.is_err() {
                break;
            }
        }
    });
    let rx: mpsc::Receiver<Result<Event, std::convert::Infallible>> = rx;
    Ok(axum::response::IntoResponse::into_response(
        Sse::new(Channel(rx)).keep_alive(KeepAlive::default()),
    ))
}

fn event_view(e: kiln_proto::FsEvent) -> FileEvent {
    FileEvent {
        kind: match e.kind {
            kiln_proto::FsEventKind::Create => FileEventKind::Create,
            kiln_proto::FsEventKind::Modify => FileEventKind::Modify,
            kiln_proto::FsEventKind::Delete => FileEventKind::Delete,
        },
        path: e.path,
        is_dir: e.is_dir,
    }
}
