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
