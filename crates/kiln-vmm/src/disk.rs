//! Copy-on-write root disks: every VM writes only to its own qcow2 overlay.

use std::path::{Path, PathBuf};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("Running qemu-img failed (is qemu-utils installed? scripts/setup.sh installs it)")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-img could not create overlay {overlay} over {backing}: {stderr}")]
    Create {
        overlay: PathBuf,
        backing: PathBuf,
        stderr: String,
    },
    #[error("qemu-img could not copy disk {disk}: {stderr}")]
    Flatten { disk: PathBuf, stderr: String },
}

/// The format of a backing file, as qemu-img names it.
#[derive(Debug, Clone, Copy)]
pub enum BackingFormat {
    Raw,
    Qcow2,
}

/// Creates `overlay` as a qcow2 whose reads fall through to `backing` (never written).
/// With `size_mib`, the overlay is that large (the guest agent grows its filesystem).
pub async fn create_overlay(
    overlay: &Path,
    backing: &Path,
    format: BackingFormat,
    size_mib: Option<u32>,
) -> Result<(), DiskError> {
    let fmt = match format {
        BackingFormat::Raw => "raw",
        BackingFormat::Qcow2 => "qcow2",
    };
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
        .arg(backing)
        .arg(overlay)
        .args(size_mib.map(|m| format!("{m}M")))
        .output()
        .await
        .map_err(DiskError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DiskError::Create {
            overlay: overlay.to_path_buf(),
            backing: backing.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Writes the whole chain under `disk` (its overlay and every backing layer) as one
/// standalone qcow2 at `out`: a copy that needs nothing of kiln's to open.
pub async fn flatten(disk: &Path, out: &Path) -> Result<(), DiskError> {
    let result = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
        .arg(disk)
        .arg(out)
        .output()
        .await
        .map_err(DiskError::Spawn)?;
    if result.status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_file(out);
        Err(DiskError::Flatten {
            disk: disk.to_path_buf(),
            stderr: String::from_utf8_lossy(&result.stderr).trim().to_string(),
        })
    }
}

/// Most files a disk chain may have (a Dockerfile's steps each add one layer).
pub const MAX_CHAIN: usize = 512;

/// The backing file named in a qcow2 header, if any (`None` for raw files). Only headers
/// kiln trusts are read this way: files owned by root that no VM can write.
pub fn backing_file(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    if f.read_exact(&mut header).is_err() || &header[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default());
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > 1023 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: backing file name of {len} bytes", path.display()),
        ));
    }
    let mut name = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    use std::os::unix::ffi::OsStringExt;
    let name = PathBuf::from(std::ffi::OsString::from_vec(name));
    Ok(Some(match path.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    }))
}

/// `base` and every file under it in its backing chain. Each must be a root-owned file that
/// neither group nor others can write: the chain a jail may read is never one a VM made.
pub fn trusted_chain(base: &Path) -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let mut chain = Vec::new();
    let mut next = Some(base.to_path_buf());
    while let Some(file) = next {
        if chain.len() >= MAX_CHAIN {
            return Err(std::io::Error::other(format!(
                "disk chain under {} has over {MAX_CHAIN} files",
                base.display()
            )));
        }
        let meta = std::fs::metadata(&file)?;
        if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "disk layer {} must be a root-owned file no one else can write",
                    file.display()
                ),
            ));
        }
        next = backing_file(&file)?;
        chain.push(file);
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chains_are_read_from_qcow2_headers() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join("top.qcow2");
        create_overlay(&mid, &base, BackingFormat::Raw, None)
            .await
            .unwrap();
        create_overlay(&top, &mid, BackingFormat::Qcow2, None)
            .await
            .unwrap();
        assert_eq!(backing_file(&top).unwrap(), Some(mid.clone()));
        assert_eq!(backing_file(&base).unwrap(), None);
        assert_eq!(trusted_chain(&top).unwrap(), vec![top.clone(), mid, base]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = trusted_chain(&top).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    }
}
