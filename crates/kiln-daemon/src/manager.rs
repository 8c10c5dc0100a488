//! The microVM manager: the lifecycle state machine, hooks, and the one place where
//! activity is recorded. Each microVM has a slot whose async lock serialises its
//! transitions; every transition is written to the store with its reason.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_image::build::hook_get;
use kiln_image::Builder;
use kiln_proto::HttpRequest;
use kiln_store::{now_ms, MicrovmRow, Store};
use kiln_types::{Accel, MicrovmState, VmId};
use kiln_vmm::kiln_net::{Connector, CounterSnapshot};
use kiln_vmm::snapshot::LaunchConfig;
use kiln_vmm::{fault, GuestAssets, NetworkAttachment, SuspendedVm, Template, Vm};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tracing::{info, info_span, warn, Instrument};

use crate::config::{Config, DEFAULT_MAX_DURATION_SECONDS, MAX_RUN_PAYLOAD_BYTES};
use crate::egress::{default_connectors, Egress};
use crate::error::{ApiError, ApiResult};

pub use kiln_api::{IdlePolicy, Usage};

/// What a microVM was started with, kept in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmConfig {
    pub idle_policy: IdlePolicy,
    pub max_duration_seconds: u64,
    pub hook_port: u16,
    pub hooks_enabled: bool,
    pub template: PathBuf,
    pub vcpus: u8,
    /// CPUs held to once the burst credit is spent (rows from before: a quarter of vcpus).
    #[serde(default)]
    pub cpu_baseline: Option<f64>,
    /// Egress connectors (rows from before connectors existed get `internet`).
    #[serde(default = "default_connectors")]
    pub connectors: Vec<Connector>,
}

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

pub struct Manager {
    pub cfg: Config,
    pub store: Mutex<Store>,
    pub builder: Builder,
    pub assets: GuestAssets,
    pub accel: Accel,
    /// Every microVM's jail (or `--no-jail`).
    pub confinement: kiln_vmm::Confinement,
    pub slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    pub tokens: Arc<kiln_proxy::token::TokenService>,
    /// Open ingress requests and streams per microVM.
    pub inflight: Mutex<HashMap<String, usize>>,
    pub egress: Egress,
    /// SUSPENDED microVMs this host cannot resume (their snapshot was taken with another
    /// QEMU or machine), with the differences. They are kept, never deleted by policy.
    pub not_resumable: Mutex<HashMap<String, String>>,
    /// Held while a new microVM or build is counted against its quota and recorded, so two
    /// requests at once cannot both take the last place.
    pub admission: Mutex<()>,
    /// Bumped at every state change: what `waitFor` waits on instead of polling.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// The agent of each RUNNING microVM that no transition holds: exec, logs and the
    /// ingress read it here, so they never wait behind a launch, suspend or resume.
    pub agents: Mutex<HashMap<String, kiln_vmm::AgentClient>>,
}

pub use kiln_api::MAX_WAIT_SECONDS;

pub fn new_microvm_id() -> String {
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("mvm-{}", hex::encode(b))
}

impl Manager {
    /// The CPUs a microVM is held to once its burst credit is spent.
    pub fn baseline_of(config: &MicrovmConfig) -> f64 {
        config
            .cpu_baseline
            .unwrap_or(f64::from(config.vcpus) / crate::cpu::BURST_FACTOR)
    }

    /// The jail of a microVM: kilnd's, with a CPU quota of 4x its baseline to start.
    pub fn confinement_of(&self, config: &MicrovmConfig) -> kiln_vmm::Confinement {
        match self.confinement {
            kiln_vmm::Confinement::Jailed(limits) => {
                kiln_vmm::Confinement::Jailed(kiln_vmm::JailLimits {
                    cpus: Some(Self::baseline_of(config) * crate::cpu::BURST_FACTOR),
                    ..limits
                })
            }
            kiln_vmm::Confinement::Unjailed => kiln_vmm::Confinement::Unjailed,
        }
    }

    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    pub fn microvm_dir(&self, id: &str) -> PathBuf {
        self.cfg.home.join("microvms").join(id)
    }

    pub fn endpoint(&self, id: &str) -> String {
        format!("{id}.{}:{}", self.cfg.ingress_domain, self.cfg.ingress_port)
    }

    /// An ingress request or stream opened: activity, and no idle suspend until it ends.
    pub fn begin_request(&self, id: &str) {
        *self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default() += 1;
        self.record_activity(id);
    }

    pub fn end_request(&self, id: &str) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = inflight.get_mut(id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inflight.remove(id);
            }
        }
        drop(inflight);
        self.record_activity(id);
    }

    /// Open ingress requests and streams of a microVM.
    pub fn open_requests(&self, id: &str) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// The one place activity is recorded (proxied requests, open streams, exec sessions).
    pub fn record_activity(&self, id: &str) {
        if let Err(e) = self.store().touch(id, now_ms()) {
            warn!(id, "recording activity failed: {e}");
        }
    }

    /// Why this SUSPENDED microVM cannot be resumed on this host, if it cannot.
    pub fn not_resumable(&self, id: &str) -> Option<String> {
        let map = self.not_resumable.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).cloned()
    }

    pub fn row(&self, id: &str) -> ApiResult<MicrovmRow> {
        self.store()
            .microvm(id)?
            .ok_or_else(|| ApiError::not_found("microVM", id))
    }

    pub(crate) fn set_state(&self, id: &str, to: MicrovmState, reason: Option<&str>) {
        if to == MicrovmState::Terminated {
            self.forget_runtime(id);
        }
        if let Err(e) = self.store().set_state(id, to, reason) {
            warn!(id, "recording state {to} failed: {e}");
        }
        info!(id, state = %to, reason = reason.unwrap_or(""), "microVM state");
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Makes a RUNNING microVM's agent reachable for reads, or (None) withdraws it when a
    /// transition takes the microVM.
    pub fn publish(&self, id: &str, agent: Option<kiln_vmm::AgentClient>) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        match agent {
            Some(a) => agents.insert(id.to_string(), a),
            None => agents.remove(id),
        };
    }

    /// The microVM once it is in `target` (or TERMINATED, which it never leaves), or as it is
    /// when `timeout` has passed: woken by each state change, never polling.
    pub async fn wait_for(
        &self,
        id: &str,
        target: MicrovmState,
        timeout: Duration,
    ) -> ApiResult<MicrovmRow> {
        // Subscribed before the first read, so no change between the two is missed.
        let mut changes = self.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let row = self.row(id)?;
            let state = row.state;
            if state == target || state == MicrovmState::Terminated {
                return Ok(row);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(row),
            }
        }
    }

    /// RunMicrovm: records PENDING and launches in the background.
    pub fn run(self: &Arc<Self>, req: kiln_api::RunMicrovmRequest) -> ApiResult<MicrovmRow> {
        let image = req.image_identifier.as_str();
        let idle = req.idle_policy.unwrap_or_default();
        let (payload, max_duration) = (req.run_hook_payload, req.max_duration_seconds);
        let connectors = req.connectors.unwrap_or_else(default_connectors);
        self.egress.compile(&connectors)?;
        if idle.max_idle_duration_seconds < self.cfg.min_idle_seconds {
            return Err(ApiError::bad_request(format!(
                "idlePolicy.maxIdleDurationSeconds must be at least {} (got {})",
                self.cfg.min_idle_seconds, idle.max_idle_duration_seconds
            )));
        }
        let max_duration = max_duration.unwrap_or(DEFAULT_MAX_DURATION_SECONDS);
        if max_duration == 0 || max_duration > DEFAULT_MAX_DURATION_SECONDS {
            return Err(ApiError::bad_request(format!(
                "maxDurationSeconds must be 1 to {DEFAULT_MAX_DURATION_SECONDS}"
            )));
        }
        if let Some(p) = &payload {
            if p.len() > MAX_RUN_PAYLOAD_BYTES {
                return Err(ApiError::bad_request(format!(
                    "runHookPayload is {} bytes; the limit is {MAX_RUN_PAYLOAD_BYTES}",
                    p.len()
                )));
            }
        }
        let img = self
            .store()
            .image(image)?
            .ok_or_else(|| ApiError::not_found("image", image))?;
        if img.status != kiln_types::ImageStatus::Successful {
            let why = img
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            return Err(ApiError::conflict(format!(
                "image {} is {}, not SUCCESSFUL: it cannot run{why}",
                img.id, img.status
            )));
        }
        let template: PathBuf = img.record["template"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| ApiError::internal("image has no template"))?;
        let config = MicrovmConfig {
            idle_policy: idle,
            max_duration_seconds: max_duration,
            hook_port: img.record["hook_port"].as_u64().unwrap_or(9000) as u16,
            hooks_enabled: img.record["hooks_enabled"].as_bool().unwrap_or(false),
            template,
            vcpus: img.record["vcpus"].as_u64().unwrap_or(1) as u8,
            cpu_baseline: img.record["cpu_baseline"].as_f64(),
            connectors,
        };
        let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.store().count_live_microvms()?;
        if live >= self.cfg.max_microvms {
            return Err(ApiError::quota(format!(
                "{live} microVMs are not TERMINATED and the limit is {}: terminate one, or raise \
                 kilnd --max-microvms",
                self.cfg.max_microvms
            )));
        }
        let now = now_ms();
        let row = MicrovmRow {
            id: new_microvm_id(),
            image_id: img.id.clone(),
            image_name: img.name.clone(),
            state: MicrovmState::Pending,
            state_reason: None,
            created_at: now,
            state_changed_at: now,
            last_activity_at: now,
            config: serde_json::to_value(&config).map_err(ApiError::internal)?,
            usage: serde_json::to_value(Usage::default()).map_err(ApiError::internal)?,
        };
        self.store().insert_microvm(&row)?;
        let (this, id) = (self.clone(), row.id.clone());
        let network = self.network_of(&id, &config, CounterSnapshot::default())?;
        let slot = self.slot(&id);
        let span = info_span!("microvm", id = %id);
        tokio::spawn(
            async move {
                let mut slot = slot.lock().await;
                this.launch(&id, &config, payload, network, &mut slot).await;
            }
            .instrument(span),
        );
        Ok(row)
    }

    async fn launch(
        &self,
        id: &str,
        config: &MicrovmConfig,
        payload: Option<String>,
        network: NetworkAttachment,
        slot: &mut Slot,
    ) {
        let vm_id = match VmId::new(id) {
            Ok(v) => v,
            Err(e) => return self.set_state(id, MicrovmState::Terminated, Some(&e.to_string())),
        };
        let launched = async {
            let template = Template::open(&config.template)?;
            // The record is durable before the guest runs: a crash from here on is found.
            let before_run: kiln_vmm::BeforeRun = Box::new(|record| {
                self.keep_record(id, record);
                fault::point("launch.before-run");
            });
            let vm = template
                .launch_with(
                    LaunchConfig {
                        id: vm_id,
                        dir: self.microvm_dir(id),
                        machine: None,
                        assets: self.assets.clone(),
                        timeout: Duration::from_secs(60),
                        // Guests outlive kilnd: a restart takes them back (recovery).
                        die_with_parent: false,
                        network,
                        confinement: self.confinement_of(config),
                    },
                    Some(before_run),
                )
                .await?;
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
                return self.set_state(
                    id,
                    MicrovmState::Terminated,
                    Some(&format!("launch failed: {e}")),
                )
            }
        };
        fault::point("launch.started");
        slot.cpu = Some(crate::cpu::CpuCredit::new(
            Self::baseline_of(config),
            self.cfg.cpu_credit_max_seconds,
        ));
        slot.cpu_cgroup = None;
        if config.hooks_enabled {
            if let Err(why) = self
                .hook(
                    &vm,
                    config.hook_port,
                    "/run",
                    payload.unwrap_or_default().into_bytes(),
                )
                .await
            {
                let _ = vm.destroy().await;
                let _ = std::fs::remove_dir_all(self.microvm_dir(id));
                return self.set_state(
                    id,
                    MicrovmState::Terminated,
                    Some(&format!("run hook failed: {why}")),
                );
            }
        }
        fault::point("launch.hooked");
        let agent = vm.agent().clone();
        slot.vm = Some(vm);
        slot.last_sample_ms = now_ms();
        self.record_activity(id);
        // Published first: whoever the state change wakes finds the agent.
        self.publish(id, Some(agent));
        self.set_state(id, MicrovmState::Running, None);
    }

    /// The network a microVM's NIC leads to, from its connectors.
    pub fn network_of(
        self: &Arc<Self>,
        id: &str,
        config: &MicrovmConfig,
        earlier: CounterSnapshot,
    ) -> ApiResult<NetworkAttachment> {
        let policy = self.egress.compile(&config.connectors)?;
        Ok(self.egress.attachment(
            Arc::downgrade(self),
            id,
            policy,
            earlier,
            self.net_control(id),
        ))
    }

    /// Where microVM `id`'s network backend serves its reports: a directory of kilnd's
    /// (0700, root's), never the VM's own, which its jailed QEMU owns.
    pub fn net_control(&self, id: &str) -> PathBuf {
        self.cfg
            .home
            .join("run")
            .join("net")
            .join(format!("{id}.sock"))
    }

    /// Keeps what a restarted kilnd needs to take `vm` back, before the state that needs it.
    pub fn keep_runtime(&self, id: &str, vm: &Vm) {
        self.keep_record(id, &vm.record());
    }

    /// Keeps a runtime record (see [`Manager::keep_runtime`]): called before a guest runs.
    pub fn keep_record(&self, id: &str, record: &kiln_vmm::VmRecord) {
        let record = serde_json::to_value(record);
        let kept = record
            .map_err(kiln_store::StoreError::from)
            .and_then(|r| self.store().set_runtime(id, Some(&r)));
        if let Err(e) = kept {
            warn!(id, "keeping the microVM's runtime record failed: {e}");
        }
    }

    /// Forgets the runtime record once no process of the microVM runs.
    pub fn forget_runtime(&self, id: &str) {
        if let Err(e) = self.store().set_runtime(id, None) {
            warn!(id, "forgetting the microVM's runtime record failed: {e}");
        }
    }

    /// POSTs to a lifecycle hook; Err carries a one-line reason.
    async fn hook(&self, vm: &Vm, port: u16, path: &str, body: Vec<u8>) -> Result<(), String> {
        let req = HttpRequest {
            method: "POST".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: ByteBuf::from(body),
            timeout_ms: self.cfg.hook_timeout.as_millis() as u64,
            ..hook_get(port, path)
        };
        match vm.agent().http(req).await {
            Ok(r) if (200..300).contains(&r.status) => Ok(()),
            Ok(r) => Err(format!("POST {path} answered HTTP {}", r.status)),
            Err(e) => Err(format!("POST {path}: {}", error_chain(&e))),
        }
    }

    pub fn config_of(row: &MicrovmRow) -> ApiResult<MicrovmConfig> {
        serde_json::from_value(row.config.clone()).map_err(ApiError::internal)
    }

    pub async fn suspend(&self, id: &str, reason: &str) -> ApiResult<MicrovmRow> {
        self.suspend_unless(id, reason, None).await
    }

    /// The idle policy's suspend: idleness is checked again once the microVM is held, so a
    /// request that came in after the decision keeps it running.
    pub async fn suspend_if_idle(
        &self,
        id: &str,
        reason: &str,
        max_idle_seconds: u64,
    ) -> ApiResult<MicrovmRow> {
        self.suspend_unless(id, reason, Some(max_idle_seconds))
            .await
    }

    async fn suspend_unless(
        &self,
        id: &str,
        reason: &str,
        if_idle_for: Option<u64>,
    ) -> ApiResult<MicrovmRow> {
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        let row = self.row(id)?;
        let state = row.state;
        if state != MicrovmState::Running {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {state}; only a RUNNING microVM can be suspended"
            )));
        }
        if let Some(max_idle) = if_idle_for {
            let idle_ms = now_ms() - row.last_activity_at;
            if self.open_requests(id) > 0 || idle_ms < (max_idle as i64) * 1000 {
                info!(id, "no longer idle: the idle suspend is dropped");
                return Ok(row);
            }
        }
        self.publish(id, None);
        let config = Self::config_of(&row)?;
        let vm = slot
            .vm
            .take()
            .ok_or_else(|| ApiError::internal("running microVM has no process"))?;
        let mut note = reason.to_string();
        if config.hooks_enabled {
            if let Err(why) = self
                .hook(&vm, config.hook_port, "/suspend", Vec::new())
                .await
            {
                note = format!("{reason}; suspend hook failed: {why}");
            }
        }
        fault::point("suspend.hooked");
        self.sample(id, &mut slot, Some(&vm));
        match vm.suspend().await {
            Ok(suspended) => {
                fault::point("suspend.saved");
                self.forget_runtime(id);
                slot.suspended = Some(suspended);
                self.set_state(id, MicrovmState::Suspended, Some(&note));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.microvm_dir(id));
                self.set_state(
                    id,
                    MicrovmState::Terminated,
                    Some(&format!("suspend failed: {e}")),
                );
            }
        }
        self.row(id)
    }

    pub async fn resume(&self, id: &str, reason: &str) -> ApiResult<MicrovmRow> {
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        let row = self.row(id)?;
        let state = row.state;
        if state != MicrovmState::Suspended {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {state}; only a SUSPENDED microVM can be resumed"
            )));
        }
        if let Some(why) = self.not_resumable(id) {
            return Err(ApiError::conflict(not_resumable_message(id, &why)));
        }
        let config = Self::config_of(&row)?;
        self.sample(id, &mut slot, None);
        let suspended = slot
            .suspended
            .take()
            .ok_or_else(|| ApiError::internal("suspended microVM has no state"))?;
        self.set_state(id, MicrovmState::Resuming, Some(reason));
        // The record is durable before the guest runs again; the snapshot goes once it runs.
        let before_run: kiln_vmm::BeforeRun = Box::new(|record| {
            self.keep_record(id, record);
            fault::point("resume.before-run");
        });
        match suspended
            .resume_with(Duration::from_secs(60), Some(before_run))
            .await
        {
            Ok(vm) => {
                vm.forget_suspended_state();
                fault::point("resume.started");
                if let Err(e) = apply_no_network(&config, &vm).await {
                    warn!(id, "taking the NIC away again after resume failed: {e}");
                }
                if config.hooks_enabled {
                    if let Err(why) = self
                        .hook(&vm, config.hook_port, "/resume", Vec::new())
                        .await
                    {
                        warn!(id, "resume hook failed: {why}");
                    }
                }
                let agent = vm.agent().clone();
                slot.vm = Some(vm);
                slot.last_sample_ms = now_ms();
                self.record_activity(id);
                self.publish(id, Some(agent));
                self.set_state(id, MicrovmState::Running, Some(reason));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.microvm_dir(id));
                self.set_state(
                    id,
                    MicrovmState::Terminated,
                    Some(&format!("resume failed: {e}")),
                );
            }
        }
        self.row(id)
    }

    /// A standalone copy of a SUSPENDED microVM's disk (overlay and backing chain in one
    /// qcow2), already unlinked: it is gone once the caller drops the file.
    pub async fn export_disk(&self, id: &str) -> ApiResult<(tokio::fs::File, u64)> {
        let slot = self.slot(id);
        let _slot = slot.lock().await;
        let row = self.row(id)?;
        let state = row.state;
        if state != MicrovmState::Suspended {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {state}: its disk can be downloaded while it is SUSPENDED \
                 (suspend it first)"
            )));
        }
        let dir = self.microvm_dir(id);
        let out = dir.join(format!("export-{}.qcow2", now_ms()));
        kiln_vmm::disk::flatten(&dir.join("disk.qcow2"), &out)
            .await
            .map_err(|e| ApiError::internal(error_chain(&e)))?;
        let opened = tokio::fs::File::open(&out).await;
        let _ = std::fs::remove_file(&out);
        let file = opened.map_err(ApiError::internal)?;
        let bytes = file.metadata().await.map_err(ApiError::internal)?.len();
        Ok((file, bytes))
    }

    pub async fn terminate(&self, id: &str, reason: &str) -> ApiResult<MicrovmRow> {
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        let row = self.row(id)?;
        let state = row.state;
        if state == MicrovmState::Terminated {
            return Err(ApiError::conflict(format!(
                "microVM {id} is already TERMINATED"
            )));
        }
        let config = Self::config_of(&row)?;
        self.publish(id, None);
        if let Some(vm) = slot.vm.take() {
            if config.hooks_enabled {
                if let Err(why) = self
                    .hook(&vm, config.hook_port, "/terminate", Vec::new())
                    .await
                {
                    warn!(id, "terminate hook failed: {why}");
                }
            }
            self.sample(id, &mut slot, Some(&vm));
            let _ = vm.destroy().await;
            fault::point("terminate.killed");
        }
        if let Some(s) = slot.suspended.take() {
            let _ = s.discard();
        }
        self.finish_termination(id, slot, reason);
        self.row(id)
    }

    /// The end of every termination: the microVM's files, its state, tokens, egress state
    /// and slot.
    fn finish_termination(&self, id: &str, slot: tokio::sync::MutexGuard<'_, Slot>, reason: &str) {
        let _ = std::fs::remove_dir_all(self.microvm_dir(id));
        let _ = std::fs::remove_file(self.net_control(id));
        self.set_state(id, MicrovmState::Terminated, Some(reason));
        self.tokens.revoke_microvm(id);
        self.egress.forget(id);
        drop(slot);
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// A RUNNING microVM whose QEMU ended on its own (a crash; the OOM killer at its jail's
    /// memory limit) becomes TERMINATED with how QEMU ended and its console tail; its files,
    /// tokens and egress state go. Returns whether it had ended.
    pub async fn reap_if_crashed(&self, id: &str) -> bool {
        let slot = self.slot(id);
        let Ok(mut slot) = slot.try_lock() else {
            return false;
        };
        let Some(report) = slot.vm.as_ref().and_then(|vm| vm.crash()) else {
            return false;
        };
        warn!(id, "QEMU ended on its own: {report}");
        self.publish(id, None);
        if let Some(vm) = slot.vm.take() {
            self.sample(id, &mut slot, Some(&vm));
            let _ = vm.destroy().await;
        }
        self.finish_termination(id, slot, &report.to_string());
        true
    }

    /// The agent of a RUNNING microVM; `what` names the request in the conflict message.
    /// Never waits: during a transition the answer is a 409 at once.
    pub fn running_agent(&self, id: &str, what: &str) -> ApiResult<kiln_vmm::AgentClient> {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(agent) = agents.get(id) {
            return Ok(agent.clone());
        }
        drop(agents);
        let state = self.row(id)?.state;
        let busy = if state == MicrovmState::Running {
            " and being suspended or terminated"
        } else {
            ""
        };
        Err(ApiError::conflict(format!(
            "microVM {id} is {state}{busy}; {what} needs RUNNING (wait with GET \
             /v1/microvms/{id}?waitFor=RUNNING, or resume it)"
        )))
    }

    /// The tail of the app's stdout and stderr, as the guest agent keeps it. Reading logs is
    /// not activity: it does not keep a microVM from idling.
    pub async fn app_logs(&self, id: &str, max_bytes: u32) -> ApiResult<Vec<u8>> {
        let agent = self.running_agent(id, "reading logs")?;
        agent
            .app_logs(max_bytes)
            .await
            .map_err(|e| ApiError::new(kiln_api::ErrorCode::LogsFailed, error_chain(&e)))
    }

    /// Runs a command in a RUNNING microVM (an exec session counts as activity).
    pub async fn exec(
        &self,
        id: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> ApiResult<kiln_vmm::ExecOutput> {
        if argv.is_empty() {
            return Err(ApiError::bad_request("command must name a program"));
        }
        let agent = self.running_agent(id, "exec")?;
        self.record_activity(id);
        let req = kiln_proto::ExecRequest {
            process: kiln_proto::ProcessSpec {
                argv,
                ..Default::default()
            },
            stdin: false,
            timeout_ms: Some(timeout.as_millis() as u64),
        };
        let out = exec_outcome(agent.exec(req, None, 8 << 20).await);
        self.record_activity(id);
        out
    }

    /// Adds the time since the last sample to the microVM's usage.
    pub fn sample(&self, id: &str, slot: &mut Slot, running: Option<&Vm>) {
        let now = now_ms();
        let elapsed = (now - slot.last_sample_ms.max(0)).max(0) as f64 / 1000.0;
        slot.last_sample_ms = now;
        let Ok(Some(row)) = self.store().microvm(id) else {
            return;
        };
        let mut usage: Usage = serde_json::from_value(row.usage.clone()).unwrap_or_default();
        let config = Self::config_of(&row);
        let vcpus = config.as_ref().map(|c| c.vcpus).unwrap_or(1) as f64;
        let vm = running.or(slot.vm.as_ref());
        if let Some(vm) = vm {
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
                                tracing::warn!(id, "setting the CPU quota: {e}");
                            }
                        }
                    }
                    usage.cpu_baseline = credit.baseline;
                    usage.cpu_credit_seconds = credit.credit;
                }
                _ => {
                    if let Some(cpu) = process_cpu_seconds(vm.qemu_pid()) {
                        usage.cpu_seconds = cpu.max(usage.cpu_seconds);
                    }
                    usage.cpu_seconds_above_baseline =
                        (usage.cpu_seconds - usage.running_seconds * vcpus).max(0.0);
                }
            }
        } else if let Some(s) = &slot.suspended {
            usage.suspended_snapshot_byte_seconds += s.state_bytes() as f64 * elapsed;
        }
        if let Some(network) = self.egress.counters(id) {
            usage.network = network;
        }
        if let Ok(v) = serde_json::to_value(&usage) {
            let _ = self.store().set_usage(id, &v);
        }
    }
}

/// An exec as the API answers it. A command that cannot start is answered as a shell would:
/// exit code 127 (no such program) or 126 (not executable), the reason on stderr. A request
/// the agent refuses is the caller's to fix (400); anything else is the agent's failure (502).
fn exec_outcome(
    out: Result<kiln_vmm::ExecOutput, kiln_vmm::AgentError>,
) -> ApiResult<kiln_vmm::ExecOutput> {
    use kiln_proto::ErrorKind::{InvalidRequest, NotFound, PermissionDenied};
    let e = match out {
        Ok(out) => return Ok(out),
        Err(e) => e,
    };
    let kiln_vmm::AgentError::Guest(g) = &e else {
        return Err(ApiError::new(
            kiln_api::ErrorCode::ExecFailed,
            error_chain(&e),
        ));
    };
    let code = match g.kind {
        NotFound => 127,
        PermissionDenied => 126,
        InvalidRequest => {
            return Err(ApiError::bad_request(format!(
                "the guest refused the command: {}",
                g.message
            )))
        }
        _ => {
            return Err(ApiError::new(
                kiln_api::ErrorCode::ExecFailed,
                error_chain(&e),
            ))
        }
    };
    Ok(kiln_vmm::ExecOutput {
        stdout: Vec::new(),
        stderr: format!("kiln: {}\n", g.message).into_bytes(),
        status: kiln_proto::ExitStatus {
            code: Some(code),
            ..Default::default()
        },
    })
}

/// The `none` connector takes the NIC away; needed after every launch and resume.
async fn apply_no_network(config: &MicrovmConfig, vm: &Vm) -> Result<(), kiln_vmm::VmError> {
    if config.connectors.contains(&Connector::None) {
        vm.detach_nic().await?;
    }
    Ok(())
}

/// User + system CPU time of a process, from /proc.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some((utime + stime) / hz)
}

/// What a client is told when it asks to resume a microVM this host cannot restore.
pub fn not_resumable_message(id: &str, why: &str) -> String {
    format!(
        "microVM {id} cannot be resumed on this host: {why}. It stays SUSPENDED with its \
         files: download its disk with `kiln disk {id}` (GET /v1/microvms/{id}/disk), \
         then terminate it"
    )
}

pub use kiln_vmm::error_chain;
