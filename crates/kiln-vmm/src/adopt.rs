//! Taking a running VM back after kilnd restarted: what is kept of it ([`VmRecord`], in
//! kilnd's store), and [`Vm::adopt`], which watches its QEMU and network backend again,
//! reads its console again, reconnects QMP and opens a new agent session. An interrupted
//! transition (a suspend saving, a resume loaded but not started) is run on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_types::VmId;
use serde_json::json;
use tracing::{info, info_span, Instrument, Span};

use crate::assets::GuestAssets;
use crate::confine::Confinement;
use crate::machine::{MachineSpec, MemoryBacking, VmPaths};
use crate::network::NetworkAttachment;
use crate::process::{ProcessRecord, QemuProcess};
use crate::qmp::Qmp;
use crate::vm::{connect_agent, Vm, VmError, CONSOLE_TAIL};

/// What a later kilnd needs to take a running VM back: kilnd keeps it in its own store,
/// never in the VM's directory (a jailed QEMU owns that).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    pub machine: MachineSpec,
    pub assets: GuestAssets,
    pub memory: MemoryBacking,
    pub active_disk: PathBuf,
    pub disk_base: Option<PathBuf>,
    pub kernel_cmdline: String,
    pub qemu: ProcessRecord,
    /// The network backend, if the VM has one.
    pub net: Option<ProcessRecord>,
}

impl VmRecord {
    /// Kills whatever of the VM still runs (recovery of an interrupted transition).
    pub fn kill_if_running(&self) {
        self.qemu.kill_if_running();
        if let Some(net) = &self.net {
            net.kill_if_running();
        }
    }

    /// Kills whatever of the VM still runs and releases its jails once it has ended.
    pub async fn end(&self) {
        self.kill_if_running();
        self.qemu.release_jail().await;
        if let Some(net) = &self.net {
            net.release_jail().await;
        }
    }
}

/// What [`Vm::adopt`] needs besides the record.
pub struct AdoptConfig {
    pub id: VmId,
    pub dir: PathBuf,
    pub record: VmRecord,
    /// Where the NIC leads (its `control` must be the path the backend serves).
    pub network: NetworkAttachment,
    pub confinement: Confinement,
    pub timeout: Duration,
}

impl Vm {
    /// Takes back a VM an earlier kilnd started and left running: watches its QEMU and
    /// network backend again, reads its console again, and opens QMP and a new agent
    /// session. A VM whose QEMU or backend has ended meanwhile is an error (the other is
    /// killed); its directory is the caller's.
    pub async fn adopt(cfg: AdoptConfig) -> Result<Vm, VmError> {
        let span = info_span!("vm", id = %cfg.id);
        let AdoptConfig {
            id,
            dir,
            record,
            network,
            confinement,
            timeout,
        } = cfg;
        async move {
            let paths = VmPaths::new(&dir);
            let gone = |what| {
                let id = id.clone();
                move |source| VmError::Gone { id, what, source }
            };
            let process =
                QemuProcess::adopt(&record.qemu, &paths.console_socket(), &paths.console_log())
                    .map_err(gone("QEMU"))?;
            let net_backend = match adopt_backend(&record, &network).await {
                Ok(b) => b,
                Err(source) => {
                    process.kill().await;
                    return Err(gone("network backend")(source));
                }
            };
            let connect = async {
                let qmp = crate::vm::connect_qmp(&id, &paths, timeout).await?;
                run_again(&id, &qmp).await?;
                let agent = connect_agent(&id, &paths, &process, timeout).await?;
                Ok::<_, VmError>((qmp, agent))
            };
            let outcome = tokio::select! {
                r = connect => r,
                exit = process.wait() => Err(VmError::Crashed {
                    id: id.clone(),
                    exit,
                    console: process.diagnostics(CONSOLE_TAIL),
                }),
            };
            let (qmp, agent) = match outcome {
                Ok(pair) => pair,
                Err(e) => {
                    process.kill().await;
                    if let Some(b) = &net_backend {
                        b.finish().await;
                    }
                    return Err(e);
                }
            };
            info!(pid = process.pid(), "adopted");
            Ok(Vm {
                id,
                paths,
                machine: record.machine,
                assets: record.assets,
                memory: record.memory,
                active_disk: record.active_disk,
                kernel_cmdline: record.kernel_cmdline,
                process,
                qmp,
                agent,
                span: Span::current(),
                die_with_parent: false,
                network,
                confinement,
                disk_base: record.disk_base,
                net_backend,
                owns_dir: true,
            })
        }
        .instrument(span)
        .await
    }

    /// What a later kilnd needs to take this VM back ([`Vm::adopt`]).
    pub fn record(&self) -> VmRecord {
        VmRecord {
            machine: self.machine.clone(),
            assets: self.assets.clone(),
            memory: self.memory.clone(),
            active_disk: self.active_disk.clone(),
            disk_base: self.disk_base.clone(),
            kernel_cmdline: self.kernel_cmdline.clone(),
            qemu: self.process.record().clone(),
            net: self.net_backend.as_ref().map(|b| b.record().clone()),
        }
    }

    /// Lets go of the VM and leaves it running, files and all, for a later kilnd to adopt
    /// (only a VM started without `die_with_parent` outlives this process).
    pub fn leave_running(mut self) {
        self.owns_dir = false;
        if let Some(backend) = self.net_backend.take() {
            backend.leave_running();
        }
        info!(parent: &self.span, "left running");
    }
}

/// An adopted guest that is not running was stopped by an interrupted transition: a
/// suspend saving its state (the save is cancelled) or a resume whose state was loaded
/// (its guest never ran). Either way it runs on. One still loading its state is refused:
/// the caller falls back to the snapshot.
async fn run_again(id: &VmId, qmp: &Qmp) -> Result<(), VmError> {
    let q = |source| VmError::Qmp {
        id: id.clone(),
        source,
    };
    let status = qmp.execute("query-status", json!({})).await.map_err(q)?;
    match status["status"].as_str().unwrap_or("") {
        "running" => Ok(()),
        "inmigrate" => Err(VmError::Invalid {
            id: id.clone(),
            reason: "its state was still loading when kilnd stopped".into(),
        }),
        other => {
            info!(
                status = other,
                "an interrupted transition stopped the guest: running it on"
            );
            let _ = qmp.execute("migrate_cancel", json!({})).await;
            // A cancel takes effect asynchronously; the guest can run once it has.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let m = qmp.execute("query-migrate", json!({})).await.map_err(q)?;
                let busy = matches!(
                    m["status"].as_str(),
                    Some("active" | "setup" | "cancelling" | "device" | "pre-switchover")
                );
                if !busy || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            qmp.execute("cont", json!({})).await.map_err(q)?;
            Ok(())
        }
    }
}

/// The network backend of an adopted VM, if it has one.
async fn adopt_backend(
    record: &VmRecord,
    network: &NetworkAttachment,
) -> std::io::Result<Option<crate::netproc::NetBackendProcess>> {
    let Some(net) = &record.net else {
        return Ok(None);
    };
    let NetworkAttachment::Egress {
        counters,
        denials,
        control: Some(control),
        ..
    } = network
    else {
        return Err(std::io::Error::other(
            "its network backend serves no control socket kilnd can reach",
        ));
    };
    crate::netproc::NetBackendProcess::adopt(net, control, counters, denials)
        .await
        .map(Some)
}
