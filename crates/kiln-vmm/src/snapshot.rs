//! Template snapshots, copy-on-write launches, suspend and resume.
//!
//! - template = shared RAM file + device state saved with `x-ignore-shared` + the frozen
//!   disk overlay + manifest;
//! - launch = new QEMU mapping the RAM file privately (pages load lazily; clean pages are
//!   shared by every clone), state loaded, fresh overlay on the template disk;
//! - suspend = full RAM + device state of one VM to a file; its disk overlay is kept;
//! - resume = new QEMU loading that file into anonymous memory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kiln_types::VmId;
use tracing::{info, info_span, Instrument};

use crate::assets::GuestAssets;
use crate::confine::Confinement;
use crate::disk::{self, BackingFormat};
use crate::machine::{
    restore_signature, MachineSpec, MemoryBacking, StateFormat, VmPaths, MACHINE_LAYOUT_VERSION,
};
use crate::manifest::{
    sha256_file, HostFacts, Manifest, ManifestMismatch, SnapshotKind, MANIFEST_FORMAT,
};
use crate::memdiff::DiffSummary;
use crate::network::NetworkAttachment;
use crate::start::{BeforeRun, QemuSpec, StartSpec};
use crate::vm::{create_vm_dir, remove_dir, Incoming, SavedVm, Vm, VmError};

pub(crate) const STATE_FILE: &str = "device.state";
pub(crate) const DIFF_FILE: &str = "memory.diff";
pub(crate) const MEMORY_FILE: &str = "memory.ram";
pub(crate) const DISK_FILE: &str = "disk.qcow2";
pub(crate) const SUSPEND_DIR: &str = "suspended";
/// The kernel and initramfs a snapshot's guest was booted with, kept beside it (laid out as a
/// [`GuestAssets`] directory) so that a kernel or agent update on the host never breaks it.
pub(crate) const BOOT_DIR: &str = "boot";
/// How long the agent gets to end its session before a snapshot.
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);

/// A template snapshot on disk, ready to launch clones from.
#[derive(Debug, Clone)]
pub struct Template {
    dir: PathBuf,
    manifest: Manifest,
    /// Where disk overlays are made ahead of launches ([`crate::spare`]); none: each launch
    /// makes its own.
    spares: Option<PathBuf>,
}

/// Where and how to launch a clone.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub id: VmId,
    pub dir: PathBuf,
    /// When given, must match the template's machine exactly.
    pub machine: Option<MachineSpec>,
    pub assets: GuestAssets,
    pub timeout: Duration,
    pub die_with_parent: bool,
    /// Where the NIC (templates from image builds have one) leads.
    pub network: NetworkAttachment,
    /// QEMU's jail (or `--no-jail`).
    pub confinement: Confinement,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Dir {
        path: path.to_path_buf(),
        source,
    }
}

fn manifest_for(
    saved: &SavedVm,
    kind: SnapshotKind,
    state: &Path,
    memory_bytes: Option<u64>,
    memory_diff: Option<DiffSummary>,
) -> Result<Manifest, VmError> {
    let host = HostFacts::new(&saved.assets);
    Ok(Manifest {
        format_version: MANIFEST_FORMAT,
        kind,
        vm_id: saved.id.to_string(),
        created_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        machine: saved.machine.clone(),
        machine_layout: MACHINE_LAYOUT_VERSION,
        kernel_cmdline: saved.kernel_cmdline.clone(),
        kernel_version: host.kernel_version,
        initramfs_key: host.initramfs_key,
        qemu_version: host.qemu_version,
        qemu_build: crate::manifest::qemu_version().to_string(),
        machine_args: restore_signature(&saved.machine),
        state_sha256: sha256_file(state).map_err(io_err(state))?,
        state_bytes: std::fs::metadata(state).map_err(io_err(state))?.len(),
        memory_bytes,
        disk_backing: saved
            .disk_base
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        devices_only_state: memory_diff.is_some(),
        memory_diff,
    })
}

/// The manifest of a snapshot of the running `vm` taken as VM `id` (a fork's clone).
pub(crate) fn clone_manifest(
    vm: &Vm,
    id: &VmId,
    kind: SnapshotKind,
    state: &Path,
    memory_diff: DiffSummary,
) -> Result<Manifest, VmError> {
    let mut saved = vm.saved_view();
    saved.id = id.clone();
    manifest_for(&saved, kind, state, None, Some(memory_diff))
}

/// Keeps the guest's kernel and initramfs in `dir` (hard links where the filesystem allows,
/// copies otherwise), read-only.
pub(crate) fn keep_boot_files(assets: &GuestAssets, dir: &Path) -> Result<(), VmError> {
    // The VM's directory may have been a jailed QEMU's: a link there is not followed.
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(VmError::Dir {
            path: dir.to_path_buf(),
            source: std::io::Error::other("a symbolic link where the boot files go"),
        });
    }
    let kernel_dir = dir.join("kernel");
    std::fs::create_dir_all(&kernel_dir).map_err(io_err(&kernel_dir))?;
    // The kernel keeps its name: `vmlinux` (PVH) or `vmlinuz`, as GuestAssets looks for them.
    let kernel_name = assets
        .kernel
        .file_name()
        .unwrap_or_else(|| "vmlinuz".as_ref());
    let files = [
        (assets.kernel.clone(), kernel_dir.join(kernel_name)),
        (assets.initramfs.clone(), dir.join("initramfs.cpio")),
    ];
    for (from, to) in files {
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(io_err(&to))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444))
                .map_err(io_err(&to))?;
        }
    }
    let texts = [
        (kernel_dir.join("version"), &assets.kernel_version),
        (dir.join("initramfs.key"), &assets.initramfs_key),
    ];
    for (path, text) in texts {
        crate::vm::write_new(&path, format!("{text}\n").as_bytes()).map_err(io_err(&path))?;
    }
    Ok(())
}

/// The boot files kept in `dir`, or `fallback` (the host's) for snapshots that keep none.
fn boot_assets(dir: &Path, fallback: &GuestAssets) -> GuestAssets {
    GuestAssets::open(&dir.join(BOOT_DIR)).unwrap_or_else(|_| fallback.clone())
}

pub(crate) fn verify_state(id: &VmId, manifest: &Manifest, state: &Path) -> Result<(), VmError> {
    let actual = sha256_file(state).map_err(io_err(state))?;
    if actual != manifest.state_sha256 {
        return Err(VmError::Invalid {
            id: id.clone(),
            reason: format!(
                "state file {} does not match its manifest checksum: the snapshot is corrupt",
                state.display()
            ),
        });
    }
    Ok(())
}

impl Vm {
    /// Freezes this VM into a template in `dir` (which must not exist). The VM is consumed:
    /// its RAM file and disk overlay become the template's.
    pub async fn snapshot_template(self, dir: &Path) -> Result<Template, VmError> {
        let span = self.span.clone();
        async move {
            let started = Instant::now();
            let MemoryBacking::SharedFile(ram) = self.memory.clone() else {
                return Err(VmError::Invalid {
                    id: self.id.clone(),
                    reason: "only a cold-booted VM (shared RAM file) can become a template".into(),
                });
            };
            create_vm_dir(dir)?;
            let result = async {
                if let Err(e) = self.agent.detach(DETACH_TIMEOUT).await {
                    tracing::warn!("agent did not detach cleanly before the snapshot: {e}");
                }
                // Written in the VM's own directory (all its jail may write), then moved.
                let written = self.paths.dir.join(STATE_FILE);
                self.save_state(&written, true).await?;
                let memory_bytes = u64::from(self.machine.memory_mib) << 20;
                let saved = self.finish_after_save().await;
                let state = dir.join(STATE_FILE);
                for (from, to) in [(ram, dir.join(MEMORY_FILE)), (saved.active_disk.clone(), dir.join(DISK_FILE)), (written, state.clone())] {
                    crate::vm::regular_file(&saved.id, &from)?;
                    std::fs::rename(&from, &to).map_err(io_err(&to))?;
                    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444)).map_err(io_err(&to))?;
                }
                remove_dir(&saved.paths.dir)?;
                keep_boot_files(&saved.assets, &dir.join(BOOT_DIR))?;
                let manifest = manifest_for(&saved, SnapshotKind::Template, &state, Some(memory_bytes), None)?;
                manifest.write(dir).map_err(io_err(dir))?;
                Ok::<_, VmError>(Template::from_parts(dir, manifest))
            }
            .await;
            if result.is_err() {
                let _ = remove_dir(dir);
            }
            let template = result?;
            info!(elapsed_ms = started.elapsed().as_millis() as u64, dir = %dir.display(), "template snapshot taken");
            Ok(template)
        }
        .instrument(span)
        .await
    }

    /// Removes the suspended state a resume came from, or a suspend left half-written.
    pub fn forget_suspended_state(&self) {
        let _ = std::fs::remove_dir_all(self.paths.dir.join(SUSPEND_DIR));
        // An interrupted fork's work directory (its clones are the daemon's to end).
        let _ = std::fs::remove_dir_all(self.paths.dir.join(crate::fork::WORK_DIR));
    }

    /// Suspends this VM into `<dir>/suspended/`; QEMU ends and its memory is freed. A guest
    /// launched from a template saves only the pages that differ from it (`memdiff`) and its
    /// device state; any other (a cold-booted or old-style resumed VM) saves all of its RAM.
    /// The disk overlay stays in place.
    pub async fn suspend(self) -> Result<SuspendedVm, VmError> {
        let span = self.span.clone();
        async move {
            let started = Instant::now();
            if self.active_disk != self.paths.disk() {
                return Err(VmError::Invalid {
                    id: self.id.clone(),
                    reason: "a VM whose disk lives outside its directory (an image build) cannot be suspended".into(),
                });
            }
            let suspend_dir = self.paths.dir.join(SUSPEND_DIR);
            std::fs::create_dir_all(&suspend_dir).map_err(io_err(&suspend_dir))?;
            self.give_to_jail(&suspend_dir).map_err(io_err(&suspend_dir))?;
            if let Err(e) = self.agent.detach(DETACH_TIMEOUT).await {
                tracing::warn!("agent did not detach cleanly before suspend: {e}");
            }
            let state = suspend_dir.join(STATE_FILE);
            let saved = match self.guest_ram() {
                Some(ram) => async {
                    let ram = ram?;
                    self.save_devices(&state).await?;
                    crate::fault::point("suspend.saving");
                    self.save_diff(ram, &suspend_dir.join(DIFF_FILE)).await
                }
                .await
                .map(Some),
                None => self.save_state(&state, false).await.map(|()| None),
            };
            let diff = match saved {
                Ok(diff) => diff,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&suspend_dir);
                    return Err(e);
                }
            };
            let memory = self.memory.clone();
            let saved = self.finish_after_save().await;
            if let MemoryBacking::SharedFile(ram) = memory {
                let _ = std::fs::remove_file(ram);
            }
            // The boot files stay in the VM's directory: a resume boots what the guest had.
            let boot = saved.paths.dir.join(BOOT_DIR);
            if saved.assets.dir != boot {
                keep_boot_files(&saved.assets, &boot)?;
            }
            let manifest = manifest_for(&saved, SnapshotKind::Suspended, &state, None, diff)?;
            manifest.write(&suspend_dir).map_err(io_err(&suspend_dir))?;
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                bytes = manifest.state_bytes + manifest.memory_diff.as_ref().map_or(0, |d| d.file_bytes),
                "suspended"
            );
            Ok(SuspendedVm {
                assets: boot_assets(&saved.paths.dir, &saved.assets),
                id: saved.id,
                paths: saved.paths,
                manifest,
                die_with_parent: saved.die_with_parent,
                network: saved.network,
                confinement: saved.confinement,
            })
        }
        .instrument(span)
        .await
    }
}

impl Template {
    /// Opens a template directory and reads its manifest.
    pub fn open(dir: &Path) -> Result<Template, VmError> {
        let manifest = Manifest::read(dir)?;
        if manifest.kind != SnapshotKind::Template {
            return Err(VmError::NotTemplate {
                dir: dir.to_path_buf(),
                kind: manifest.kind,
            });
        }
        Ok(Template {
            dir: dir.to_path_buf(),
            manifest,
            spares: None,
        })
    }

    pub(crate) fn from_parts(dir: &Path, manifest: Manifest) -> Template {
        Template {
            dir: dir.to_path_buf(),
            manifest,
            spares: None,
        }
    }

    /// Launches take disk overlays made ahead in `dir` (and make the next one after).
    pub fn with_spare_overlays(mut self, dir: PathBuf) -> Template {
        self.spares = Some(dir);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether this host can launch the template (`host`: the host's guest assets, used
    /// when the template keeps no boot files of its own); the error names every difference.
    pub fn compatibility(&self, host: &GuestAssets) -> Result<(), ManifestMismatch> {
        let assets = boot_assets(&self.dir, host);
        self.manifest.check(&HostFacts::new(&assets), None)
    }

    /// Launches a copy-on-write clone.
    pub async fn launch(&self, cfg: LaunchConfig) -> Result<Vm, VmError> {
        self.launch_with(cfg, None).await
    }

    /// Launches a copy-on-write clone, calling `before_run` before the guest starts (see
    /// [`crate::start::BeforeRun`]).
    pub async fn launch_with(
        &self,
        cfg: LaunchConfig,
        before_run: Option<BeforeRun<'_>>,
    ) -> Result<Vm, VmError> {
        let span = info_span!("vm", id = %cfg.id);
        async move {
            let started = Instant::now();
            let qemu = self.prepare(&cfg).await?;
            let result = Vm::start(StartSpec {
                qemu,
                network: cfg.network.clone(),
                before_run,
            })
            .await;
            if result.is_err() {
                let _ = remove_dir(&cfg.dir);
            }
            let vm = result?;
            info!(elapsed_ms = started.elapsed().as_millis() as u64, template = %self.dir.display(), "launched from template");
            self.make_spare();
            Ok(vm)
        }
        .instrument(span)
        .await
    }

    /// The next launch's overlay, made once this one is off the critical path.
    pub(crate) fn make_spare(&self) {
        if let Some(d) = &self.spares {
            crate::spare::make(d, &self.dir.join(DISK_FILE));
        }
    }

    /// Checks the template (manifest, RAM file, state checksum) and makes the clone's
    /// directory: its boot files and its overlay. On failure the directory is gone.
    pub(crate) async fn prepare(&self, cfg: &LaunchConfig) -> Result<QemuSpec, VmError> {
        let started = Instant::now();
        // Re-read: the manifest on disk is what the restore will honour.
        let manifest = Manifest::read(&self.dir)?;
        let assets = boot_assets(&self.dir, &cfg.assets);
        manifest.check(&HostFacts::new(&assets), cfg.machine.as_ref())?;
        let memory = self.dir.join(MEMORY_FILE);
        let expected = u64::from(manifest.machine.memory_mib) << 20;
        let actual = std::fs::metadata(&memory).map_err(io_err(&memory))?.len();
        if actual != expected || manifest.memory_bytes != Some(expected) {
            return Err(VmError::Invalid {
                id: cfg.id.clone(),
                reason: format!(
                    "RAM size mismatch: manifest says {} MiB, memory file holds {} bytes",
                    manifest.machine.memory_mib, actual
                ),
            });
        }
        let state = self.dir.join(STATE_FILE);
        verify_state(&cfg.id, &manifest, &state)?;
        create_vm_dir(&cfg.dir)?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "launch: manifest and state checked"
        );
        let paths = VmPaths::new(&cfg.dir);
        let made = async {
            let boot = cfg.dir.join(BOOT_DIR);
            keep_boot_files(&assets, &boot)?;
            let assets = GuestAssets::open(&boot)?;
            let template_disk = self.dir.join(DISK_FILE);
            let spare = self
                .spares
                .as_deref()
                .is_some_and(|d| crate::spare::take(d, &template_disk, &paths.disk()));
            if !spare {
                disk::create_overlay(&paths.disk(), &template_disk, BackingFormat::Qcow2, None)
                    .await?;
            }
            tracing::debug!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "launch: boot files and overlay made"
            );
            Ok::<_, VmError>(assets)
        }
        .await;
        let assets = match made {
            Ok(a) => a,
            Err(e) => {
                let _ = remove_dir(&cfg.dir);
                return Err(e);
            }
        };
        Ok(QemuSpec {
            id: cfg.id.clone(),
            disk: paths.disk(),
            disk_base: Some(template_disk_of(&self.dir)),
            paths,
            machine: manifest.machine.clone(),
            assets,
            memory: MemoryBacking::PrivateFile(memory),
            kernel_cmdline: manifest.kernel_cmdline.clone(),
            incoming: Some(template_incoming(&manifest, state)),
            timeout: cfg.timeout,
            die_with_parent: cfg.die_with_parent,
            confinement: cfg.confinement.clone(),
        })
    }

    /// Removes the template's files. Clones launched from it must be gone first.
    pub fn delete(self) -> Result<(), VmError> {
        remove_dir(&self.dir)
    }
}

fn template_disk_of(dir: &Path) -> PathBuf {
    dir.join(DISK_FILE)
}

/// How a template's state file loads: a migration stream that skips the shared RAM (a
/// template baked from a cold boot), or device state alone (one saved from a running guest,
/// whose RAM file was written by kiln).
pub(crate) fn template_incoming(manifest: &Manifest, state: PathBuf) -> Incoming {
    if manifest.devices_only_state {
        Incoming {
            state,
            ignore_shared: false,
            format: StateFormat::DevicesOnly,
            diff: None,
        }
    } else {
        Incoming::stream(state, true)
    }
}

/// The template RAM file a diff applies to must still be there, at the guest's RAM size.
fn check_diff_base(id: &VmId, base: &Path, diff: &DiffSummary) -> Result<(), VmError> {
    match std::fs::metadata(base) {
        Ok(m) if m.is_file() && m.len() == diff.ram_bytes => Ok(()),
        Ok(m) => Err(VmError::Invalid {
            id: id.clone(),
            reason: format!(
                "the template memory {} holds {} bytes, the suspended guest {}: was its image rebuilt in place?",
                base.display(), m.len(), diff.ram_bytes
            ),
        }),
        Err(e) => Err(VmError::Invalid {
            id: id.clone(),
            reason: format!(
                "the template memory {} this suspended guest resumes from is gone ({e}): was its image deleted?",
                base.display()
            ),
        }),
    }
}

/// A suspended VM: state file + disk overlay in its directory, no process.
#[derive(Debug)]
pub struct SuspendedVm {
    id: VmId,
    paths: VmPaths,
    assets: GuestAssets,
    manifest: Manifest,
    die_with_parent: bool,
    network: NetworkAttachment,
    confinement: Confinement,
}

impl SuspendedVm {
    /// Re-opens a suspended VM from its directory (e.g. after a daemon restart). Its NIC
    /// leads nowhere until [`SuspendedVm::set_network`] says otherwise.
    pub fn open(
        id: VmId,
        dir: &Path,
        assets: GuestAssets,
        die_with_parent: bool,
        confinement: Confinement,
    ) -> Result<SuspendedVm, VmError> {
        let manifest = Manifest::read(&dir.join(SUSPEND_DIR))?;
        Ok(SuspendedVm {
            id,
            paths: VmPaths::new(dir),
            assets: boot_assets(dir, &assets),
            manifest,
            die_with_parent,
            network: NetworkAttachment::closed(),
            confinement,
        })
    }

    /// Where the NIC leads after resume (by default: where it led before suspend).
    pub fn set_network(&mut self, network: NetworkAttachment) {
        self.network = network;
    }

    pub fn id(&self) -> &VmId {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether this host can resume the VM; the error names every difference.
    pub fn compatibility(&self) -> Result<(), ManifestMismatch> {
        self.manifest.check(&HostFacts::new(&self.assets), None)
    }

    /// Bytes the suspended state occupies on disk (the state file and memory diff; the
    /// overlay is extra).
    pub fn state_bytes(&self) -> u64 {
        self.manifest.state_bytes
            + self
                .manifest
                .memory_diff
                .as_ref()
                .map_or(0, |d| d.file_bytes)
    }

    /// Restores the VM. On success the state file is removed (the disk moves on from it).
    pub async fn resume(self, timeout: Duration) -> Result<Vm, VmError> {
        let vm = self.resume_with(timeout, None).await?;
        vm.forget_suspended_state();
        Ok(vm)
    }

    /// Restores the VM, calling `before_run` before the guest runs again (see
    /// [`crate::start::BeforeRun`]). The suspended state stays until the caller,
    /// once the resume is durable on its side, calls [`Vm::forget_suspended_state`]: up to
    /// then a crash can fall back to it.
    pub async fn resume_with(
        self,
        timeout: Duration,
        before_run: Option<BeforeRun<'_>>,
    ) -> Result<Vm, VmError> {
        let span = info_span!("vm", id = %self.id);
        async move {
            let started = Instant::now();
            let suspend_dir = self.paths.dir.join(SUSPEND_DIR);
            let manifest = Manifest::read(&suspend_dir)?;
            manifest.check(&HostFacts::new(&self.assets), Some(&self.manifest.machine))?;
            let state = suspend_dir.join(STATE_FILE);
            verify_state(&self.id, &manifest, &state)?;
            // Snapshots from before the jail did not record the chain's first file: the
            // overlay's header names it (its QEMU ran as root, unjailed).
            let disk_base = match &manifest.disk_backing {
                Some(p) => Some(PathBuf::from(p)),
                None => disk::backing_file(&self.paths.disk()).map_err(io_err(&self.paths.dir))?,
            };
            let (memory, incoming) = match &manifest.memory_diff {
                Some(diff) => {
                    let base = PathBuf::from(&diff.base);
                    check_diff_base(&self.id, &base, diff)?;
                    let incoming = Incoming {
                        state,
                        ignore_shared: false,
                        format: StateFormat::DevicesOnly,
                        diff: Some((suspend_dir.join(DIFF_FILE), diff.clone())),
                    };
                    (MemoryBacking::PrivateFile(base), incoming)
                }
                None => (MemoryBacking::Anonymous, Incoming::stream(state, false)),
            };
            let vm = Vm::start(StartSpec {
                qemu: QemuSpec {
                    id: self.id.clone(),
                    paths: self.paths.clone(),
                    disk: self.paths.disk(),
                    disk_base,
                    machine: manifest.machine.clone(),
                    assets: self.assets.clone(),
                    memory,
                    kernel_cmdline: manifest.kernel_cmdline.clone(),
                    incoming: Some(incoming),
                    timeout,
                    die_with_parent: self.die_with_parent,
                    confinement: self.confinement,
                },
                network: self.network.clone(),
                before_run,
            })
            .await?;
            info!(elapsed_ms = started.elapsed().as_millis() as u64, "resumed");
            Ok(vm)
        }
        .instrument(span)
        .await
    }

    /// Deletes the suspended VM's files.
    pub fn discard(self) -> Result<(), VmError> {
        remove_dir(&self.paths.dir)
    }
}
