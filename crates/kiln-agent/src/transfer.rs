//! The files API's streamed transfers, each as the requesting guest user
//! ([`crate::creds`]): read a file, write one (atomically), a directory as a tar stream.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::{
    ErrorKind, FileRef, FrameError, FramedStream, GuestError, GuestFrame, Stream, WriteFileRequest,
};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use crate::creds::{as_user, fs_error};
use crate::fsops::{absolute, entry};

pub async fn read(framed: FramedStream<Stream>, req: FileRef) -> Result<(), FrameError> {
    let path = req.path.clone();
    let opened = as_user(req.user, move || {
        let file = std::fs::File::open(absolute(&path)?).map_err(|e| fs_error("open", &path, e))?;
        let meta = file.metadata().map_err(|e| fs_error("stat", &path, e))?;
        if !meta.is_file() {
            return Err(GuestError::new(
                ErrorKind::InvalidRequest,
                format!("{path} is not a regular file"),
            ));
        }
        Ok((file, meta))
    })
    .await;
    let mut framed = framed;
    match opened {
        Ok((file, meta)) => {
            crate::files::send_file(framed, tokio::fs::File::from_std(file), &meta, &req.path).await
        }
        Err(e) => framed.send(&GuestFrame::Error(e)).await,
    }
}

/// Where an upload goes: a new file beside the target, renamed over it at the end.
struct Upload {
    tmp: PathBuf,
    target: PathBuf,
    mode: u32,
}

pub async fn write(
    mut framed: FramedStream<Stream>,
    req: WriteFileRequest,
) -> Result<(), FrameError> {
    let (path, user) = (req.file.path.clone(), req.file.user.clone());
    let (mode, parents) = (req.mode, req.create_parents);
    let opened = as_user(user.clone(), move || prepare(&path, mode, parents)).await;
    let (file, upload) = match opened {
        Ok(v) => v,
        Err(e) => {
            crate::files::drain(&mut framed).await?;
            return framed.send(&GuestFrame::Error(e)).await;
        }
    };
    let mut file = tokio::fs::File::from_std(file);
    let received =
        crate::files::receive_chunks(&mut framed, &mut file, req.size, &req.file.path).await;
    let outcome = match received {
        Ok(Ok(())) => match file.sync_all().await {
            Ok(()) => {
                let tmp = upload.tmp.clone();
                let finished = as_user(user, move || finish(&upload)).await;
                if finished.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                finished
            }
            Err(e) => Err(fs_error("sync", &req.file.path, e)),
        },
        Ok(Err(e)) => {
            let _ = std::fs::remove_file(&upload.tmp);
            Err(e)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&upload.tmp);
            return Err(e);
        }
    };
    let reply = match outcome {
        Ok(entry) => GuestFrame::Entry(entry),
        Err(e) => GuestFrame::Error(e),
    };
    framed.send(&reply).await
}

fn prepare(
    path: &str,
    mode: Option<u32>,
    parents: bool,
) -> Result<(std::fs::File, Upload), GuestError> {
    let target = absolute(path)?;
    let parent = target.parent().unwrap_or(Path::new("/")).to_path_buf();
    if parents {
        std::fs::create_dir_all(&parent)
            .map_err(|e| fs_error("create directory", &parent.display().to_string(), e))?;
    }
    let existing = std::fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(GuestError::new(
            ErrorKind::InvalidRequest,
            format!("{path} is a directory"),
        ));
    }
    let mode = mode
        .or(existing.map(|m| m.permissions().mode()))
        .unwrap_or(0o644)
        & 0o7777;
    let tmp = parent.join(format!(".kiln-upload-{}", crate::files::rand_suffix()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| fs_error("create", path, e))?;
    Ok((file, Upload { tmp, target, mode }))
}

fn finish(upload: &Upload) -> Result<kiln_proto::FileEntry, GuestError> {
    let shown = upload.target.display().to_string();
    std::fs::set_permissions(&upload.tmp, std::fs::Permissions::from_mode(upload.mode))
        .map_err(|e| fs_error("chmod", &shown, e))?;
    std::fs::rename(&upload.tmp, &upload.target).map_err(|e| fs_error("rename into", &shown, e))?;
    entry(&upload.target)
}

/// A `Write` that hands full chunks to the async side.
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(MAX_CHUNK_LEN - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_CHUNK_LEN {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_CHUNK_LEN));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the host left"))
    }
}

/// `dir`'s tree into `tar` under `.`, by name, staying on `dir`'s filesystem as
/// `tar --one-file-system` does: an archive of `/` is the root disk, not /proc, /sys or
/// /dev (a mount point comes as an empty directory). Entries that vanish while it runs are
/// left out; a walk with its own stack, so no depth overflows the thread.
fn append_tree<W: Write>(tar: &mut tar::Builder<W>, dir: &Path, dev: u64) -> std::io::Result<()> {
    let mut pending = vec![(dir.to_path_buf(), PathBuf::from("."))];
    while let Some((dir, name)) = pending.pop() {
        let mut children: Vec<_> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        children.sort();
        let mut subdirs = Vec::new();
        for child in children {
            let path = dir.join(&child);
            let rel = name.join(&child);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                tar.append_dir(&rel, &path)?;
                if meta.dev() == dev {
                    subdirs.push((path, rel));
                }
                continue;
            }
            match tar.append_path_with_name(&path, &rel) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        pending.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// A directory as a tar stream (symlinks as symlinks), built as the user while it is sent.
pub async fn archive(mut framed: FramedStream<Stream>, req: FileRef) -> Result<(), FrameError> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let path = req.path.clone();
    let build = tokio::spawn(as_user(req.user, move || {
        let dir = absolute(&path)?;
        let meta = std::fs::metadata(&dir).map_err(|e| fs_error("stat", &path, e))?;
        if !meta.is_dir() {
            return Err(GuestError::new(
                ErrorKind::InvalidRequest,
                format!("{path} is not a directory"),
            ));
        }
        let mut tar = tar::Builder::new(ChunkWriter {
            tx,
            buf: Vec::with_capacity(MAX_CHUNK_LEN),
        });
        tar.follow_symlinks(false);
        append_tree(&mut tar, &dir, meta.dev()).map_err(|e| fs_error("archive", &path, e))?;
        let mut writer = tar
            .into_inner()
            .map_err(|e| fs_error("archive", &path, e))?;
        writer.flush().map_err(|e| fs_error("archive", &path, e))
    }));
    while let Some(chunk) = rx.recv().await {
        framed
            .send(&GuestFrame::Chunk(ByteBuf::from(chunk)))
            .await?;
    }
    let reply = match build.await {
        Ok(Ok(())) => GuestFrame::End,
        Ok(Err(e)) => GuestFrame::Error(e),
        Err(_) => GuestFrame::Error(GuestError::new(ErrorKind::Io, "the archiver panicked")),
    };
    framed.send(&reply).await?;
    framed.close().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_archived_by_name_with_links_as_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("b/c")).unwrap();
        std::fs::write(d.path().join("a.txt"), "a").unwrap();
        std::fs::write(d.path().join("b/c/deep.txt"), "deep").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("b/link")).unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        let dev = std::fs::metadata(d.path()).unwrap().dev();
        append_tree(&mut tar, d.path(), dev).unwrap();
        let bytes = tar.into_inner().unwrap();
        let mut archive = tar::Archive::new(&bytes[..]);
        let names: Vec<(String, bool)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let link = e.header().entry_type().is_symlink();
                (e.path().unwrap().display().to_string(), link)
            })
            .collect();
        let expected = [
            ("a.txt", false),
            ("b", false),
            ("b/c", false),
            ("b/link", true),
            ("b/c/deep.txt", false),
        ];
        let expected: Vec<(String, bool)> =
            expected.iter().map(|(n, l)| (n.to_string(), *l)).collect();
        assert_eq!(names, expected);
    }
}
