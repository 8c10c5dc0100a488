//! The step cache: qcow2 layers keyed by step hash. Each layer's backing file is its
//! parent layer (or the base), named by absolute path, so layers never move.

use std::path::{Path, PathBuf};

pub struct LayerStore {
    dir: PathBuf,
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

    /// A fresh path for a build's writable top.
    pub fn new_top(&self) -> PathBuf {
        let nonce: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.dir
            .join(format!("{:016x}-{}.qcow2", nonce, std::process::id()))
    }

    /// Records a finished layer under `key` (atomically).
    pub fn record(&self, key: &str, layer: &Path) -> std::io::Result<()> {
        let name = layer
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let tmp = self.dir.join("index").join(format!(".{key}.tmp"));
        std::fs::write(&tmp, name)?;
        std::fs::rename(tmp, self.dir.join("index").join(key))
    }
}
