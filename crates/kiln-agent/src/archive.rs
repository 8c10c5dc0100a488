//! PutArchive: unpacks a tar stream from the host into a directory (COPY and ADD use it).
//! Entries cannot escape the destination (the tar crate's `unpack_in` checks `..`,
//! absolute paths and symlink traversal); the size is bounded.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_proto::{
    ErrorKind, FrameError, FramedStream, GuestError, GuestFrame, HostFrame, PutArchiveRequest,
    Stream, UnpackRequest,
};
use tokio::sync::mpsc;

use crate::files::io_error;

/// A `Read` over chunks arriving from the async side.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    fn new(rx: mpsc::Receiver<Vec<u8>>) -> ChunkReader {
        ChunkReader {
            rx,
            current: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

pub async fn put(
    mut framed: FramedStream<Stream>,
    req: PutArchiveRequest,
) -> Result<(), FrameError> {
    let dest = match prepare_dest(&req) {
        Ok(d) => d,
        Err(e) => {
            drain(&mut framed).await?;
            return framed.send(&GuestFrame::Error(e)).await;
        }
    };
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let unpack_req = req.clone();
    let unpack =
        tokio::task::spawn_blocking(move || unpack(ChunkReader::new(rx), &dest, &unpack_req));
    let outcome = feed(&mut framed, tx, req.max_bytes).await?;
    let unpacked = unpack
        .await
        .unwrap_or_else(|_| Err(GuestError::new(ErrorKind::Io, "unpacker panicked")));
    let reply = match outcome.and(unpacked) {
        Ok(()) => GuestFrame::Ok,
        Err(e) => GuestFrame::Error(e),
    };
    framed.send(&reply).await
}

/// Generation 5: unpacks as the user, who owns what is unpacked; the destination is made
/// (as the user) when missing.
pub async fn unpack_as(
    mut framed: FramedStream<Stream>,
    req: UnpackRequest,
) -> Result<(), FrameError> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let path = req.dest.path.clone();
    let unpack = tokio::spawn(crate::creds::as_user(req.dest.user.clone(), move || {
        let dest = crate::fsops::absolute(&path)?;
        std::fs::create_dir_all(&dest)
            .map_err(|e| crate::creds::fs_error("create directory", &path, e))?;
        let mut archive = tar::Archive::new(ChunkReader::new(rx));
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        unpack_entries(&mut archive, &dest)
    }));
    let outcome = feed(&mut framed, tx, req.max_bytes).await?;
    let unpacked = unpack
        .await
        .unwrap_or_else(|_| Err(GuestError::new(ErrorKind::Io, "unpacker panicked")));
    let reply = match outcome.and(unpacked) {
        Ok(()) => GuestFrame::Ok,
        Err(e) => GuestFrame::Error(e),
    };
    framed.send(&reply).await
}

/// Passes the host's `Chunk`s to the unpacker until `End`, at most `max_bytes`.
async fn feed(
    framed: &mut FramedStream<Stream>,
    tx: mpsc::Sender<Vec<u8>>,
    max_bytes: u64,
) -> Result<Result<(), GuestError>, FrameError> {
    let mut received = 0u64;
    loop {
        match framed.expect::<HostFrame>("receiving the archive").await? {
            HostFrame::Chunk(data) => {
                received += data.len() as u64;
                if received > max_bytes {
                    return Ok(Err(GuestError::new(
                        ErrorKind::TooLarge,
                        format!("archive over {max_bytes} bytes"),
                    )));
                }
                if tx.send(data.into_vec()).await.is_err() {
                    // The unpacker stopped early (its error is the answer): drop the rest.
                    drain(framed).await?;
                    return Ok(Ok(()));
                }
            }
            HostFrame::End => return Ok(Ok(())),
            other => {
                return Ok(Err(GuestError::new(
                    ErrorKind::InvalidRequest,
                    format!("unexpected {other:?} in an archive"),
                )))
            }
        }
    }
}

async fn drain(framed: &mut FramedStream<Stream>) -> Result<(), FrameError> {
    while let HostFrame::Chunk(_) = framed.expect::<HostFrame>("receiving the archive").await? {}
    Ok(())
}

fn prepare_dest(req: &PutArchiveRequest) -> Result<PathBuf, GuestError> {
    if !req.dest.starts_with('/') {
        return Err(GuestError::new(
            ErrorKind::InvalidRequest,
            format!("destination {:?} must be absolute", req.dest),
        ));
    }
    let dest = PathBuf::from(&req.dest);
    let existed = dest.exists();
    std::fs::create_dir_all(&dest).map_err(|e| io_error("create directory", &req.dest, e))?;
    if !existed {
        if let Some(owner) = &req.chown {
            chown(&dest, owner)?;
        }
    }
    Ok(dest)
}

fn chown(path: &Path, owner: &str) -> Result<(), GuestError> {
    let id = crate::user::resolve(Some(owner))?;
    std::os::unix::fs::lchown(path, Some(id.uid), Some(id.gid))
        .map_err(|e| io_error("chown", &path.display().to_string(), e))
}

fn unpack(reader: ChunkReader, dest: &Path, req: &PutArchiveRequest) -> Result<(), GuestError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    let bad =
        |e: std::io::Error| GuestError::new(ErrorKind::InvalidRequest, format!("archive: {e}"));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let rel = entry.path().map_err(bad)?.into_owned();
        let is_file = entry.header().entry_type().is_file();
        if !entry.unpack_in(dest).map_err(bad)? {
            return Err(GuestError::new(
                ErrorKind::InvalidRequest,
                format!("archive entry {} escapes {}", rel.display(), dest.display()),
            ));
        }
        let path = dest.join(&rel);
        if let Some(owner) = &req.chown {
            chown(&path, owner)?;
        }
        if let (Some(mode), true) = (req.chmod, is_file) {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| io_error("chmod", &path.display().to_string(), e))?;
        }
    }
    Ok(())
}

/// Unpacks every entry under `dest` as whoever runs it; an entry that would escape is an
/// error.
fn unpack_entries(archive: &mut tar::Archive<ChunkReader>, dest: &Path) -> Result<(), GuestError> {
    let bad =
        |e: std::io::Error| GuestError::new(ErrorKind::InvalidRequest, format!("archive: {e}"));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let rel = entry.path().map_err(bad)?.into_owned();
        if !entry.unpack_in(dest).map_err(|e| unpack_error(e, &rel))? {
            return Err(GuestError::new(
                ErrorKind::InvalidRequest,
                format!("archive entry {} escapes {}", rel.display(), dest.display()),
            ));
        }
    }
    Ok(())
}

/// An unpack failure: the guest's own error (permission, disk full) where it is one.
fn unpack_error(e: std::io::Error, rel: &Path) -> GuestError {
    let root = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .find(|e| e.raw_os_error().is_some());
    match root.and_then(|r| r.raw_os_error()) {
        Some(n) => crate::creds::fs_error(
            "unpack",
            &rel.display().to_string(),
            std::io::Error::from_raw_os_error(n),
        ),
        None => GuestError::new(ErrorKind::InvalidRequest, format!("archive: {e}")),
    }
}
