//! A running microVM: its QEMU process, QMP, agent session and directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_proto::{ExecRequest, ProcessSpec};
use kiln_types::VmId;
use serde_json::json;
use tracing::{info, info_span, warn, Instrument, Span};

use crate::agent::{AgentClient, AgentError, ExecOutput};
use crate::assets::{AssetsError, GuestAssets};
use crate::confine::Confinement;
use crate::disk::{self, BackingFormat, DiskError};
use crate::machine::{MachineSpec, MemoryBacking, StateFormat, VmPaths};
use crate::manifest::{ManifestError, ManifestMismatch};
use crate::memdiff::{DiffSummary, GuestRam};
use crate::network::NetworkAttachment;
use crate::process::{ExitInfo, ProcessError, QemuProcess};
use crate::qmp::{Qmp, QmpError};
use crate::start::{QemuSpec, StartSpec};

/// Bytes of console shown in crash reports.
pub const CONSOLE_TAIL: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("VM directory {path} failed")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM directory {0} already exists: pick another id or remove it")]
    DirExists(PathBuf),
    #[error(transparent)]
    Assets(#[from] AssetsError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("QEMU control failed for VM {id}")]
    Qmp {
        id: VmId,
        #[source]
        source: QmpError,
    },
    #[error("Agent of VM {id} failed")]
    Agent {
        id: VmId,
        #[source]
        source: AgentError,
    },
    #[error("Agent of VM {id} did not answer\n--- console tail ---\n{console}")]
    AgentUnreachable {
        id: VmId,
        #[source]
        source: AgentError,
        console: String,
    },
    #[error("VM {id} crashed: {exit}\n--- console tail ---\n{console}")]
    Crashed {
        id: VmId,
        exit: ExitInfo,
        console: String,
    },
    #[error("VM {id}: {what} did not finish within {timeout:?}")]
    Timeout {
        id: VmId,
        what: &'static str,
        timeout: Duration,
    },
    #[error("VM {id}: migration failed: {reason}")]
    Migration { id: VmId, reason: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Mismatch(#[from] ManifestMismatch),
    #[error("VM {id}: {reason}")]
    Invalid { id: VmId, reason: String },
    #[error("VM {id}: its {what} ended while kilnd was down")]
    Gone {
        id: VmId,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds a {kind:?} snapshot, not a template", dir.display())]
    NotTemplate {
        dir: PathBuf,
        kind: crate::manifest::SnapshotKind,
    },
}

/// What a cold boot needs.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub id: VmId,
    /// The VM's own directory; must not exist yet.
    pub dir: PathBuf,
    pub machine: MachineSpec,
    pub assets: GuestAssets,
    /// Read-only root disk the VM's overlay sits on: a raw ext4 base or a qcow2 layer.
    pub base_disk: PathBuf,
    pub base_format: BackingFormat,
    /// Where to create the VM's writable overlay; inside its directory when `None`.
    /// Image builds put it in their layer store so it outlives the VM.
    pub top_disk: Option<PathBuf>,
    /// Grow the disk to this size (never shrinks below the base).
    pub disk_size_mib: Option<u32>,
    pub timeout: Duration,
    /// Kill QEMU when the spawning thread dies (tests, CLI). The daemon turns this off so
    /// guests survive its restart.
    pub die_with_parent: bool,
    /// Where the NIC (if `machine.network`) leads.
    pub network: NetworkAttachment,
    /// QEMU's jail (or `--no-jail`).
    pub confinement: Confinement,
}

/// What remains of a VM whose state was saved and whose QEMU has ended.
pub(crate) struct SavedVm {
    pub id: VmId,
    pub paths: VmPaths,
    pub machine: MachineSpec,
    pub assets: GuestAssets,
    pub kernel_cmdline: String,
    pub active_disk: PathBuf,
    pub disk_base: Option<PathBuf>,
    pub die_with_parent: bool,
    pub network: NetworkAttachment,
    pub confinement: Confinement,
}

/// A stream of guest state to load at start.
pub(crate) struct Incoming {
    pub state: PathBuf,
    pub ignore_shared: bool,
    pub format: StateFormat,
    /// Written into the guest's RAM (a private view of the template) before the state loads.
    pub diff: Option<(PathBuf, DiffSummary)>,
}

impl Incoming {
    /// A migration stream (a template's, or a full suspend's).
    pub fn stream(state: PathBuf, ignore_shared: bool) -> Incoming {
        Incoming {
            state,
            ignore_shared,
            format: StateFormat::Migration,
            diff: None,
        }
    }
}

pub struct Vm {
    pub(crate) id: VmId,
    pub(crate) paths: VmPaths,
    pub(crate) machine: MachineSpec,
    pub(crate) assets: GuestAssets,
    pub(crate) memory: MemoryBacking,
    /// The writable top of the VM's disk chain.
    pub(crate) active_disk: PathBuf,
    /// The command line the guest booted with (restores reuse it).
    pub(crate) kernel_cmdline: String,
    pub(crate) process: QemuProcess,
    pub(crate) qmp: Qmp,
    pub(crate) agent: AgentClient,
    pub(crate) span: Span,
    pub(crate) die_with_parent: bool,
    pub(crate) network: NetworkAttachment,
    pub(crate) confinement: Confinement,
    /// The first file under the VM's own overlay (its jail may read that chain).
    pub(crate) disk_base: Option<PathBuf>,
    /// The running network backend; it ends with the VM.
    pub(crate) net_backend: Option<crate::netproc::NetBackendProcess>,
    /// Remove the directory when dropped (off once it was handed to a snapshot).
    pub(crate) owns_dir: bool,
}

impl Vm {
    /// Cold boot from a base disk: the slow path, used to build templates.
    pub async fn boot(cfg: BootConfig) -> Result<Vm, VmError> {
        Self::boot_with_cmdline(cfg, "").await
    }

    /// [`Vm::boot`] with `extra` appended to the kernel command line (tests: e.g.
    /// `kiln.agent_generation=1`, an agent that acts as an older one).
    pub async fn boot_with_cmdline(cfg: BootConfig, extra: &str) -> Result<Vm, VmError> {
        let span = info_span!("vm", id = %cfg.id);
        async {
            let started = Instant::now();
            create_vm_dir(&cfg.dir)?;
            let paths = VmPaths::new(&cfg.dir);
            let result = async {
                let top = cfg.top_disk.clone().unwrap_or_else(|| paths.disk());
                disk::create_overlay(&top, &cfg.base_disk, cfg.base_format, cfg.disk_size_mib)
                    .await?;
                Vm::start(StartSpec {
                    qemu: QemuSpec {
                        id: cfg.id.clone(),
                        memory: MemoryBacking::SharedFile(paths.memory()),
                        paths: paths.clone(),
                        kernel_cmdline: format!(
                            "{} {extra}",
                            crate::machine::kernel_cmdline(cfg.machine.accel)
                        )
                        .trim_end()
                        .to_string(),
                        machine: cfg.machine,
                        assets: cfg.assets,
                        disk: top,
                        disk_base: Some(cfg.base_disk.clone()),
                        incoming: None,
                        timeout: cfg.timeout,
                        die_with_parent: cfg.die_with_parent,
                        confinement: cfg.confinement,
                    },
                    network: cfg.network,
                    before_run: None,
                })
                .await
            }
            .await;
            if result.is_err() {
                let _ = std::fs::remove_dir_all(&cfg.dir);
            }
            let vm = result?;
            info!(elapsed_ms = started.elapsed().as_millis() as u64, "booted");
            Ok(vm)
        }
        .instrument(span.clone())
        .await
    }

    pub fn id(&self) -> &VmId {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    pub fn machine(&self) -> &MachineSpec {
        &self.machine
    }

    pub fn qemu_pid(&self) -> u32 {
        self.process.pid()
    }

    /// Makes a file or directory kiln created while the VM runs its QEMU's (a jailed QEMU
    /// writes only what its uid owns).
    pub(crate) fn give_to_jail(&self, path: &Path) -> std::io::Result<()> {
        match self.process.jail() {
            Some(j) => std::os::unix::fs::lchown(path, Some(j.uid), Some(j.gid)),
            None => Ok(()),
        }
    }

    /// The jail QEMU runs in (uid, cgroups), unless started with `--no-jail`.
    pub fn jail(&self) -> Option<&kiln_jail::JailReport> {
        self.process.jail()
    }

    /// The jail of this VM's network backend, if it has one and is jailed.
    pub fn net_jail(&self) -> Option<&kiln_jail::JailReport> {
        self.net_backend.as_ref().and_then(|b| b.jail())
    }

    /// The host pid of this VM's network backend, if it has one.
    pub fn net_pid(&self) -> Option<u32> {
        self.net_backend.as_ref().map(|b| b.pid())
    }

    /// The agent client. Errors from it can be turned into crash reports with
    /// [`Vm::explain`].
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Turns an agent failure into a crash report when QEMU has died meanwhile.
    pub async fn explain(&self, source: AgentError) -> VmError {
        if let Ok(exit) =
            tokio::time::timeout(Duration::from_millis(300), self.process.wait()).await
        {
            return VmError::Crashed {
                id: self.id.clone(),
                exit,
                console: self.process.diagnostics(CONSOLE_TAIL),
            };
        }
        VmError::Agent {
            id: self.id.clone(),
            source,
        }
    }

    /// If QEMU has ended, the crash report.
    pub fn crash(&self) -> Option<VmError> {
        self.process.exited().map(|exit| VmError::Crashed {
            id: self.id.clone(),
            exit,
            console: self.process.diagnostics(CONSOLE_TAIL),
        })
    }

    /// Waits until QEMU ends and returns the crash report.
    pub async fn wait_crash(&self) -> VmError {
        let exit = self.process.wait().await;
        VmError::Crashed {
            id: self.id.clone(),
            exit,
            console: self.process.diagnostics(CONSOLE_TAIL),
        }
    }

    /// Runs a process in the guest and collects its output (up to 64 MiB).
    pub async fn exec(
        &self,
        req: ExecRequest,
        stdin: Option<&[u8]>,
    ) -> Result<ExecOutput, VmError> {
        match self
            .agent
            .exec(req, stdin, 64 << 20)
            .instrument(self.span.clone())
            .await
        {
            Ok(out) => Ok(out),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// Runs `sh -c script` in the guest.
    pub async fn sh(&self, script: &str) -> Result<ExecOutput, VmError> {
        self.exec(ExecRequest::shell(script), None).await
    }

    pub(crate) async fn qmp(
        &self,
        command: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, VmError> {
        self.qmp
            .execute(command, args)
            .await
            .map_err(|source| VmError::Qmp {
                id: self.id.clone(),
                source,
            })
    }

    /// Stops the guest and writes its device state (no RAM) to `path`, for a diff suspend
    /// or a fork. The guest stays stopped.
    pub(crate) async fn save_devices(&self, path: &Path) -> Result<(), VmError> {
        self.qmp("stop", json!({})).await?;
        let file = path
            .to_str()
            .filter(|s| !s.contains('\n'))
            .ok_or_else(|| VmError::Invalid {
                id: self.id.clone(),
                reason: format!("state path {} is not UTF-8", path.display()),
            })?;
        self.qmp(
            "xen-save-devices-state",
            json!({"filename": file, "live": false}),
        )
        .await?;
        Ok(())
    }

    /// The guest's RAM as QEMU maps it, when it is a private view of a template's file.
    pub(crate) fn guest_ram(&self) -> Option<Result<GuestRam, VmError>> {
        let MemoryBacking::PrivateFile(base) = &self.memory else {
            return None;
        };
        let len = u64::from(self.machine.memory_mib) << 20;
        Some(
            GuestRam::find(self.process.pid(), base, len).map_err(|e| VmError::Invalid {
                id: self.id.clone(),
                reason: crate::error_chain(&e),
            }),
        )
    }

    /// What this VM's RAM holds in the host's memory, when it is a private view of a
    /// template (`None` for a cold-booted or fully loaded VM).
    pub fn ram_usage(&self) -> Option<Result<crate::memdiff::RamUsage, VmError>> {
        let ram = match self.guest_ram()? {
            Ok(ram) => ram,
            Err(e) => return Some(Err(e)),
        };
        Some(ram.usage().map_err(|e| VmError::Invalid {
            id: self.id.clone(),
            reason: crate::error_chain(&e),
        }))
    }

    /// Writes the pages the (stopped) guest changed from its template to `out`, off the
    /// async workers.
    pub(crate) async fn save_diff(
        &self,
        ram: GuestRam,
        out: &Path,
    ) -> Result<DiffSummary, VmError> {
        let out = out.to_path_buf();
        let started = Instant::now();
        let summary = tokio::task::spawn_blocking(move || ram.save(&out))
            .await
            .map_err(|e| VmError::Invalid {
                id: self.id.clone(),
                reason: format!("saving the memory diff panicked: {e}"),
            })?
            .map_err(|e| VmError::Invalid {
                id: self.id.clone(),
                reason: crate::error_chain(&e),
            })?;
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            private_pages = summary.private_pages,
            data_pages = summary.data_pages,
            zero_pages = summary.zero_pages,
            "memory diff saved"
        );
        Ok(summary)
    }

    /// Ends QEMU after a successful save, and gives the directory to the caller.
    pub(crate) async fn finish_after_save(mut self) -> SavedVm {
        let _ = self.qmp.execute("quit", json!({})).await;
        if tokio::time::timeout(Duration::from_secs(10), self.process.wait())
            .await
            .is_err()
        {
            self.process.kill().await;
        }
        // Its last counters are in before the VM is reported saved.
        if let Some(backend) = self.net_backend.take() {
            backend.finish().await;
        }
        self.owns_dir = false;
        self.saved_view()
    }

    /// What a snapshot of this VM records of it.
    pub(crate) fn saved_view(&self) -> SavedVm {
        SavedVm {
            id: self.id.clone(),
            paths: self.paths.clone(),
            machine: self.machine.clone(),
            assets: self.assets.clone(),
            kernel_cmdline: self.kernel_cmdline.clone(),
            active_disk: self.active_disk.clone(),
            disk_base: self.disk_base.clone(),
            die_with_parent: self.die_with_parent,
            network: self.network.clone(),
            confinement: self.confinement.clone(),
        }
    }

    /// The writable top of this VM's disk chain.
    pub fn active_disk(&self) -> &Path {
        &self.active_disk
    }

    /// Freezes the disk written so far as a layer: the guest flushes its caches, then QEMU
    /// puts a new empty overlay at `new_top` on top of the current one, which from then on
    /// is read-only. Returns the finished layer's path. Image builds call this after each
    /// step.
    pub async fn commit_layer(&mut self, new_top: &Path) -> Result<PathBuf, VmError> {
        let sync = ProcessSpec {
            argv: vec!["sync".into()],
            ..Default::default()
        };
        let out = self
            .exec(
                ExecRequest {
                    process: sync,
                    stdin: false,
                    timeout_ms: Some(120_000),
                },
                None,
            )
            .await?;
        if !out.status.success() {
            return Err(VmError::Invalid {
                id: self.id.clone(),
                reason: format!("sync failed in the guest: {}", out.stderr_text()),
            });
        }
        let file = new_top.to_str().ok_or_else(|| VmError::Invalid {
            id: self.id.clone(),
            reason: format!("layer path {} is not UTF-8", new_top.display()),
        })?;
        self.qmp(
            "blockdev-snapshot-sync",
            json!({"device": "root", "snapshot-file": file, "format": "qcow2"}),
        )
        .await?;
        Ok(std::mem::replace(
            &mut self.active_disk,
            new_top.to_path_buf(),
        ))
    }

    /// Takes the NIC away (the `none` connector): QEMU puts the link down, which the guest
    /// cannot undo, and the guest's virtio-net driver lets go of the device so no interface
    /// is left. Idempotent; call again after a resume.
    pub async fn detach_nic(&self) -> Result<(), VmError> {
        if !self.machine.network {
            return Ok(());
        }
        self.qmp
            .execute("set_link", json!({"name": "net0", "up": false}))
            .await
            .map_err(|source| VmError::Qmp {
                id: self.id.clone(),
                source,
            })?;
        let limit = Duration::from_secs(10);
        let timed_out = |_| VmError::Timeout {
            id: self.id.clone(),
            what: "detaching the NIC",
            timeout: limit,
        };
        if self.agent.generation() >= 3 {
            return tokio::time::timeout(limit, self.agent.detach_nic())
                .await
                .map_err(timed_out)?
                .map_err(|source| VmError::Agent {
                    id: self.id.clone(),
                    source,
                });
        }
        // An agent older than generation 3 (a snapshot from before it) needs the guest's
        // shell.
        let unbind = "d=/sys/bus/virtio/drivers/virtio_net; for dev in $d/virtio*; do \
                      [ -e \"$dev\" ] && echo \"${dev##*/}\" > $d/unbind; done; \
                      ! ls /sys/class/net | grep -qv '^lo$'";
        let out = tokio::time::timeout(limit, self.agent.sh(unbind))
            .await
            .map_err(timed_out)?
            .map_err(|source| VmError::Agent {
                id: self.id.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(VmError::Invalid {
                id: self.id.clone(),
                reason: format!(
                    "the guest kept a network interface: {}",
                    out.stderr_text().trim()
                ),
            });
        }
        Ok(())
    }

    /// Kills QEMU and removes every file of this VM.
    pub async fn destroy(mut self) -> Result<(), VmError> {
        let exit = self.process.kill().await;
        if let Some(backend) = self.net_backend.take() {
            backend.finish().await;
        }
        info!(parent: &self.span, %exit, "destroyed");
        self.owns_dir = false;
        remove_dir(&self.paths.dir)
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("dir", &self.paths.dir)
            .field("qemu_pid", &self.process.pid())
            .finish_non_exhaustive()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.owns_dir {
            warn!(parent: &self.span, "VM dropped without destroy(): killing QEMU and removing its files");
            // The kill is asynchronous; QEMU can keep an unlinked file open briefly.
            let process = &self.process;
            if process.exited().is_none() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(process.pid() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = std::fs::remove_dir_all(&self.paths.dir);
        }
    }
}

/// A new agent session on the VM's channel; a failure carries the console tail.
/// Connects to a VM's QMP socket (QEMU may still be creating it).
pub(crate) async fn connect_qmp(
    id: &VmId,
    paths: &VmPaths,
    timeout: Duration,
) -> Result<Qmp, VmError> {
    Qmp::connect(&paths.qmp_socket(), timeout)
        .await
        .map_err(|source| VmError::Qmp {
            id: id.clone(),
            source,
        })
}

pub(crate) async fn connect_agent(
    id: &VmId,
    paths: &VmPaths,
    process: &QemuProcess,
    timeout: Duration,
) -> Result<AgentClient, VmError> {
    AgentClient::connect(&paths.agent_socket(), timeout)
        .await
        .map_err(|source| VmError::AgentUnreachable {
            id: id.clone(),
            source,
            console: process.diagnostics(CONSOLE_TAIL),
        })
}

/// Writes a memory diff into a starting QEMU's RAM (off the async workers).
pub(crate) async fn apply_diff(
    id: &VmId,
    pid: u32,
    memory: &MemoryBacking,
    machine: &MachineSpec,
    diff: &Path,
    summary: &DiffSummary,
) -> Result<(), VmError> {
    let MemoryBacking::PrivateFile(base) = memory.clone() else {
        return Err(VmError::Invalid {
            id: id.clone(),
            reason: "a memory diff applies only to a private view of a template".into(),
        });
    };
    let len = u64::from(machine.memory_mib) << 20;
    let (diff, summary) = (diff.to_path_buf(), summary.clone());
    let started = Instant::now();
    tokio::task::spawn_blocking(move || GuestRam::find(pid, &base, len)?.apply(&diff, &summary))
        .await
        .map_err(|e| VmError::Invalid {
            id: id.clone(),
            reason: format!("applying the memory diff panicked: {e}"),
        })?
        .map_err(|e| VmError::Invalid {
            id: id.clone(),
            reason: crate::error_chain(&e),
        })?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "memory diff applied"
    );
    Ok(())
}

/// Writes `bytes` to a new file at `path`, removing what was there first: a VM's directory
/// is its jailed QEMU's, and a link it planted must never be written through.
pub(crate) fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?
        .write_all(bytes)
}

/// Refuses anything but a regular file at `path` (a link a jailed QEMU left in its place).
pub(crate) fn regular_file(id: &VmId, path: &Path) -> Result<(), VmError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        _ => Err(VmError::Invalid {
            id: id.clone(),
            reason: format!("{} is not a regular file", path.display()),
        }),
    }
}

pub(crate) fn create_vm_dir(dir: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() {
        return Err(VmError::DirExists(dir.to_path_buf()));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| VmError::Dir {
            path: dir.to_path_buf(),
            source,
        })
}

pub(crate) fn remove_dir(dir: &Path) -> Result<(), VmError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmError::Dir {
            path: dir.to_path_buf(),
            source,
        }),
    }
}
