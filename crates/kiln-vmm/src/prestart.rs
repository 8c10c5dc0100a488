//! QEMUs started ahead of their launch: [`Template::prestart`] makes a clone's directory
//! (boot files, overlay), starts its QEMU in its jail on the template's files in
//! `-incoming defer` and connects QMP, and stops there: the guest's RAM is the template's
//! untouched private mapping, nothing of it has run. [`Template::launch_prestarted`] later
//! pays only the rest: the network backend (side by side with the state load), the state
//! load, `cont` and the agent session. The id and directory are chosen at the prestart
//! (the jail binds the directory's files at their paths), so the caller gives the clone the
//! prestarted one's id.
//!
//! The NIC's socket pair is made at the prestart and its other end kept here: the backend
//! starts at the launch with the policy of the microVM that takes it, so one pre-started
//! QEMU serves any connectors.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_types::VmId;
use tracing::{info, info_span, Instrument};

use crate::assets::GuestAssets;
use crate::confine::Confinement;
use crate::manifest::Manifest;
use crate::network::NetworkAttachment;
use crate::process::ProcessRecord;
use crate::snapshot::{verify_state, LaunchConfig, Template, STATE_FILE};
use crate::start::{self, BeforeRun, LinkParts, QemuSpec, Spawned};
use crate::vm::{remove_dir, Vm, VmError};

/// Where and how to start a QEMU ahead of its launch.
#[derive(Debug, Clone)]
pub struct PrestartConfig {
    /// The id the microVM that takes it will have.
    pub id: VmId,
    pub dir: PathBuf,
    pub assets: GuestAssets,
    pub timeout: Duration,
    pub die_with_parent: bool,
    pub confinement: Confinement,
}

/// A QEMU waiting for its launch (see the module). Dropped without a launch, its QEMU is
/// killed and its directory removed.
pub struct Prestarted {
    id: VmId,
    template: PathBuf,
    /// The template's state file as it was when this QEMU was started on it.
    state_stamp: Option<FileStamp>,
    confinement: Confinement,
    started: Instant,
    parts: Option<Parts>,
}

struct Parts {
    qemu: QemuSpec,
    spawned: Spawned,
    backend_fd: Option<OwnedFd>,
}

/// A file's identity and version, cheap to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

impl Template {
    /// Starts a clone's QEMU ahead of its launch (see the module).
    pub async fn prestart(&self, cfg: PrestartConfig) -> Result<Prestarted, VmError> {
        let span = info_span!("vm", id = %cfg.id);
        async move {
            let started = Instant::now();
            let launch = LaunchConfig {
                id: cfg.id.clone(),
                dir: cfg.dir.clone(),
                machine: None,
                assets: cfg.assets,
                timeout: cfg.timeout,
                die_with_parent: cfg.die_with_parent,
                network: NetworkAttachment::closed(),
                confinement: cfg.confinement.clone(),
            };
            let qemu = self.prepare(&launch).await?;
            // kiln's backend: a socket pair, whatever the policy the launch brings.
            let link = LinkParts::of(&NetworkAttachment::closed(), &qemu.machine)?;
            let spawned = match start::spawn(&qemu, link.netdev.as_ref(), link.qemu_fds).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = remove_dir(&cfg.dir);
                    return Err(e);
                }
            };
            self.make_spare();
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                template = %self.dir().display(),
                "QEMU started ahead of its launch"
            );
            Ok(Prestarted {
                id: cfg.id,
                template: self.dir().to_path_buf(),
                state_stamp: FileStamp::of(&self.dir().join(STATE_FILE)),
                confinement: cfg.confinement,
                started: Instant::now(),
                parts: Some(Parts {
                    qemu,
                    spawned,
                    backend_fd: link.backend_fd,
                }),
            })
        }
        .instrument(span)
        .await
    }

    /// Launches the clone `pre` was started for: its network backend on `network` (kiln's
    /// backend, any policy), its state loaded, the guest started, the agent connected.
    /// `before_run` as for [`Template::launch_with`]. On failure its QEMU is killed and its
    /// directory removed.
    pub async fn launch_prestarted(
        &self,
        mut pre: Prestarted,
        network: NetworkAttachment,
        before_run: Option<BeforeRun<'_>>,
    ) -> Result<Vm, VmError> {
        let Some(Parts {
            qemu,
            spawned,
            backend_fd,
        }) = pre.parts.take()
        else {
            return Err(VmError::Invalid {
                id: pre.id.clone(),
                reason: "its pre-started QEMU is gone".into(),
            });
        };
        let span = info_span!("vm", id = %qemu.id);
        async move {
            let started = Instant::now();
            let dir = qemu.paths.dir.clone();
            let checked = self.check_prestarted(&pre, &qemu, &network);
            if let Err(e) = checked {
                spawned.process.kill().await;
                let _ = remove_dir(&dir);
                return Err(e);
            }
            let (confinement, die_with_parent) = (qemu.confinement.clone(), qemu.die_with_parent);
            let backend = network.start_backend(backend_fd, &confinement, die_with_parent);
            let result = start::run(qemu, spawned, backend, before_run, network.clone()).await;
            if result.is_err() {
                let _ = remove_dir(&dir);
            }
            let vm = result?;
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                waited_ms = pre.started.elapsed().as_millis() as u64,
                template = %self.dir().display(),
                "launched from a pre-started QEMU"
            );
            Ok(vm)
        }
        .instrument(span)
        .await
    }

    /// The template is the one `pre` was started on, unchanged, and `network` is kiln's
    /// backend (the only thing its socket pair can lead to).
    fn check_prestarted(
        &self,
        pre: &Prestarted,
        qemu: &QemuSpec,
        network: &NetworkAttachment,
    ) -> Result<(), VmError> {
        let invalid = |reason: String| VmError::Invalid {
            id: qemu.id.clone(),
            reason,
        };
        if pre.template != self.dir() {
            return Err(invalid(format!(
                "a QEMU pre-started on {} cannot launch {}",
                pre.template.display(),
                self.dir().display()
            )));
        }
        // What QEMU loads is what was checked: the state file, against the manifest now.
        let manifest = Manifest::read(self.dir())?;
        let state = self.dir().join(STATE_FILE);
        if FileStamp::of(&state) != pre.state_stamp {
            return Err(invalid(
                "the template changed since its QEMU was started".into(),
            ));
        }
        verify_state(&qemu.id, &manifest, &state)?;
        if qemu.machine.network && !matches!(network, NetworkAttachment::Egress { .. }) {
            return Err(invalid(
                "a pre-started QEMU's NIC leads to kiln's backend only".into(),
            ));
        }
        Ok(())
    }
}

impl Prestarted {
    /// The id the microVM that takes it must have.
    pub fn id(&self) -> &VmId {
        &self.id
    }

    /// The template it was started on.
    pub fn template(&self) -> &Path {
        &self.template
    }

    /// The jail it runs in (a launch must ask for the same).
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// What a later kilnd needs to end it, if this one crashed before it was taken.
    pub fn record(&self) -> Option<&ProcessRecord> {
        self.parts.as_ref().map(|p| p.spawned.process.record())
    }

    /// Its QEMU still runs and its template's state file is the one it was started on.
    pub fn is_current(&self) -> bool {
        self.parts
            .as_ref()
            .is_some_and(|p| p.spawned.process.exited().is_none())
            && FileStamp::of(&self.template.join(STATE_FILE)) == self.state_stamp
    }

    /// Kills its QEMU and removes its directory.
    pub async fn discard(mut self) {
        if let Some(p) = self.parts.take() {
            p.spawned.process.kill().await;
            let _ = remove_dir(&p.qemu.paths.dir);
        }
    }
}

impl Drop for Prestarted {
    fn drop(&mut self) {
        if let Some(p) = self.parts.take() {
            p.spawned.process.start_kill();
            let _ = remove_dir(&p.qemu.paths.dir);
        }
    }
}

impl std::fmt::Debug for Prestarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prestarted")
            .field("id", &self.id())
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}
