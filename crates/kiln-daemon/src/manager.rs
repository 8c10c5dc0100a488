//! The microVM manager: what kilnd knows of every microVM (the store, the published agents,
//! activity, quotas) and the door to each microVM's actor ([`crate::actor`]), which owns its
//! processes and serialises its transitions; every transition is written to the store with
//! its reason.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_image::build::hook_get;
use kiln_image::Builder;
use kiln_proto::HttpRequest;
use kiln_store::{now_ms, MicrovmRow, Store};
use kiln_types::{Accel, MicrovmState};
use kiln_vmm::kiln_net::{Connector, CounterSnapshot};
use kiln_vmm::{GuestAssets, NetworkAttachment, Vm};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tracing::{info, warn};

pub use crate::actor::Slot;
use crate::actor::{Command, Handle, Reply};
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

pub struct Manager {
    pub cfg: Config,
    pub store: Mutex<Store>,
    pub builder: Builder,
    pub assets: GuestAssets,
    pub accel: Accel,
    /// Every microVM's jail (or `--no-jail`).
    pub confinement: kiln_vmm::Confinement,
    /// The actor of every microVM that is not TERMINATED.
    pub actors: Mutex<HashMap<String, Handle>>,
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
    /// When each microVM last had activity (Unix ms), counted here and written to the store
    /// by [`Manager::flush_activity`] every tick: a proxied request costs no database write.
    pub activity: Mutex<HashMap<String, i64>>,
    /// Bytes KILN_HOME holds on disk (allocated blocks), measured at start and every few
    /// seconds after by [`Manager::measure_disk_use`]: what `--max-disk-mib` is checked
    /// against.
    pub disk_used: std::sync::atomic::AtomicU64,
    /// The agent of each RUNNING microVM that no transition holds: exec, logs and the
    /// ingress read it here, so they never wait behind a launch, suspend or resume.
    pub agents: Mutex<HashMap<String, kiln_vmm::AgentClient>>,
    /// QEMUs started ahead of launches of hot images.
    pub pool: crate::pool::Pool,
    /// Recent metrics of every RUNNING microVM.
    pub metrics: crate::metrics::MetricsLog,
    /// Webhook workers and delivery logs.
    pub webhooks: crate::webhooks::Webhooks,
    /// Open file watches per microVM.
    pub watches: crate::files::Watches,
    /// Open process output streams per microVM.
    pub output_streams: crate::files::Watches,
    /// The newest event's sequence number, changed as events are recorded.
    pub events: tokio::sync::watch::Receiver<i64>,
    /// Open StreamEvents streams (at most MAX_EVENT_STREAMS).
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// The web console's signed-in browsers.
    pub console: Arc<kiln_console::Sessions>,
    /// The API key, which every node of a cluster accepts: node-to-node calls carry it.
    pub key: Arc<String>,
    /// This node left the cluster at a clean stop (drained): no more heartbeats.
    pub left_cluster: std::sync::atomic::AtomicBool,
    /// TLS for calls to other nodes (`--cluster-ca-file`; `None`: plain HTTP).
    pub node_tls: Option<tokio_rustls::TlsConnector>,
    /// Object storage, when images travel between nodes (`--object-store`).
    pub blobs: Option<Arc<kiln_objects::Blobs>>,
    /// Retries of image uploads that failed (`share::publish_missing`).
    pub publish_backoff: Mutex<crate::share::PublishBackoff>,
    /// What garbage collection of object storage removed (`crate::gc`).
    pub gc: crate::gc::GcCounters,
    /// Held while an image from another node is assembled here (one at a time).
    pub imports: tokio::sync::Mutex<()>,
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
        match &self.confinement {
            kiln_vmm::Confinement::Jailed(limits) => {
                kiln_vmm::Confinement::Jailed(kiln_vmm::JailLimits {
                    cpus: Some(Self::baseline_of(config) * crate::cpu::BURST_FACTOR),
                    ..limits.clone()
                })
            }
            kiln_vmm::Confinement::Unjailed => kiln_vmm::Confinement::Unjailed,
        }
    }

    /// The store, for reads (WAL: no fsync, microseconds). Writes go through
    /// [`Manager::write`].
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A store write (a transaction, an fsync) off the async workers: on tokio's
    /// multi-threaded runtime the worker hands its other tasks to another thread for the
    /// write's duration, so no request waits behind an fsync it did not ask for.
    pub fn write<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_worker {
            tokio::task::block_in_place(|| f(&self.store()))
        } else {
            f(&self.store())
        }
    }

    /// The memory microVMs of this node may take (`--capacity-memory-mib`; no cap without).
    pub fn memory_cap(&self) -> Option<i64> {
        self.cfg.capacity.memory_mib.map(|m| m as i64)
    }

    pub fn microvm_dir(&self, id: &str) -> PathBuf {
        self.cfg.home.join("microvms").join(id)
    }

    /// Where disk overlays are made ahead of launches (`kiln_vmm::spare`).
    pub fn spare_overlays_dir(&self) -> PathBuf {
        self.cfg.home.join("overlays-ahead")
    }

    /// The microVM's endpoint in the style chosen at start (see [`crate::endpoint`]).
    pub fn endpoint(&self, id: &str) -> String {
        crate::endpoint::endpoint(
            self.cfg.endpoint_style,
            id,
            &self.cfg.ingress_domain,
            self.cfg.ingress_port,
            self.cfg.ingress_listen,
        )
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

    /// Free bytes on KILN_HOME's disk (None when it cannot be read: then nothing is refused
    /// for it).
    pub fn free_disk_bytes(&self) -> Option<u64> {
        let fs = nix::sys::statvfs::statvfs(&self.cfg.home).ok()?;
        Some(fs.blocks_available().saturating_mul(fs.fragment_size()))
    }

    /// Measures what KILN_HOME holds on disk (allocated blocks, symlinks not followed).
    pub fn measure_disk_use(&self) {
        let used = allocated_bytes(&self.cfg.home);
        self.disk_used
            .store(used, std::sync::atomic::Ordering::Relaxed);
    }

    /// Refuses (429) what would take KILN_HOME's disk below `--min-free-disk-mib`, or kiln's
    /// own use over `--max-disk-mib`, once `needs` more bytes are written; `what` says what
    /// was refused.
    pub fn check_disk(&self, what: &str, needs: u64) -> ApiResult<()> {
        if let Some(max) = self.cfg.max_disk_bytes {
            let used = self.disk_used.load(std::sync::atomic::Ordering::Relaxed);
            if used.saturating_add(needs) > max {
                return Err(ApiError::quota(format!(
                    "{what}: KILN_HOME ({}) holds {} MiB{} and kilnd --max-disk-mib is {}: \
                     free space (terminate microVMs, delete images), or raise the limit",
                    self.cfg.home.display(),
                    used >> 20,
                    if needs > 0 {
                        format!(" and this needs {} MiB more", needs >> 20)
                    } else {
                        String::new()
                    },
                    max >> 20
                )));
            }
        }
        let Some(free) = self.free_disk_bytes() else {
            return Ok(());
        };
        let floor = self.cfg.min_free_disk_bytes;
        if free >= floor.saturating_add(needs) {
            return Ok(());
        }
        Err(ApiError::quota(format!(
            "{what}: {} MiB are free on the disk of {} and kilnd keeps {} MiB free{}: free \
             space (terminate microVMs, delete images), or lower kilnd --min-free-disk-mib",
            free >> 20,
            self.cfg.home.display(),
            floor >> 20,
            if needs > 0 {
                format!(" beyond the {} MiB this needs", needs >> 20)
            } else {
                String::new()
            }
        )))
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

    /// The one place activity is recorded (proxied requests, open streams, exec sessions):
    /// in memory, flushed to the store every tick.
    pub fn record_activity(&self, id: &str) {
        let mut activity = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        let at = activity.entry(id.to_string()).or_default();
        *at = (*at).max(now_ms());
    }

    /// A microVM's last activity: the newer of the store's and what is not flushed yet.
    pub fn last_activity(&self, id: &str, stored: i64) -> i64 {
        let activity = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        activity.get(id).map_or(stored, |&at| at.max(stored))
    }

    /// Writes the activity counted since the last flush, in one transaction.
    pub fn flush_activity(&self) {
        let pending: Vec<(String, i64)> = self
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        if pending.is_empty() {
            return;
        }
        if let Err(e) = self.write(|s| s.touch_many(&pending)) {
            warn!("recording activity failed: {e}");
            // Kept for the next flush rather than lost.
            let mut activity = self.activity.lock().unwrap_or_else(|p| p.into_inner());
            for (id, at) in pending {
                let kept = activity.entry(id).or_default();
                *kept = (*kept).max(at);
            }
        }
    }

    /// Why this SUSPENDED microVM cannot be resumed on this host, if it cannot.
    pub fn not_resumable(&self, id: &str) -> Option<String> {
        let map = self.not_resumable.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).cloned()
    }

    /// A microVM's row, with its unflushed activity.
    pub fn row(&self, id: &str) -> ApiResult<MicrovmRow> {
        let mut row = self
            .store()
            .microvm(id)?
            .ok_or_else(|| ApiError::not_found("microVM", id))?;
        row.last_activity_at = self.last_activity(id, row.last_activity_at);
        Ok(row)
    }

    pub(crate) fn actors_mut(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.actors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `command` to microVM `id`'s actor; false when it has none (TERMINATED).
    pub fn tell(&self, id: &str, command: Command) -> bool {
        let tx = self.actors_mut().get(id).map(|h| h.tx.clone());
        match tx {
            // Fire-and-forget commands never wait: a full queue drops them (the next tick
            // or idle pass sends them again).
            Some(tx) => tx.try_send(command).is_ok(),
            None => false,
        }
    }

    /// Sends a command that answers and waits for the answer. A microVM without an actor
    /// is TERMINATED (or unknown): the answer says so.
    pub(crate) async fn ask<T>(
        &self,
        id: &str,
        what: &str,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> ApiResult<T> {
        let tx = self.actors_mut().get(id).map(|h| h.tx.clone());
        let gone = || match self.row(id) {
            Ok(row) => ApiError::conflict(format!("microVM {id} is {}; {what}", row.state)),
            Err(e) => e,
        };
        let Some(tx) = tx else {
            return Err(gone());
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        if tx.send(command(reply)).await.is_err() {
            return Err(gone());
        }
        answer.await.unwrap_or_else(|_| Err(gone()))
    }

    pub async fn suspend(&self, id: &str, reason: &str) -> ApiResult<MicrovmRow> {
        self.ask(id, "only a RUNNING microVM can be suspended", |reply| {
            Command::Suspend {
                reason: reason.to_string(),
                if_idle_for: None,
                reply: Some(reply),
            }
        })
        .await
    }

    pub async fn resume(&self, id: &str, reason: &str) -> ApiResult<MicrovmRow> {
        self.ask(id, "only a SUSPENDED microVM can be resumed", |reply| {
            Command::Resume {
                reason: reason.to_string(),
                reply: Some(reply),
            }
        })
        .await
    }

    pub async fn terminate(&self, id: &str, reason: &str) -> ApiResult<MicrovmRow> {
        self.ask(id, "it is already TERMINATED", |reply| Command::Terminate {
            reason: reason.to_string(),
            reply: Some(reply),
        })
        .await
    }

    /// A standalone copy of a SUSPENDED microVM's disk, already unlinked.
    pub async fn export_disk(&self, id: &str) -> ApiResult<(tokio::fs::File, u64)> {
        self.ask(
            id,
            "its disk can be downloaded while it is SUSPENDED",
            |reply| Command::ExportDisk { reply },
        )
        .await
    }

    pub(crate) fn set_state(&self, id: &str, to: MicrovmState, reason: Option<&str>) {
        if to == MicrovmState::Terminated {
            self.forget_runtime(id);
        }
        if let Err(e) = self.write(|s| s.set_state(id, to, reason)) {
            warn!(id, "recording state {to} failed: {e}");
            return;
        }
        info!(id, state = %to, reason = reason.unwrap_or(""), "microVM state");
        if let Some(h) = self.actors_mut().get(id) {
            h.state.send_replace(to);
        }
    }

    /// The state of microVM `id` as its actor publishes it (None: it has no actor, so it is
    /// TERMINATED or unknown).
    pub fn watch_state(&self, id: &str) -> Option<tokio::sync::watch::Receiver<MicrovmState>> {
        self.actors_mut().get(id).map(|h| h.state.subscribe())
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
    /// when `timeout` has passed: woken by its actor's state changes, never polling.
    pub async fn wait_for(
        &self,
        id: &str,
        target: MicrovmState,
        timeout: Duration,
    ) -> ApiResult<MicrovmRow> {
        // Subscribed before the first look, so no change between the two is missed.
        let Some(mut state) = self.watch_state(id) else {
            return self.row(id);
        };
        let reached = |s: &MicrovmState| *s == target || *s == MicrovmState::Terminated;
        let _ = tokio::time::timeout(timeout, state.wait_for(reached)).await;
        self.row(id)
    }

    /// RunMicrovm: records PENDING and launches in the background. `template`: where the
    /// image's template is on this node when it was built on another (from object storage).
    pub fn run(
        self: &Arc<Self>,
        req: kiln_api::RunMicrovmRequest,
        template: Option<PathBuf>,
    ) -> ApiResult<MicrovmRow> {
        let image = req.image_identifier.as_str();
        let idle = req.idle_policy.unwrap_or_default();
        let (payload, max_duration) = (req.run_hook_payload, req.max_duration_seconds);
        let connectors = req.connectors.unwrap_or_else(default_connectors);
        let labels = req.labels.unwrap_or_default();
        kiln_types::labels::check(&labels).map_err(|e| ApiError::bad_request(e.to_string()))?;
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
        let template: PathBuf = match template {
            Some(t) => t,
            None => img.record["template"]
                .as_str()
                .map(PathBuf::from)
                .ok_or_else(|| ApiError::internal("image has no template"))?,
        };
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
        self.check_disk("no new microVM", 0)?;
        let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        let live = crate::cluster::own_live_count(self)?;
        if live >= self.cfg.max_microvms {
            return Err(ApiError::quota(format!(
                "{live} microVMs are not TERMINATED and the limit is {}: terminate one, or raise \
                 kilnd --max-microvms",
                self.cfg.max_microvms
            )));
        }
        // A QEMU started ahead for this image and jail gives the microVM its id.
        let prestarted = self
            .pool
            .take(self, &config.template, &self.confinement_of(&config));
        let now = now_ms();
        let row = MicrovmRow {
            id: prestarted
                .as_ref()
                .map(|p| p.id().to_string())
                .unwrap_or_else(new_microvm_id),
            image_id: img.id.clone(),
            image_name: img.name.clone(),
            state: MicrovmState::Pending,
            state_reason: None,
            created_at: now,
            state_changed_at: now,
            last_activity_at: now,
            config: serde_json::to_value(&config).map_err(ApiError::internal)?,
            usage: serde_json::to_value(Usage::default()).map_err(ApiError::internal)?,
            labels,
            node: self.cfg.node_name.clone(),
            memory_mib: img.record["memory_mib"].as_i64().unwrap_or(512),
        };
        let network = self.network_of(&row.id, &config, CounterSnapshot::default())?;
        self.write(|s| s.claim_and_insert(std::slice::from_ref(&row), self.memory_cap()))?;
        crate::actor::spawn(self, &row.id, MicrovmState::Pending, Slot::default());
        self.tell(
            &row.id,
            Command::Launch {
                config: Box::new(config),
                payload,
                network,
                prestarted: prestarted.map(Box::new),
            },
        );
        Ok(row)
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
            .and_then(|r| self.write(|s| s.set_runtime(id, Some(&r))));
        if let Err(e) = kept {
            warn!(id, "keeping the microVM's runtime record failed: {e}");
        }
    }

    /// Forgets the runtime record once no process of the microVM runs.
    pub fn forget_runtime(&self, id: &str) {
        if let Err(e) = self.write(|s| s.set_runtime(id, None)) {
            warn!(id, "forgetting the microVM's runtime record failed: {e}");
        }
    }

    /// POSTs to a lifecycle hook; Err carries a one-line reason.
    pub async fn hook(&self, vm: &Vm, port: u16, path: &str, body: Vec<u8>) -> Result<(), String> {
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

/// Bytes allocated under `dir`, counted once per file (hard links) and without following
/// symlinks; what cannot be read counts nothing.
fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if seen.insert((meta.dev(), meta.ino())) {
                total = total.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    total
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
