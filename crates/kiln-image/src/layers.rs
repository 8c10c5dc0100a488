//! The step cache: qcow2 layers keyed by step hash. Each layer's backing file is its
//! parent layer (or the base), named by absolute path, so layers never move. Each build
//! writes its layers in a staging directory of its own (`b-<nonce>-<pid>/`).

use std::path::{Path, PathBuf};

pub struct LayerStore {
    dir: PathBuf,
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl LayerStore {
    pub fn open(dir: &Path) -> std::io::Result<LayerStore> {
        std::fs::create_dir_all(dir.join("index"))?;
        Ok(LayerStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The layer recorded for `key`, if its file is still there.
    pub fn lookup(&self, key: &str) -> Option<PathBuf> {
        let name = std::fs::read_to_string(self.dir.join("index").join(key)).ok()?;
        let path = self.dir.join(name.trim());
        path.is_file().then_some(path)
    }

    /// A new directory for one build's layers: the build VM's jail may write there and
    /// nowhere else in the store. Layers never move out of it (their backing paths are
    /// absolute); once finished they are root's and read-only.
    pub fn staging_dir(&self) -> std::io::Result<PathBuf> {
        let dir = self
            .dir
            .join(format!("b-{:016x}-{}", nanos(), std::process::id()));
        std::fs::create_dir(&dir)?;
        Ok(dir)
    }

    /// A fresh path for a build's writable top, in its staging directory.
    pub fn new_top(&self, staging: &Path) -> PathBuf {
        staging.join(format!("{:016x}.qcow2", nanos()))
    }

    /// Ends a build's staging directory (after the build, or after it was interrupted):
    /// layers the index records stay, read-only and root's; anything else (an unfinished
    /// top) is removed, and so is the directory once empty.
    pub fn settle_staging(&self, staging: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if !staging.starts_with(&self.dir) || !staging.is_dir() {
            return Ok(());
        }
        let mut recorded = std::collections::HashSet::new();
        for entry in std::fs::read_dir(self.dir.join("index"))?.flatten() {
            if let Ok(name) = std::fs::read_to_string(entry.path()) {
                recorded.insert(self.dir.join(name.trim()));
            }
        }
        let mut kept = 0;
        for entry in std::fs::read_dir(staging)?.flatten() {
            let path = entry.path();
            if recorded.contains(&path) && entry.file_type()?.is_file() {
                std::os::unix::fs::lchown(&path, Some(0), Some(0))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))?;
                kept += 1;
            } else if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        if kept == 0 {
            std::fs::remove_dir(staging)
        } else {
            std::os::unix::fs::lchown(staging, Some(0), Some(0))?;
            std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o755))
        }
    }

    /// Records a finished layer under `key` (atomically).
    pub fn record(&self, key: &str, layer: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        // The layer was a jailed QEMU's: only a regular file is taken (never a link).
        if !std::fs::symlink_metadata(layer)?.file_type().is_file() {
            return Err(std::io::Error::other(format!(
                "layer {} is not a regular file",
                layer.display()
            )));
        }
        std::fs::set_permissions(layer, std::fs::Permissions::from_mode(0o444))?;
        let name = layer
            .strip_prefix(&self.dir)
            .ok()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let tmp = self.dir.join("index").join(format!(".{key}.tmp"));
        std::fs::write(&tmp, name)?;
        std::fs::rename(tmp, self.dir.join("index").join(key))
    }
}
