//! Overlays made ahead: a launch takes a ready, empty qcow2 overlay over its template's
//! disk instead of running qemu-img on its critical path, and the next one is made in the
//! background after it. A spare is keyed by the template disk's path, size, inode and
//! modification time, so one made over a file that was since replaced is never taken.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::disk::{self, BackingFormat};

/// The spare for `template_disk` in `dir`, or None if the disk cannot be read.
fn spare_path(dir: &Path, template_disk: &Path) -> Option<PathBuf> {
    let meta = std::fs::metadata(template_disk).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        template_disk,
        meta.len(),
        meta.ino(),
        meta.dev(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
        .hash(&mut h);
    Some(dir.join(format!("{:016x}.qcow2", h.finish())))
}

/// Moves the spare overlay over `template_disk` (if one is ready in `dir`) to `disk`.
pub(crate) fn take(dir: &Path, template_disk: &Path, disk: &Path) -> bool {
    spare_path(dir, template_disk).is_some_and(|spare| std::fs::rename(spare, disk).is_ok())
}

/// Makes the next spare over `template_disk` in `dir`, in the background (written under a
/// temporary name, then renamed into place).
pub(crate) fn make(dir: &Path, template_disk: &Path) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some(spare) = spare_path(dir, template_disk) else {
        return;
    };
    if spare.exists() || std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(
        ".{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let template_disk = template_disk.to_path_buf();
    tokio::spawn(async move {
        match disk::create_overlay(&tmp, &template_disk, BackingFormat::Qcow2, None).await {
            Ok(()) => {
                if std::fs::rename(&tmp, &spare).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!("making a spare overlay failed: {e}");
            }
        }
    });
}

/// Removes every spare in `dir` (those of deleted templates included).
pub fn clear(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spare_is_taken_once_and_only_for_the_disk_it_was_made_over() {
        let dir = tempfile::tempdir().unwrap();
        let spares = dir.path().join("spares");
        let base = dir.path().join("base.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("16M")
            .status()
            .unwrap();
        assert!(out.success());
        let disk = dir.path().join("disk.qcow2");
        assert!(!take(&spares, &base, &disk), "none made yet");
        make(&spares, &base);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !take(&spares, &base, &disk) {
            assert!(std::time::Instant::now() < deadline, "no spare was made");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(disk::backing_file(&disk).unwrap(), Some(base.clone()));
        assert!(
            !take(&spares, &base, &dir.path().join("again.qcow2")),
            "taken once"
        );
        // A spare over a file since replaced is not taken.
        make(&spares, &base);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_dir(&spares)
            .unwrap()
            .flatten()
            .all(|e| e.file_name().to_string_lossy().starts_with('.'))
        {
            assert!(std::time::Instant::now() < deadline, "no spare was made");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        std::fs::remove_file(&base).unwrap();
        std::fs::write(&base, b"another file").unwrap();
        assert!(!take(&spares, &base, &dir.path().join("stale.qcow2")));
        clear(&spares);
        assert!(!spares.exists());
    }
}
