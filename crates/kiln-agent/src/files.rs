//! File put and get. Puts are atomic: written to a temporary file beside the target, then
//! renamed over it.

use std::io::ErrorKind as IoKind;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::{
    ErrorKind, FrameError, FramedStream, GetFileRequest, GuestError, GuestFrame, HostFrame,
    PutFileRequest, Stream,
};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn io_error(action: &str, path: &str, e: std::io::Error) -> GuestError {
    let kind = match e.kind() {
        IoKind::NotFound => ErrorKind::NotFound,
        IoKind::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Io,
    };
    GuestError::new(kind, format!("{action} {path}: {e}"))
}

fn absolute(path: &str) -> Result<PathBuf, GuestError> {
    if path.starts_with('/') && !path.contains('\0') {
        Ok(PathBuf::from(path))
    } else {
        Err(GuestError::new(
            ErrorKind::InvalidRequest,
            format!("path {path:?} must be absolute"),
        ))
    }
}

pub async fn put(mut framed: FramedStream<Stream>, req: PutFileRequest) -> Result<(), FrameError> {
    let reply = match receive_into_file(&mut framed, &req).await? {
        Ok(()) => GuestFrame::Ok,
        Err(e) => GuestFrame::Error(e),
    };
    framed.send(&reply).await
}

async fn receive_into_file(
    framed: &mut FramedStream<Stream>,
    req: &PutFileRequest,
) -> Result<Result<(), GuestError>, FrameError> {
    let target = match absolute(&req.path) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let parent = target.parent().unwrap_or(Path::new("/")).to_path_buf();
    if req.create_parents {
        if let Err(e) = std::fs::create_dir_all(&parent) {
            return Ok(Err(io_error(
                "create directory",
                &parent.display().to_string(),
                e,
            )));
        }
    }
    let tmp = parent.join(format!(
        ".kiln-put-{}",
        std::process::id() as u64 * 1_000_003 + rand_suffix()
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(req.mode & 0o7777)
        .open(&tmp);
    let mut file = match file {
        Ok(f) => tokio::fs::File::from_std(f),
        Err(e) => return Ok(Err(io_error("create", &req.path, e))),
    };
    let outcome = receive_chunks(framed, &mut file, req.size, &req.path).await?;
    let outcome = match outcome {
        Ok(()) => {
            async {
                file.sync_all()
                    .await
                    .map_err(|e| io_error("sync", &req.path, e))?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(req.mode & 0o7777))
                    .map_err(|e| io_error("chmod", &req.path, e))?;
                std::fs::rename(&tmp, &target).map_err(|e| io_error("rename into", &req.path, e))
            }
            .await
        }
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(outcome)
}

/// Writes the `Chunk`s of an upload of `size` bytes into `file`, through its `End`.
pub async fn receive_chunks(
    framed: &mut FramedStream<Stream>,
    file: &mut tokio::fs::File,
    size: u64,
    path: &str,
) -> Result<Result<(), GuestError>, FrameError> {
    let mut received: u64 = 0;
    let mut failed = None;
    loop {
        match framed
            .expect::<HostFrame>("receiving file contents")
            .await?
        {
            HostFrame::Chunk(data) => {
                received += data.len() as u64;
                if received > size {
                    return Ok(Err(GuestError::new(
                        ErrorKind::TooLarge,
                        format!("more than the announced {size} bytes"),
                    )));
                }
                // After a failed write the rest is read and dropped, so the host hears why.
                if failed.is_none() {
                    if let Err(e) = file.write_all(&data).await {
                        failed = Some(crate::creds::fs_error("write", path, e));
                    }
                }
            }
            HostFrame::End if received == size => return Ok(failed.map_or(Ok(()), Err)),
            HostFrame::End => {
                return Ok(Err(GuestError::new(
                    ErrorKind::InvalidRequest,
                    format!("got {received} of {size} bytes"),
                )))
            }
            other => {
                return Ok(Err(GuestError::new(
                    ErrorKind::InvalidRequest,
                    format!("unexpected {other:?} in a file upload"),
                )))
            }
        }
    }
}

/// Reads and drops an upload the agent cannot take, through its `End`, so the host that
/// sends it all before reading the answer hears why.
pub async fn drain(framed: &mut FramedStream<Stream>) -> Result<(), FrameError> {
    while let HostFrame::Chunk(_) = framed.expect::<HostFrame>("receiving an upload").await? {}
    Ok(())
}

pub fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

pub async fn get(mut framed: FramedStream<Stream>, req: GetFileRequest) -> Result<(), FrameError> {
    let opened = async {
        let path = absolute(&req.path)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error("open", &req.path, e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| io_error("stat", &req.path, e))?;
        if !meta.is_file() {
            return Err(GuestError::new(
                ErrorKind::InvalidRequest,
                format!("{} is not a regular file", req.path),
            ));
        }
        if meta.len() > req.max_bytes {
            return Err(GuestError::new(
                ErrorKind::TooLarge,
                format!(
                    "{} is {} bytes, over the {}-byte limit",
                    req.path,
                    meta.len(),
                    req.max_bytes
                ),
            ));
        }
        Ok((file, meta))
    }
    .await;
    match opened {
        Ok((file, meta)) => send_file(framed, file, &meta, &req.path).await,
        Err(e) => framed.send(&GuestFrame::Error(e)).await,
    }
}

/// Sends an open regular file: `FileMeta`, its bytes as `Chunk`s (cut at the size it had
/// when opened), `End`.
pub async fn send_file(
    mut framed: FramedStream<Stream>,
    mut file: tokio::fs::File,
    meta: &std::fs::Metadata,
    path: &str,
) -> Result<(), FrameError> {
    use std::os::unix::fs::MetadataExt;
    framed
        .send(&GuestFrame::FileMeta {
            size: meta.len(),
            mode: meta.mode(),
        })
        .await?;
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    let mut sent = 0u64;
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                return framed
                    .send(&GuestFrame::Error(io_error("read", path, e)))
                    .await
            }
        };
        // A file that grows while read is cut at its announced size.
        let n = n.min((meta.len() - sent) as usize);
        if n == 0 {
            break;
        }
        sent += n as u64;
        framed
            .send(&GuestFrame::Chunk(ByteBuf::from(buf[..n].to_vec())))
            .await?;
    }
    framed.send(&GuestFrame::End).await?;
    framed.close().await
}
