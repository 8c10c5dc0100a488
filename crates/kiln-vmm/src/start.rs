//! Starting a VM's QEMU, in two halves: [`spawn`] starts QEMU (in its jail) on the VM's
//! files and connects QMP; [`run`] starts the network backend, loads the guest's state,
//! starts the guest and opens the agent session. [`Vm::start`] does both at once; a QEMU
//! started ahead of its launch ([`crate::prestart`]) waits between them in `-incoming
//! defer`, so a launch from it pays only the second half.

use std::ffi::OsString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::Span;

use crate::adopt::VmRecord;
use crate::assets::GuestAssets;
use crate::confine::{jail_spec, Confinement, VmFiles};
use crate::machine::{qemu_args, MachineSpec, MemoryBacking, VmPaths};
use crate::netproc::NetBackendProcess;
use crate::network::NetworkAttachment;
use crate::process::{ExitInfo, QemuProcess};
use crate::qmp::Qmp;
use crate::vm::{apply_diff, connect_agent, connect_qmp, write_new, Incoming, Vm, VmError};
use kiln_types::VmId;

/// Called once QEMU and its backend run (with `incoming`: its state loaded, the guest not
/// yet started), with what a later kilnd needs to take the VM back: kilnd makes it durable
/// there, so the guest never runs unrecorded.
pub type BeforeRun<'a> = Box<dyn FnOnce(&VmRecord) + Send + 'a>;

/// What QEMU's command line and jail are made from.
pub(crate) struct QemuSpec {
    pub id: VmId,
    pub paths: VmPaths,
    pub machine: MachineSpec,
    pub assets: GuestAssets,
    pub memory: MemoryBacking,
    pub disk: std::path::PathBuf,
    /// The first file under `disk` in its chain, as kiln knows it (see [`crate::confine`]).
    pub disk_base: Option<std::path::PathBuf>,
    pub kernel_cmdline: String,
    pub incoming: Option<Incoming>,
    pub timeout: Duration,
    pub die_with_parent: bool,
    pub confinement: Confinement,
}

/// Everything [`Vm::start`] needs.
pub(crate) struct StartSpec<'a> {
    pub qemu: QemuSpec,
    pub network: NetworkAttachment,
    /// See [`BeforeRun`].
    pub before_run: Option<BeforeRun<'a>>,
}

/// A QEMU that runs, its QMP connected, its guest not started.
pub(crate) struct Spawned {
    pub process: QemuProcess,
    pub qmp: Qmp,
}

/// The guest's NIC link: QEMU's `-netdev`, its descriptor and the backend's end.
pub(crate) struct LinkParts {
    pub netdev: Option<OsString>,
    pub qemu_fds: Vec<OwnedFd>,
    pub backend_fd: Option<OwnedFd>,
}

impl LinkParts {
    pub fn of(network: &NetworkAttachment, machine: &MachineSpec) -> Result<LinkParts, VmError> {
        if !machine.network {
            return Ok(LinkParts {
                netdev: None,
                qemu_fds: Vec::new(),
                backend_fd: None,
            });
        }
        let link = network.link()?;
        Ok(LinkParts {
            netdev: Some(link.netdev),
            qemu_fds: link.qemu_fd.into_iter().collect(),
            backend_fd: link.backend_fd,
        })
    }
}

fn crashed(id: &VmId, process: &QemuProcess, exit: ExitInfo) -> VmError {
    VmError::Crashed {
        id: id.clone(),
        exit,
        console: process.diagnostics(crate::vm::CONSOLE_TAIL),
    }
}

/// Starts QEMU on `q`'s files (jailed unless `q.confinement` says otherwise) and connects
/// its QMP. On failure QEMU is killed; the caller owns the directory.
pub(crate) async fn spawn(
    q: &QemuSpec,
    netdev: Option<&OsString>,
    qemu_fds: Vec<OwnedFd>,
) -> Result<Spawned, VmError> {
    let entered = Instant::now();
    let args = qemu_args(
        &q.machine,
        &q.assets,
        &q.paths,
        &q.memory,
        &q.disk,
        &q.kernel_cmdline,
        q.incoming.as_ref().map(|i| i.format),
        netdev.map(|n| n.as_os_str()),
    );
    let jail = match &q.confinement {
        Confinement::Jailed(limits) => {
            let files = VmFiles {
                paths: &q.paths,
                machine: &q.machine,
                assets: &q.assets,
                memory: &q.memory,
                disk: &q.disk,
                disk_base: q.disk_base.as_deref(),
                incoming: q.incoming.as_ref().map(|i| i.state.as_path()),
            };
            let spec =
                jail_spec(&files, limits, q.die_with_parent).map_err(|e| VmError::Invalid {
                    id: q.id.clone(),
                    reason: crate::error_chain(&e),
                })?;
            Some(spec)
        }
        Confinement::Unjailed => None,
    };
    let process = QemuProcess::spawn(
        &args,
        &q.paths.console_socket(),
        &q.paths.console_log(),
        q.die_with_parent,
        jail,
        qemu_fds,
    )
    .await?;
    // The pid as the host sees it (a jailed QEMU is PID 1 of its own namespace), for
    // start-up recovery.
    let _ = write_new(
        &q.paths.pid_file(),
        format!("{}\n", process.pid()).as_bytes(),
    );
    tracing::debug!(
        spawn_ms = entered.elapsed().as_secs_f64() * 1e3,
        "start: QEMU spawned"
    );
    let connected = tokio::select! {
        r = connect_qmp(&q.id, &q.paths, q.timeout) => r,
        exit = process.wait() => Err(crashed(&q.id, &process, exit)),
    };
    match connected {
        Ok(qmp) => {
            tracing::debug!(
                after_spawn_ms = entered.elapsed().as_secs_f64() * 1e3,
                "start: QMP connected"
            );
            Ok(Spawned { process, qmp })
        }
        Err(e) => {
            process.kill().await;
            Err(e)
        }
    }
}

/// The second half: the network backend (`backend`, started side by side with the state
/// load), the memory diff and state, `before_run`, `cont`, the agent session. On failure
/// QEMU and the backend are ended; the caller owns the directory.
pub(crate) async fn run(
    q: QemuSpec,
    spawned: Spawned,
    backend: impl Future<Output = Result<Option<NetBackendProcess>, VmError>>,
    before_run: Option<BeforeRun<'_>>,
    network: NetworkAttachment,
) -> Result<Vm, VmError> {
    let Spawned { process, qmp } = spawned;
    let entered = Instant::now();
    let load = async {
        let Some(incoming) = &q.incoming else {
            return Ok(());
        };
        if let Some((diff, summary)) = &incoming.diff {
            apply_diff(&q.id, process.pid(), &q.memory, &q.machine, diff, summary).await?;
        }
        crate::migration::load_state(&q.id, &qmp, incoming, q.timeout).await?;
        tracing::debug!(
            after_ms = entered.elapsed().as_secs_f64() * 1e3,
            "start: state loaded"
        );
        Ok::<_, VmError>(())
    };
    let (net_backend, loaded) = tokio::join!(backend, load);
    let net_backend = match (net_backend, loaded) {
        (Ok(backend), Ok(())) => backend,
        (Ok(backend), Err(e)) => {
            process.kill().await;
            if let Some(b) = backend {
                b.finish().await;
            }
            return Err(e);
        }
        (Err(e), _) => {
            process.kill().await;
            return Err(e);
        }
    };
    if let Some(backend) = &net_backend {
        let _ = write_new(
            &q.paths.net_pid_file(),
            format!("{}\n", backend.pid()).as_bytes(),
        );
    }
    let setup = async {
        if let Some(before_run) = before_run {
            before_run(&VmRecord {
                machine: q.machine.clone(),
                assets: q.assets.clone(),
                memory: q.memory.clone(),
                active_disk: q.disk.clone(),
                disk_base: q.disk_base.clone(),
                kernel_cmdline: q.kernel_cmdline.clone(),
                qemu: process.record().clone(),
                net: net_backend.as_ref().map(|b| b.record().clone()),
            });
        }
        if q.incoming.is_some() {
            qmp.execute("cont", json!({}))
                .await
                .map_err(|source| VmError::Qmp {
                    id: q.id.clone(),
                    source,
                })?;
        }
        tracing::debug!(
            after_ms = entered.elapsed().as_secs_f64() * 1e3,
            "start: guest running"
        );
        let agent = connect_agent(&q.id, &q.paths, &process, q.timeout).await?;
        tracing::debug!(
            after_ms = entered.elapsed().as_secs_f64() * 1e3,
            "start: agent ready"
        );
        Ok::<_, VmError>(agent)
    };
    let outcome = tokio::select! {
        r = setup => r,
        exit = process.wait() => Err(crashed(&q.id, &process, exit)),
    };
    match outcome {
        Ok(agent) => Ok(Vm {
            id: q.id,
            paths: q.paths,
            machine: q.machine,
            assets: q.assets,
            memory: q.memory,
            active_disk: q.disk,
            kernel_cmdline: q.kernel_cmdline,
            process,
            qmp,
            agent,
            span: Span::current(),
            die_with_parent: q.die_with_parent,
            network,
            confinement: q.confinement,
            disk_base: q.disk_base,
            net_backend,
            owns_dir: true,
        }),
        Err(e) => {
            // A setup error may really be a crash seen from the other side first.
            let e = match tokio::time::timeout(Duration::from_millis(200), process.wait()).await {
                Ok(exit) if !matches!(e, VmError::Crashed { .. }) => crashed(&q.id, &process, exit),
                _ => e,
            };
            process.kill().await;
            if let Some(backend) = &net_backend {
                backend.finish().await;
            }
            Err(e)
        }
    }
}

impl Vm {
    /// Starts QEMU, loads `incoming` state if any, and connects the agent. On failure QEMU
    /// is killed; the caller owns the directory.
    pub(crate) async fn start(spec: StartSpec<'_>) -> Result<Vm, VmError> {
        let StartSpec {
            qemu,
            network,
            before_run,
        } = spec;
        let link = LinkParts::of(&network, &qemu.machine)?;
        // QEMU and its network backend start side by side (each jail takes tens of ms).
        let (backend, spawned) = tokio::join!(
            network.start_backend(link.backend_fd, &qemu.confinement, qemu.die_with_parent),
            spawn(&qemu, link.netdev.as_ref(), link.qemu_fds)
        );
        let (backend, spawned) = match (backend, spawned) {
            (Ok(backend), Ok(spawned)) => (backend, spawned),
            (Ok(backend), Err(e)) => {
                if let Some(b) = backend {
                    b.finish().await;
                }
                return Err(e);
            }
            (Err(e), Ok(spawned)) => {
                spawned.process.kill().await;
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
        };
        run(
            qemu,
            spawned,
            std::future::ready(Ok(backend)),
            before_run,
            network,
        )
        .await
    }
}
