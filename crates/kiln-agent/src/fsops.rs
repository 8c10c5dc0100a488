//! The files API's metadata operations (list, stat, mkdir, remove, rename), each run as the
//! requesting guest user ([`crate::creds`]).

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_proto::{
    ErrorKind, FileEntry, FileKind, FrameError, FramedStream, FsOp, FsRequest, GuestError,
    GuestFrame, Stream,
};

use crate::creds::{as_user, fs_error};

/// Entries per `Entries` frame: well under the frame limit with long names.
const ENTRIES_PER_FRAME: usize = 256;

/// An absolute path without NUL bytes, as the guest's kernel takes it.
pub fn absolute(path: &str) -> Result<PathBuf, GuestError> {
    if path.starts_with('/') && !path.contains('\0') {
        Ok(PathBuf::from(path))
    } else {
        Err(GuestError::new(
            ErrorKind::InvalidRequest,
            format!("path {path:?} must be absolute"),
        ))
    }
}

/// One path's metadata, not following a final symlink.
pub fn entry(path: &Path) -> Result<FileEntry, GuestError> {
    let shown = path.display().to_string();
    let meta = std::fs::symlink_metadata(path).map_err(|e| fs_error("stat", &shown, e))?;
    let kind = if meta.file_type().is_symlink() {
        FileKind::Symlink
    } else if meta.is_dir() {
        FileKind::Directory
    } else if meta.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let link_target = (kind == FileKind::Symlink)
        .then(|| std::fs::read_link(path).ok())
        .flatten()
        .map(|t| t.display().to_string());
    Ok(FileEntry {
        name: path
            .file_name()
            .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned()),
        path: shown,
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        modified_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        link_target,
    })
}

pub async fn serve(mut framed: FramedStream<Stream>, req: FsRequest) -> Result<(), FrameError> {
    if let FsOp::List { path, limit } = req.op {
        return list(framed, path, limit, req.user).await;
    }
    let reply = match as_user(req.user, move || run(req.op)).await {
        Ok(Some(entry)) => GuestFrame::Entry(entry),
        Ok(None) => GuestFrame::Ok,
        Err(e) => GuestFrame::Error(e),
    };
    framed.send(&reply).await
}

/// Every operation but `List`; the entry it answers with, if any.
fn run(op: FsOp) -> Result<Option<FileEntry>, GuestError> {
    match op {
        FsOp::List { .. } => Err(GuestError::new(ErrorKind::InvalidRequest, "list")),
        FsOp::Stat { path } => entry(&absolute(&path)?).map(Some),
        FsOp::Mkdir {
            path,
            mode,
            parents,
        } => {
            let dir = absolute(&path)?;
            std::fs::DirBuilder::new()
                .recursive(parents)
                .mode(mode & 0o7777)
                .create(&dir)
                .map_err(|e| fs_error("mkdir", &path, e))?;
            entry(&dir).map(Some)
        }
        FsOp::Remove { path, recursive } => {
            let target = absolute(&path)?;
            if target.parent().is_none() {
                return Err(GuestError::new(
                    ErrorKind::InvalidRequest,
                    "refusing to remove /",
                ));
            }
            let is_dir = entry(&target)?.kind == FileKind::Directory;
            let removed = match (is_dir, recursive) {
                (true, true) => std::fs::remove_dir_all(&target),
                (true, false) => std::fs::remove_dir(&target),
                (false, _) => std::fs::remove_file(&target),
            };
            removed.map_err(|e| fs_error("remove", &path, e))?;
            Ok(None)
        }
        FsOp::Rename { from, to } => {
            let (src, dst) = (absolute(&from)?, absolute(&to)?);
            std::fs::rename(&src, &dst)
                .map_err(|e| fs_error("rename", &format!("{from} to {to}"), e))?;
            entry(&dst).map(Some)
        }
    }
}

/// Lists a directory by name, at most `limit` entries, in frames of [`ENTRIES_PER_FRAME`].
async fn list(
    mut framed: FramedStream<Stream>,
    path: String,
    limit: u32,
    user: Option<String>,
) -> Result<(), FrameError> {
    let listed = as_user(user, move || {
        let dir = absolute(&path)?;
        let read = std::fs::read_dir(&dir).map_err(|e| fs_error("list", &path, e))?;
        let mut names = Vec::new();
        for item in read {
            let item = item.map_err(|e| fs_error("list", &path, e))?;
            names.push(item.path());
        }
        names.sort();
        names.truncate(limit as usize);
        // An entry removed between the listing and its stat is left out.
        Ok(names
            .iter()
            .filter_map(|p| entry(p).ok())
            .collect::<Vec<_>>())
    })
    .await;
    let entries = match listed {
        Ok(e) => e,
        Err(e) => return framed.send(&GuestFrame::Error(e)).await,
    };
    for batch in entries.chunks(ENTRIES_PER_FRAME) {
        framed.send(&GuestFrame::Entries(batch.to_vec())).await?;
    }
    framed.send(&GuestFrame::End).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_follow_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().display().to_string();
        let deep = format!("{base}/a/b");
        let made = run(FsOp::Mkdir {
            path: deep.clone(),
            mode: 0o750,
            parents: true,
        })
        .unwrap()
        .unwrap();
        assert_eq!((made.kind, made.name.as_str()), (FileKind::Directory, "b"));
        std::fs::write(format!("{deep}/f"), b"hello").unwrap();
        let f = run(FsOp::Stat {
            path: format!("{deep}/f"),
        })
        .unwrap()
        .unwrap();
        assert_eq!((f.kind, f.size), (FileKind::File, 5));
        let err = run(FsOp::Remove {
            path: format!("{base}/a"),
            recursive: false,
        })
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Conflict, "{err}");
        let moved = run(FsOp::Rename {
            from: format!("{deep}/f"),
            to: format!("{base}/g"),
        })
        .unwrap()
        .unwrap();
        assert_eq!(moved.path, format!("{base}/g"));
        run(FsOp::Remove {
            path: format!("{base}/a"),
            recursive: true,
        })
        .unwrap();
        assert!(!Path::new(&deep).exists());
        let missing = run(FsOp::Stat {
            path: format!("{base}/nope"),
        })
        .unwrap_err();
        assert_eq!(missing.kind, ErrorKind::NotFound);
        let relative = run(FsOp::Stat { path: "etc".into() }).unwrap_err();
        assert_eq!(relative.kind, ErrorKind::InvalidRequest);
        let root = run(FsOp::Remove {
            path: "/".into(),
            recursive: true,
        })
        .unwrap_err();
        assert!(root.message.contains("refusing"), "{root}");
    }
}
