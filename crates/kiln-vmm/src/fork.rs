//! Fork: a running guest copied into N suspended clones, each in its own directory, then
//! resumed like any suspended VM. The parent pauses only while its devices, its memory diff
//! and its disk overlay are copied.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_types::VmId;
use serde_json::json;
use tracing::{info, Instrument};

use crate::disk;
use crate::machine::VmPaths;
use crate::manifest::{Manifest, SnapshotKind};
use crate::network::NetworkAttachment;
use crate::snapshot::{
    clone_manifest, keep_boot_files, SuspendedVm, Template, BOOT_DIR, DIFF_FILE, DISK_FILE,
    MEMORY_FILE, STATE_FILE, SUSPEND_DIR,
};
use crate::vm::{connect_agent, create_vm_dir, remove_dir, Vm, VmError};

/// How long the agent gets to end its session before the parent pauses.
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);
/// A fork makes at most this many clones at once.
pub const MAX_FORK: usize = 100;
/// The parent's scratch directory while it forks (removed after, or on re-adoption).
pub const WORK_DIR: &str = "fork";

/// Where one clone of a fork goes.
#[derive(Debug, Clone)]
pub struct ForkTarget {
    pub id: VmId,
    /// Its directory; must not exist yet.
    pub dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Dir {
        path: path.to_path_buf(),
        source,
    }
}

impl Vm {
    /// Copies this running guest into one suspended VM per target (memory, devices and
    /// disk as they are at one instant), then lets it run on with a new agent session.
    /// Only a template-launched guest forks: the clones are its template plus its diff.
    /// On failure no clone directory is left and the guest runs on.
    pub async fn fork(&mut self, targets: &[ForkTarget]) -> Result<Vec<SuspendedVm>, VmError> {
        let span = self.span.clone();
        async move {
            if targets.is_empty() || targets.len() > MAX_FORK {
                return Err(self.invalid(format!("a fork makes 1 to {MAX_FORK} clones")));
            }
            if self.active_disk != self.paths.disk() {
                return Err(self.invalid("an image build's VM cannot be forked".into()));
            }
            let ram = match self.guest_ram() {
                Some(ram) => ram?,
                None => {
                    return Err(self.invalid(
                        "only a microVM launched from a template can be forked (this one holds all of its RAM)".into(),
                    ))
                }
            };
            if let Some(t) = targets.iter().find(|t| t.dir.exists()) {
                return Err(VmError::DirExists(t.dir.clone()));
            }
            let started = Instant::now();
            let work = self.paths.dir.join(WORK_DIR);
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir(&work).map_err(io_err(&work))?;
            self.give_to_jail(&work).map_err(io_err(&work))?;
            if let Err(e) = self.agent.detach(DETACH_TIMEOUT).await {
                tracing::warn!("agent did not detach cleanly before the fork: {e}");
            }
            let written = self.write_clones(ram, &work, targets).await;
            let paused_ms = started.elapsed().as_millis() as u64;
            // The parent runs on whatever happened to its clones.
            let resumed = self.qmp("cont", json!({})).await;
            let _ = std::fs::remove_dir_all(&work);
            let reconnected = connect_agent(&self.id, &self.paths, &self.process, Duration::from_secs(60)).await;
            let clones = match written {
                Ok(clones) => clones,
                Err(e) => {
                    for t in targets {
                        let _ = remove_dir(&t.dir);
                    }
                    resumed?;
                    self.agent = reconnected?;
                    return Err(e);
                }
            };
            resumed?;
            self.agent = reconnected?;
            info!(clones = clones.len(), paused_ms, elapsed_ms = started.elapsed().as_millis() as u64, "forked");
            Ok(clones)
        }
        .instrument(span)
        .await
    }

    fn invalid(&self, reason: String) -> VmError {
        VmError::Invalid {
            id: self.id.clone(),
            reason,
        }
    }

    /// Stops the guest and writes every clone (the guest stays stopped).
    async fn write_clones(
        &self,
        ram: crate::memdiff::GuestRam,
        work: &Path,
        targets: &[ForkTarget],
    ) -> Result<Vec<SuspendedVm>, VmError> {
        let state = work.join(STATE_FILE);
        self.save_devices(&state).await?;
        crate::fault::point("fork.paused");
        let diff_path = work.join(DIFF_FILE);
        let diff = self.save_diff(ram, &diff_path).await?;
        // `stop` flushed the disk: its overlay is consistent while the guest is stopped.
        let mut clones = Vec::with_capacity(targets.len());
        for target in targets {
            create_vm_dir(&target.dir)?;
            let paths = VmPaths::new(&target.dir);
            let suspend_dir = target.dir.join(SUSPEND_DIR);
            std::fs::create_dir(&suspend_dir).map_err(io_err(&suspend_dir))?;
            let (from_disk, to_disk) = (self.paths.disk(), paths.disk());
            tokio::task::spawn_blocking(move || std::fs::copy(&from_disk, &to_disk).map(|_| ()))
                .await
                .map_err(|e| self.invalid(format!("copying the disk panicked: {e}")))?
                .map_err(io_err(&paths.disk()))?;
            let clone_state = suspend_dir.join(STATE_FILE);
            std::fs::copy(&state, &clone_state).map_err(io_err(&clone_state))?;
            let clone_diff = suspend_dir.join(DIFF_FILE);
            if std::fs::hard_link(&diff_path, &clone_diff).is_err() {
                std::fs::copy(&diff_path, &clone_diff).map_err(io_err(&clone_diff))?;
            }
            keep_boot_files(&self.assets, &target.dir.join(BOOT_DIR))?;
            let manifest = clone_manifest(
                self,
                &target.id,
                SnapshotKind::Suspended,
                &clone_state,
                diff.clone(),
            )?;
            manifest.write(&suspend_dir).map_err(io_err(&suspend_dir))?;
            clones.push(SuspendedVm::open(
                target.id.clone(),
                &target.dir,
                self.assets.clone(),
                self.die_with_parent,
                self.confinement.clone(),
            )?);
        }
        crate::fault::point("fork.written");
        Ok(clones)
    }
}

impl SuspendedVm {
    /// Where the clone's NIC leads, builder style.
    pub fn with_network(mut self, network: NetworkAttachment) -> SuspendedVm {
        self.set_network(network);
        self
    }
}

impl Template {
    /// "Save as image": makes the fork clone in `clone_dir` (written by [`Vm::fork`], never
    /// resumed) into a standalone template at `dir` (which must not exist): its RAM is the
    /// parent's template with the clone's diff applied, its disk the clone's overlay
    /// flattened over the chain kiln recorded, its state the clone's device state. It needs
    /// neither the parent's image nor the clone afterwards; `clone_dir` is removed.
    pub async fn from_fork(clone_dir: &Path, dir: &Path) -> Result<Template, VmError> {
        let started = Instant::now();
        let suspended = Manifest::read(&clone_dir.join(SUSPEND_DIR))?;
        let id = VmId::new(&suspended.vm_id).map_err(|e| VmError::Dir {
            path: clone_dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let invalid = |reason: String| VmError::Invalid {
            id: id.clone(),
            reason,
        };
        let (Some(diff), Some(disk_base)) = (&suspended.memory_diff, &suspended.disk_backing)
        else {
            return Err(invalid(
                "the clone holds no memory diff over a template".into(),
            ));
        };
        create_vm_dir(dir)?;
        let result = async {
            let from = clone_dir.join(SUSPEND_DIR);
            let memory = dir.join(MEMORY_FILE);
            let (base, diff_path, summary, out) = (
                PathBuf::from(&diff.base),
                from.join(DIFF_FILE),
                diff.clone(),
                memory.clone(),
            );
            tokio::task::spawn_blocking(move || {
                crate::memdiff::materialize(&base, &diff_path, &summary, &out)
            })
            .await
            .map_err(|e| invalid(format!("writing the memory panicked: {e}")))?
            .map_err(|e| invalid(crate::error_chain(&e)))?;
            let disk = dir.join(DISK_FILE);
            disk::flatten(&clone_dir.join(DISK_FILE), Path::new(disk_base), &disk).await?;
            let state = dir.join(STATE_FILE);
            std::fs::rename(from.join(STATE_FILE), &state).map_err(io_err(&state))?;
            std::fs::rename(clone_dir.join(BOOT_DIR), dir.join(BOOT_DIR)).map_err(io_err(dir))?;
            for file in [&memory, &disk, &state] {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o444))
                    .map_err(io_err(file))?;
            }
            let manifest = Manifest {
                kind: SnapshotKind::Template,
                memory_bytes: Some(diff.ram_bytes),
                memory_diff: None,
                disk_backing: None,
                devices_only_state: true,
                ..suspended.clone()
            };
            manifest.write(dir).map_err(io_err(dir))?;
            Ok::<_, VmError>(Template::from_parts(dir, manifest))
        }
        .await;
        if result.is_err() {
            let _ = remove_dir(dir);
        }
        let template = result?;
        let _ = remove_dir(clone_dir);
        info!(elapsed_ms = started.elapsed().as_millis() as u64, dir = %dir.display(), "template saved from a running guest");
        Ok(template)
    }
}
