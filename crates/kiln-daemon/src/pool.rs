//! Pre-started QEMUs for hot images (`kiln_vmm::prestart`): after each launch of an image,
//! kilnd starts the next one's QEMU in its jail, in `-incoming defer`, so the next
//! RunMicrovm of that image with the same jail skips the jail, QEMU's start and QMP's
//! handshake. `--prestart-per-image` (default 1, 0: off) per image; at most
//! [`MAX_TEMPLATES`] images are kept hot, the coldest dropped first.
//!
//! Nothing is lost to a crash: each waiting QEMU has a file in `$KILN_HOME/prestarted/`
//! (root's, 0700: never the VM directory its jailed QEMU owns), `<id>.starting` before its
//! QEMU starts and `<id>.json` (its process record) once it runs, and start-up recovery
//! ends every one that no microVM took ([`recover`]). A graceful shutdown ends them too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_types::VmId;
use kiln_vmm::process::ProcessRecord;
use kiln_vmm::{Confinement, PrestartConfig, Prestarted, Template, VmError};
use tracing::{debug, info, warn};

use crate::manager::{new_microvm_id, Manager};

/// Images kept hot at once.
pub const MAX_TEMPLATES: usize = 4;
/// Largest `--prestart-per-image`.
pub const MAX_PER_IMAGE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Id(#[from] kiln_types::InvalidVmId),
    #[error("keeping the pre-started QEMU's record failed")]
    Record(#[from] std::io::Error),
}

/// The waiting QEMUs and how launches were served.
#[derive(Default)]
pub struct Pool {
    per_image: usize,
    /// Oldest first.
    waiting: Mutex<Vec<Waiting>>,
    /// Keys with a prestart under way.
    filling: Mutex<HashSet<String>>,
    /// Launches a pre-started QEMU served, and those that started their own.
    pub served: AtomicU64,
    pub started: AtomicU64,
}

struct Waiting {
    key: String,
    pre: Prestarted,
}

/// Pre-started QEMUs serve launches of the same template in the same jail.
fn key(template: &Path, confinement: &Confinement) -> String {
    format!("{}\u{0}{confinement:?}", template.display())
}

fn records_dir(m: &Manager) -> PathBuf {
    m.cfg.home.join("prestarted")
}

fn record_path(m: &Manager, id: &str) -> PathBuf {
    records_dir(m).join(format!("{id}.json"))
}

fn starting_path(m: &Manager, id: &str) -> PathBuf {
    records_dir(m).join(format!("{id}.starting"))
}

/// Ends a pre-started QEMU no launch takes, then forgets its file (in that order: while
/// the file is there, it is known as a pre-started QEMU, not a microVM's).
fn end(m: &Manager, pre: Prestarted) {
    let record = record_path(m, pre.id().as_str());
    tokio::spawn(async move {
        pre.discard().await;
        let _ = std::fs::remove_file(record);
    });
}

impl Pool {
    pub fn new(per_image: usize) -> Pool {
        Pool {
            per_image: per_image.min(MAX_PER_IMAGE),
            ..Pool::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// QEMUs waiting now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A waiting QEMU for `template` in `confinement`, if one is still current (one whose
    /// QEMU ended or whose template changed is dropped, which ends it).
    pub fn take(
        &self,
        m: &Manager,
        template: &Path,
        confinement: &Confinement,
    ) -> Option<Prestarted> {
        let k = key(template, confinement);
        let mut waiting = self.lock();
        while let Some(i) = waiting.iter().position(|w| w.key == k) {
            let w = waiting.remove(i);
            if w.pre.is_current() {
                return Some(w.pre);
            }
            info!(id = %w.pre.id(), "a pre-started QEMU went stale and is ended");
            end(m, w.pre);
        }
        None
    }

    /// Ends every waiting QEMU of a template under `dir` (its image is being deleted).
    pub fn forget_under(&self, m: &Manager, dir: &Path) {
        let mut waiting = self.lock();
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *waiting)
            .into_iter()
            .partition(|w| w.pre.template().starts_with(dir));
        *waiting = kept;
        drop(waiting);
        for w in gone {
            end(m, w.pre);
        }
    }

    /// Ends every waiting QEMU (graceful shutdown).
    pub async fn drain(&self, m: &Manager) {
        let all = std::mem::take(&mut *self.lock());
        for w in all {
            let id = w.pre.id().to_string();
            w.pre.discard().await;
            let _ = std::fs::remove_file(record_path(m, &id));
        }
    }

    /// The microVM `id` took its pre-started QEMU (its own record now exists).
    pub fn taken(m: &Manager, id: &str) {
        let _ = std::fs::remove_file(record_path(m, id));
    }
}

/// Starts the next QEMU for `template` in `confinement` in the background, unless enough
/// wait or are being started.
pub fn refill(m: &Arc<Manager>, template: &Path, confinement: Confinement) {
    let pool = &m.pool;
    if pool.per_image == 0 {
        return;
    }
    let k = key(template, &confinement);
    {
        let waiting = pool.lock();
        let mut filling = pool.filling.lock().unwrap_or_else(|p| p.into_inner());
        let have = waiting.iter().filter(|w| w.key == k).count();
        if have >= pool.per_image || filling.contains(&k) {
            return;
        }
        filling.insert(k.clone());
    }
    let (m, template) = (m.clone(), template.to_path_buf());
    tokio::spawn(async move {
        let result = prestart(&m, &template, confinement).await;
        m.pool
            .filling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&k);
        match result {
            Ok(pre) => admit(&m, k, pre),
            Err(e) => warn!(
                template = %template.display(),
                "starting a QEMU ahead of the next launch failed (launches start their own): {}",
                kiln_vmm::error_chain(&e)
            ),
        }
    });
}

async fn prestart(
    m: &Arc<Manager>,
    template: &Path,
    confinement: Confinement,
) -> Result<Prestarted, PoolError> {
    let id = new_microvm_id();
    let template = Template::open(template)?.with_spare_overlays(m.spare_overlays_dir());
    let starting = starting_path(m, &id);
    keep_file(m, &starting, b"")?;
    let pre = template
        .prestart(PrestartConfig {
            id: VmId::new(&id)?,
            dir: m.microvm_dir(&id),
            assets: m.assets.clone(),
            timeout: Duration::from_secs(60),
            // It becomes a microVM that outlives kilnd; until then, recovery ends it.
            die_with_parent: false,
            confinement,
        })
        .await;
    let kept = match &pre {
        Ok(pre) => {
            let record = pre.record().map(serde_json::to_vec).transpose();
            record
                .map_err(std::io::Error::other)
                .and_then(|r| keep_file(m, &record_path(m, &id), &r.unwrap_or_default()))
        }
        Err(_) => Ok(()),
    };
    let _ = std::fs::remove_file(&starting);
    let pre = pre?;
    if let Err(e) = kept {
        // Without its record a crash could not end it: it does not wait.
        end(m, pre);
        return Err(e.into());
    }
    Ok(pre)
}

/// Writes a new file of kilnd's own (0600 in a 0700 directory), durably.
fn keep_file(m: &Manager, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(records_dir(m))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Adds `pre` to the pool, dropping the oldest waiting QEMU of the coldest image when
/// more than [`MAX_TEMPLATES`] images would be hot.
fn admit(m: &Manager, k: String, pre: Prestarted) {
    let mut waiting = m.pool.lock();
    let mut keys: Vec<&str> = Vec::new();
    for w in waiting.iter() {
        if !keys.contains(&w.key.as_str()) {
            keys.push(&w.key);
        }
    }
    let evict = if !keys.contains(&k.as_str()) && keys.len() >= MAX_TEMPLATES {
        keys.first().map(|s| s.to_string())
    } else {
        None
    };
    let mut dropped = Vec::new();
    if let Some(old) = evict {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *waiting)
            .into_iter()
            .partition(|w| w.key == old);
        *waiting = kept;
        dropped = gone;
    }
    debug!(id = %pre.id(), "a pre-started QEMU waits for the next launch");
    waiting.push(Waiting { key: k, pre });
    drop(waiting);
    for w in dropped {
        end(m, w.pre);
    }
}

/// Start-up: ends every QEMU an earlier kilnd started ahead and no microVM took (those a
/// microVM took are its own: its record and state say what became of it).
pub async fn recover(m: &Manager) {
    let Ok(entries) = std::fs::read_dir(records_dir(m)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_suffix(".json")
            .or_else(|| name.strip_suffix(".starting"))
            .filter(|id| VmId::new(*id).is_ok())
        else {
            let _ = std::fs::remove_file(&path);
            continue;
        };
        let taken = m.store().microvm(id).ok().flatten().is_some();
        if !taken {
            if name.ends_with(".json") {
                match std::fs::read(&path).map(|b| serde_json::from_slice::<ProcessRecord>(&b)) {
                    Ok(Ok(record)) => {
                        record.kill_if_running();
                        record.release_jail().await;
                    }
                    Ok(Err(e)) => warn!(id, "a pre-started QEMU's record is unreadable: {e}"),
                    Err(e) => warn!(id, "a pre-started QEMU's record is unreadable: {e}"),
                }
            }
            // Started, or starting, before its record was written: by its pid file.
            crate::recovery::kill_leftover_qemu(&m.microvm_dir(id));
            let _ = std::fs::remove_dir_all(m.microvm_dir(id));
            info!(
                id,
                "a QEMU started ahead of a launch that never came was ended"
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
