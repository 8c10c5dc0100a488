//! One actor per microVM (as Firecracker's VMM takes one action at a time): a task that owns
//! the microVM's processes and snapshot (its [`Slot`]), takes one [`Command`] at a time, so
//! its transitions are serialised without a lock, and publishes its state on a watch channel.
//! Reads never queue behind it: GetMicrovm reads the store, exec and logs the agent the actor
//! publishes while RUNNING, and waiters (`waitFor`, the ingress) watch its state.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kiln_store::{now_ms, MicrovmRow};
use kiln_types::{MicrovmState, VmId};
use kiln_vmm::kiln_net::Connector;
use kiln_vmm::snapshot::LaunchConfig;
use kiln_vmm::{fault, NetworkAttachment, SuspendedVm, Template, Vm};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, info_span, warn, Instrument};

use crate::error::{ApiError, ApiResult};
use crate::manager::{error_chain, not_resumable_message, Manager, MicrovmConfig, Usage};

/// Where a command's answer goes.
pub type Reply<T> = oneshot::Sender<ApiResult<T>>;

/// Everything a microVM's actor does. Commands without a reply are fire-and-forget (the
/// idle policy's); the others answer when the transition is done.
pub enum Command {
    /// Launch a PENDING microVM (RunMicrovm sends it once, first).
    Launch {
        config: Box<MicrovmConfig>,
        payload: Option<String>,
        network: NetworkAttachment,
        /// Its QEMU, started ahead (the microVM has its id).
        prestarted: Option<Box<kiln_vmm::Prestarted>>,
    },
    /// Suspend a RUNNING microVM. With `if_idle_for`, only if it is still idle that long
    /// once the actor takes the command (a request may have come in since the decision).
    Suspend {
        reason: String,
        if_idle_for: Option<u64>,
        reply: Option<Reply<MicrovmRow>>,
    },
    Resume {
        reason: String,
        reply: Option<Reply<MicrovmRow>>,
    },
    Terminate {
        reason: String,
        reply: Option<Reply<MicrovmRow>>,
    },
    /// Copy a RUNNING microVM into `targets` (PENDING clones' directories, or an image's
    /// staging directory), written as suspended VMs. `extra_disk`: bytes the caller will
    /// write from them afterwards (a saved image's RAM and flattened disk).
    Fork {
        targets: Vec<kiln_vmm::ForkTarget>,
        extra_disk: u64,
        reply: Reply<Vec<SuspendedVm>>,
    },
    /// Upload a SUSPENDED microVM's snapshot again (one failed): `--object-store`.
    Upload { reply: Reply<()> },
    /// A standalone copy of a SUSPENDED microVM's disk.
    ExportDisk {
        reply: Reply<(tokio::fs::File, u64)>,
    },
    /// The metering tick: usage, burst credit, and a QEMU that ended on its own.
    Tick,
    /// kilnd is stopping and leaves the microVM running for the next one: the actor samples,
    /// keeps the runtime record and lets go of the processes, then ends. Answers whether a
    /// running microVM was left.
    LetGo { reply: oneshot::Sender<bool> },
}

/// A microVM's processes and snapshot, owned by its actor.
#[derive(Default)]
pub struct Slot {
    pub vm: Option<Vm>,
    pub suspended: Option<SuspendedVm>,
    pub last_sample_ms: i64,
    /// Burst credit (jailed microVMs), and the cgroup it was last read from.
    pub cpu: Option<crate::cpu::CpuCredit>,
    pub cpu_cgroup: Option<PathBuf>,
    /// The cgroup's count of throttled periods at the last tick.
    pub cpu_throttled: Option<u64>,
}

/// How the rest of kilnd reaches an actor.
pub struct Handle {
    pub tx: mpsc::Sender<Command>,
    pub state: Arc<watch::Sender<MicrovmState>>,
}

/// Commands queued per actor at most; the tick is dropped rather than queued when full.
const QUEUE: usize = 64;

/// Starts the actor of microVM `id`, now in `state`, owning `slot`.
pub fn spawn(manager: &Arc<Manager>, id: &str, state: MicrovmState, slot: Slot) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let state = Arc::new(watch::channel(state).0);
    manager.actors_mut().insert(
        id.to_string(),
        Handle {
            tx,
            state: state.clone(),
        },
    );
    let actor = Actor {
        id: id.to_string(),
        m: manager.clone(),
        slot,
        rx,
    };
    let span = info_span!("microvm", id = %id);
    tokio::spawn(actor.run().instrument(span));
}

struct Actor {
    id: String,
    m: Arc<Manager>,
    slot: Slot,
    rx: mpsc::Receiver<Command>,
}

/// Whether the actor goes on after a command.
enum Next {
    Continue,
    Stop,
}

impl Actor {
    async fn run(mut self) {
        while let Some(command) = self.rx.recv().await {
            if let Next::Stop = self.handle(command).await {
                break;
            }
        }
        // Commands still queued are dropped: their senders see the microVM's state instead.
        self.m.actors_mut().remove(&self.id);
    }

    async fn handle(&mut self, command: Command) -> Next {
        match command {
            Command::Launch {
                config,
                payload,
                network,
                prestarted,
            } => self.launch(&config, payload, network, prestarted).await,
            Command::Suspend {
                reason,
                if_idle_for,
                reply,
            } => {
                let result = self.suspend(&reason, if_idle_for).await;
                answer(reply, result);
            }
            Command::Resume { reason, reply } => {
                let result = self.resume(&reason).await;
                answer(reply, result);
            }
            Command::Terminate { reason, reply } => {
                let result = self.terminate(&reason).await;
                answer(reply, result);
            }
            Command::Fork {
                targets,
                extra_disk,
                reply,
            } => {
                let _ = reply.send(self.fork(&targets, extra_disk).await);
            }
            Command::ExportDisk { reply } => {
                let _ = reply.send(self.export_disk().await);
            }
            Command::Upload { reply } => {
                if self.slot.suspended.is_some() {
                    crate::travel::upload(&self.m, &self.id).await;
                }
                let _ = reply.send(Ok(()));
            }
            Command::Tick => {
                if self.reap_if_crashed().await {
                    return Next::Stop;
                }
                let usage = self.sample(None);
                self.record_metrics(usage).await;
            }
            Command::LetGo { reply } => {
                let _ = reply.send(self.let_go());
                return Next::Stop;
            }
        }
        if self
            .row()
            .is_ok_and(|r| r.state == MicrovmState::Terminated)
        {
            Next::Stop
        } else {
            Next::Continue
        }
    }

    fn row(&self) -> ApiResult<MicrovmRow> {
        self.m.row(&self.id)
    }

    async fn launch(
        &mut self,
        config: &MicrovmConfig,
        payload: Option<String>,
        net: NetworkAttachment,
        prestarted: Option<Box<kiln_vmm::Prestarted>>,
    ) {
        let (m, id) = (self.m.clone(), self.id.clone());
        let vm_id = match VmId::new(&id) {
            Ok(v) => v,
            Err(e) => return m.set_state(&id, MicrovmState::Terminated, Some(&e.to_string())),
        };
        let launched = async {
            let template =
                Template::open(&config.template)?.with_spare_overlays(m.spare_overlays_dir());
            // The record is durable before the guest runs: a crash from here on is found.
            let before_run: kiln_vmm::BeforeRun = Box::new(|record| {
                m.keep_record(&id, record);
                crate::pool::Pool::taken(&m, &id);
                fault::point("launch.before-run");
            });
            let confinement = m.confinement_of(config);
            let vm = match prestarted {
                Some(pre) => {
                    m.pool.served.fetch_add(1, Ordering::Relaxed);
                    template
                        .launch_prestarted(*pre, net, Some(before_run))
                        .await?
                }
                None => {
                    m.pool.started.fetch_add(1, Ordering::Relaxed);
                    let cfg = LaunchConfig {
                        id: vm_id,
                        dir: m.microvm_dir(&id),
                        machine: None,
                        assets: m.assets.clone(),
                        timeout: Duration::from_secs(60),
                        // Guests outlive kilnd: a restart takes them back (recovery).
                        die_with_parent: false,
                        network: net,
                        confinement: confinement.clone(),
                    };
                    template.launch_with(cfg, Some(before_run)).await?
                }
            };
            // This image is hot: the next launch's QEMU starts now.
            crate::pool::refill(&m, &config.template, confinement);
            if let Err(e) = apply_no_network(config, &vm).await {
                let _ = vm.destroy().await;
                return Err(e);
            }
            Ok::<_, kiln_vmm::VmError>(vm)
        }
        .await;
        let vm = match launched {
            Ok(vm) => vm,
            Err(e) => {
                let why = format!("launch failed: {e}");
                return m.set_state(&id, MicrovmState::Terminated, Some(&why));
            }
        };
        fault::point("launch.started");
        self.slot.cpu = Some(crate::cpu::CpuCredit::new(
            Manager::baseline_of(config),
            m.cfg.cpu_credit_max_seconds,
        ));
        self.slot.cpu_cgroup = None;
        if config.hooks_enabled {
            let body = payload.unwrap_or_default().into_bytes();
            if let Err(why) = m.hook(&vm, config.hook_port, "/run", body).await {
                let _ = vm.destroy().await;
                let _ = std::fs::remove_dir_all(m.microvm_dir(&id));
                let why = format!("run hook failed: {why}");
                return m.set_state(&id, MicrovmState::Terminated, Some(&why));
            }
        }
        fault::point("launch.hooked");
        self.start_running(vm, None);
    }

    /// The end of a launch or resume: the VM in the slot, metering from now, its agent
    /// published (first: whoever the state change wakes finds it), then RUNNING.
    fn start_running(&mut self, vm: Vm, reason: Option<&str>) {
        let agent = vm.agent().clone();
        self.slot.vm = Some(vm);
        self.slot.last_sample_ms = now_ms();
        self.m.record_activity(&self.id);
        self.m.publish(&self.id, Some(agent));
        self.m.set_state(&self.id, MicrovmState::Running, reason);
    }

    async fn suspend(&mut self, reason: &str, if_idle_for: Option<u64>) -> ApiResult<MicrovmRow> {
        let (m, id) = (self.m.clone(), self.id.clone());
        let id = id.as_str();
        let row = self.row()?;
        if row.state != MicrovmState::Running {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {}; only a RUNNING microVM can be suspended",
                row.state
            )));
        }
        if let Some(max_idle) = if_idle_for {
            let idle_ms = now_ms() - m.last_activity(id, row.last_activity_at);
            if m.open_requests(id) > 0 || idle_ms < (max_idle as i64) * 1000 {
                info!(id, "no longer idle: the idle suspend is dropped");
                return Ok(row);
            }
        }
        // Its memory goes to disk: refused, and left running, when that would fill the disk
        // (a save that fails half way would cost the microVM).
        if let Some(vm) = self.slot.vm.as_ref() {
            m.check_disk("not suspended, it keeps running", save_bound(vm))?;
        }
        m.publish(id, None);
        let config = Manager::config_of(&row)?;
        let vm = self
            .slot
            .vm
            .take()
            .ok_or_else(|| ApiError::internal("running microVM has no process"))?;
        let mut note = reason.to_string();
        if config.hooks_enabled {
            if let Err(why) = m.hook(&vm, config.hook_port, "/suspend", Vec::new()).await {
                note = format!("{reason}; suspend hook failed: {why}");
            }
        }
        fault::point("suspend.hooked");
        self.sample(Some(&vm));
        match vm.suspend().await {
            Ok(suspended) => {
                fault::point("suspend.saved");
                m.forget_runtime(id);
                self.slot.suspended = Some(suspended);
                m.set_state(id, MicrovmState::Suspended, Some(&note));
                // Then it can travel (with --object-store).
                crate::travel::upload(&m, id).await;
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(m.microvm_dir(id));
                let why = format!("suspend failed: {e}");
                m.set_state(id, MicrovmState::Terminated, Some(&why));
            }
        }
        self.row()
    }

    async fn resume(&mut self, reason: &str) -> ApiResult<MicrovmRow> {
        let (m, id) = (self.m.clone(), self.id.clone());
        let row = self.row()?;
        if row.state != MicrovmState::Suspended {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {}; only a SUSPENDED microVM can be resumed",
                row.state
            )));
        }
        if let Some(why) = m.not_resumable(&id) {
            return Err(ApiError::conflict(not_resumable_message(&id, &why)));
        }
        let config = Manager::config_of(&row)?;
        self.sample(None);
        let suspended = self
            .slot
            .suspended
            .take()
            .ok_or_else(|| ApiError::internal("suspended microVM has no state"))?;
        // Its ownership may have moved while this node was out of touch: then it is not
        // this node's to resume.
        if let Err(e) = crate::cluster::still_mine(&m, &id) {
            self.slot.suspended = Some(suspended);
            return Err(e);
        }
        crate::travel::forget(&m, &id);
        m.set_state(&id, MicrovmState::Resuming, Some(reason));
        // The record is durable before the guest runs again; the snapshot goes once it runs.
        let before_run: kiln_vmm::BeforeRun = Box::new(|record| {
            m.keep_record(&id, record);
            fault::point("resume.before-run");
        });
        let vm = match suspended
            .resume_with(Duration::from_secs(60), Some(before_run))
            .await
        {
            Ok(vm) => vm,
            Err(e) => {
                self.resume_failed(&row, &e);
                return self.row();
            }
        };
        vm.forget_suspended_state();
        fault::point("resume.started");
        if let Err(e) = apply_no_network(&config, &vm).await {
            warn!(id, "taking the NIC away again after resume failed: {e}");
        }
        if config.hooks_enabled {
            if let Err(why) = m.hook(&vm, config.hook_port, "/resume", Vec::new()).await {
                warn!(id, "resume hook failed: {why}");
            }
        }
        self.start_running(vm, Some(reason));
        self.row()
    }

    /// Pauses the guest once and writes each clone; the guest runs on with a new agent
    /// session (published again), whatever happened to the clones.
    async fn fork(
        &mut self,
        targets: &[kiln_vmm::ForkTarget],
        extra_disk: u64,
    ) -> ApiResult<Vec<SuspendedVm>> {
        let (m, id) = (self.m.clone(), self.id.clone());
        let row = self.row()?;
        if row.state != MicrovmState::Running {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {}; only a RUNNING microVM can be forked or saved as an image",
                row.state
            )));
        }
        let vm = self
            .slot
            .vm
            .as_mut()
            .ok_or_else(|| ApiError::internal("running microVM has no process"))?;
        // The diff once (hard-linked into each clone), the disk overlay per clone.
        let overlay = std::fs::metadata(vm.active_disk()).map_or(0, |d| d.blocks() * 512);
        let needs = save_bound(vm)
            .saturating_add(overlay.saturating_mul(targets.len() as u64))
            .saturating_add(extra_disk);
        m.check_disk("no fork", needs)?;
        m.publish(&id, None);
        let forked = vm.fork(targets).await;
        m.publish(&id, Some(vm.agent().clone()));
        m.record_activity(&id);
        forked.map_err(|e| {
            ApiError::conflict(format!(
                "the fork failed, {id} runs on: {}",
                error_chain(&e)
            ))
        })
    }

    /// A resume that failed before the guest ran keeps its snapshot: the microVM is
    /// SUSPENDED again, resumable once the cause is fixed. Only when the snapshot cannot be
    /// opened again is it TERMINATED.
    fn resume_failed(&mut self, row: &MicrovmRow, e: &kiln_vmm::VmError) {
        let (m, id) = (&self.m, self.id.as_str());
        m.forget_runtime(id);
        match crate::recovery::reopen_suspended(m, row) {
            Ok(s) => {
                self.slot.suspended = Some(s);
                let why = format!("resume failed, the snapshot is kept: {}", error_chain(e));
                m.set_state(id, MicrovmState::Suspended, Some(&why));
            }
            Err(reopen) => {
                let _ = std::fs::remove_dir_all(m.microvm_dir(id));
                let why = format!("resume failed: {e} (and its snapshot is unusable: {reopen})");
                m.set_state(id, MicrovmState::Terminated, Some(&why));
            }
        }
    }

    /// A standalone copy of a SUSPENDED microVM's disk (overlay and backing chain in one
    /// qcow2), already unlinked: it is gone once the caller drops the file.
    async fn export_disk(&mut self) -> ApiResult<(tokio::fs::File, u64)> {
        let (m, id) = (&self.m, self.id.as_str());
        let state = self.row()?.state;
        if state != MicrovmState::Suspended {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {state}: its disk can be downloaded while it is SUSPENDED \
                 (suspend it first)"
            )));
        }
        let dir = m.microvm_dir(id);
        // The chain under the overlay is the one kiln recorded, never what its header says.
        let base = match self
            .slot
            .suspended
            .as_ref()
            .and_then(|s| s.manifest().disk_backing.clone())
        {
            Some(base) => PathBuf::from(base),
            None => Manager::config_of(&self.row()?)?
                .template
                .join("disk.qcow2"),
        };
        let out = dir.join(format!("export-{}.qcow2", now_ms()));
        kiln_vmm::disk::flatten(&dir.join("disk.qcow2"), &base, &out)
            .await
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
        let opened = tokio::fs::File::open(&out).await;
        let _ = std::fs::remove_file(&out);
        let file = opened.map_err(ApiError::internal)?;
        let bytes = file.metadata().await.map_err(ApiError::internal)?.len();
        Ok((file, bytes))
    }

    async fn terminate(&mut self, reason: &str) -> ApiResult<MicrovmRow> {
        let (m, id) = (self.m.clone(), self.id.clone());
        let id = id.as_str();
        let row = self.row()?;
        if row.state == MicrovmState::Terminated {
            return Err(ApiError::conflict(format!(
                "microVM {id} is already TERMINATED"
            )));
        }
        let config = Manager::config_of(&row)?;
        m.publish(id, None);
        if let Some(vm) = self.slot.vm.take() {
            if config.hooks_enabled {
                if let Err(why) = m
                    .hook(&vm, config.hook_port, "/terminate", Vec::new())
                    .await
                {
                    warn!(id, "terminate hook failed: {why}");
                }
            }
            self.sample(Some(&vm));
            let _ = vm.destroy().await;
            fault::point("terminate.killed");
        }
        if let Some(s) = self.slot.suspended.take() {
            let _ = s.discard();
        }
        self.finish_termination(reason);
        self.row()
    }

    /// The end of every termination: the microVM's files, its state, tokens, egress state.
    fn finish_termination(&mut self, reason: &str) {
        let (m, id) = (&self.m, self.id.as_str());
        let _ = std::fs::remove_dir_all(m.microvm_dir(id));
        let _ = std::fs::remove_file(m.net_control(id));
        m.set_state(id, MicrovmState::Terminated, Some(reason));
        m.tokens.revoke_microvm(id);
        m.egress.forget(id);
    }

    /// A RUNNING microVM whose QEMU ended on its own (a crash; the OOM killer at its jail's
    /// memory limit) becomes TERMINATED with how QEMU ended and its console tail; its files,
    /// tokens and egress state go. Returns whether it had ended.
    async fn reap_if_crashed(&mut self) -> bool {
        let Some(report) = self.slot.vm.as_ref().and_then(|vm| vm.crash()) else {
            return false;
        };
        warn!(id = self.id, "QEMU ended on its own: {report}");
        self.m.publish(&self.id, None);
        if let Some(vm) = self.slot.vm.take() {
            self.sample(Some(&vm));
            let _ = vm.destroy().await;
        }
        self.finish_termination(&report.to_string());
        true
    }

    fn let_go(&mut self) -> bool {
        self.m.publish(&self.id, None);
        let Some(vm) = self.slot.vm.take() else {
            return false;
        };
        self.sample(Some(&vm));
        self.m.keep_runtime(&self.id, &vm);
        vm.leave_running();
        true
    }

    /// A metrics sample of the running microVM (see [`crate::metrics`]).
    async fn record_metrics(&self, usage: Option<Usage>) {
        let (Some(vm), Some(usage)) = (self.slot.vm.as_ref(), usage) else {
            return;
        };
        let at_ms = now_ms();
        let guest = if self.m.metrics.guest_due(&self.id, at_ms) {
            tokio::time::timeout(crate::metrics::GUEST_TIMEOUT, vm.agent().stats())
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        let sample = crate::metrics::Sample {
            at_ms,
            usage,
            host_memory_bytes: crate::metrics::pss_bytes(vm.qemu_pid()),
            host_disk_bytes: crate::metrics::allocated_bytes(vm.active_disk()),
            guest,
        };
        self.m.metrics.record(&self.id, sample);
    }

    /// Adds the time since the last sample to the microVM's usage; the usage as written.
    fn sample(&mut self, running: Option<&Vm>) -> Option<Usage> {
        let (m, id) = (&self.m, self.id.as_str());
        let slot = &mut self.slot;
        let now = now_ms();
        let elapsed = (now - slot.last_sample_ms.max(0)).max(0) as f64 / 1000.0;
        slot.last_sample_ms = now;
        let Ok(Some(row)) = m.store().microvm(id) else {
            return None;
        };
        let mut usage: Usage = serde_json::from_value(row.usage.clone()).unwrap_or_default();
        let vcpus = Manager::config_of(&row).map(|c| c.vcpus).unwrap_or(1) as f64;
        if let Some(vm) = running.or(slot.vm.as_ref()) {
            usage.running_seconds += elapsed;
            match (vm.jail(), slot.cpu.as_mut()) {
                // Jailed: usage from the cgroup, and the burst quota set from the credit.
                (Some(jail), Some(credit)) => {
                    let cgroups = &jail.cgroups;
                    if slot.cpu_cgroup.as_deref() != Some(cgroups.cpuacct.dir.as_path()) {
                        credit.restart();
                        slot.cpu_cgroup = Some(cgroups.cpuacct.dir.clone());
                        slot.cpu_throttled = None;
                    }
                    if let Some(now) = cgroups.cpu_seconds() {
                        let throttled = cgroups.nr_throttled().unwrap_or(0);
                        let was = slot.cpu_throttled.replace(throttled);
                        let tick = credit.tick(now, elapsed, was.is_some_and(|w| throttled > w));
                        usage.cpu_seconds += tick.used;
                        usage.cpu_seconds_above_baseline += tick.above;
                        let quota = kiln_jail::spec::quota_for(tick.quota_cpus);
                        if cgroups.cpu_quota_us() != Some(quota) {
                            if let Err(e) =
                                cgroups.set_cpu_quota(quota, kiln_jail::spec::CPU_PERIOD_US)
                            {
                                warn!(id, "setting the CPU quota: {e}");
                            }
                        }
                    }
                    usage.cpu_baseline = credit.baseline;
                    usage.cpu_credit_seconds = credit.credit;
                }
                _ => {
                    if let Some(cpu) = kiln_jail::process_cpu_seconds(vm.qemu_pid()) {
                        usage.cpu_seconds = cpu.max(usage.cpu_seconds);
                    }
                    usage.cpu_seconds_above_baseline =
                        (usage.cpu_seconds - usage.running_seconds * vcpus).max(0.0);
                }
            }
        } else if let Some(s) = &slot.suspended {
            usage.suspended_snapshot_byte_seconds += s.state_bytes() as f64 * elapsed;
        }
        if let Some(network) = m.egress.counters(id) {
            usage.network = network;
        }
        if let Ok(v) = serde_json::to_value(&usage) {
            let _ = m.write(|s| s.set_usage(id, &v));
        }
        Some(usage)
    }
}

fn answer<T>(reply: Option<Reply<T>>, result: ApiResult<T>) {
    if let Some(reply) = reply {
        let _ = reply.send(result);
    } else if let Err(e) = result {
        tracing::debug!("dropped: {}", e.message);
    }
}

/// The `none` connector takes the NIC away; needed after every launch and resume.
async fn apply_no_network(config: &MicrovmConfig, vm: &Vm) -> Result<(), kiln_vmm::VmError> {
    if config.connectors.contains(&Connector::None) {
        vm.detach_nic().await?;
    }
    Ok(())
}

/// At most what saving `vm` writes: its private pages (a diff save; plus room for the device
/// state and what the guest writes while it is detached) or, without a template, all its RAM.
fn save_bound(vm: &kiln_vmm::Vm) -> u64 {
    const MARGIN: u64 = 16 << 20;
    match vm.ram_usage() {
        Some(Ok(usage)) => usage.anonymous.saturating_add(MARGIN),
        _ => u64::from(vm.machine().memory_mib) << 20,
    }
}
