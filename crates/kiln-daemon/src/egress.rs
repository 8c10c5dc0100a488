//! Egress for microVMs and builds: compiles connectors against the operator's configuration
//! (`--host-service`, `--egress-host`), keeps each microVM's network counters across
//! suspend/resume, and turns denials into `egress` events — rate-limited, since a hostile
//! guest can be denied thousands of times a second (the counters always count).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use kiln_store::now_ms;
use kiln_vmm::kiln_net::{
    Connector, CounterSnapshot, Denial, EgressPolicy, HostFacts, NetCounters, OperatorConfig,
};
use kiln_vmm::NetworkAttachment;
use tracing::{info, warn};

use crate::error::ApiError;
use crate::manager::Manager;

/// At most this many denial events per microVM per window.
const DENIAL_EVENTS_PER_WINDOW: u32 = 20;
const DENIAL_WINDOW_MS: i64 = 60_000;

pub struct Egress {
    operator: OperatorConfig,
    host: HostFacts,
    counters: Mutex<HashMap<String, Arc<NetCounters>>>,
    limiter: Mutex<HashMap<String, (i64, u32)>>,
}

/// What microVMs and builds get when they name no connector (as the seed's service does).
pub fn default_connectors() -> Vec<Connector> {
    vec![Connector::Internet]
}

impl Egress {
    pub fn new(operator: OperatorConfig) -> Egress {
        Egress {
            operator,
            host: HostFacts::read(),
            counters: Mutex::new(HashMap::new()),
            limiter: Mutex::new(HashMap::new()),
        }
    }

    /// Checks connectors from a request; the error says what to fix.
    pub fn compile(&self, connectors: &[Connector]) -> Result<EgressPolicy, ApiError> {
        EgressPolicy::compile(connectors, &self.operator, self.host.clone())
            .map_err(|e| ApiError::bad_request(format!("connectors: {e}")))
    }

    /// The network of microVM `id`: its policy, its (lasting) counters, denials as events,
    /// and its backend's reports served at `control` (so a restarted kilnd reads them again).
    pub fn attachment(
        &self,
        manager: Weak<Manager>,
        id: &str,
        policy: EgressPolicy,
        earlier: CounterSnapshot,
        control: std::path::PathBuf,
    ) -> NetworkAttachment {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(NetCounters::from_snapshot(earlier)))
            .clone();
        let id = id.to_string();
        NetworkAttachment::Egress {
            policy: Arc::new(policy),
            counters,
            denials: Arc::new(move |denial: Denial| {
                if let Some(m) = manager.upgrade() {
                    m.egress.record_denial(&m, &id, &denial);
                }
            }),
            control: Some(control),
        }
    }

    fn record_denial(&self, manager: &Manager, id: &str, denial: &Denial) {
        let now = now_ms();
        let allowed = {
            let mut limiter = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
            let (start, count) = limiter.entry(id.to_string()).or_insert((now, 0));
            if now - *start > DENIAL_WINDOW_MS {
                (*start, *count) = (now, 0);
            }
            *count += 1;
            *count <= DENIAL_EVENTS_PER_WINDOW
        };
        if !allowed {
            return;
        }
        info!(id, "egress {denial}");
        if let Err(e) = manager.write(|s| s.record_event(id, "egress", &denial.to_string())) {
            warn!(id, "recording a denial failed: {e}");
        }
    }

    /// Current counters of a microVM, if it has run since kilnd started.
    pub fn counters(&self, id: &str) -> Option<CounterSnapshot> {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|c| c.snapshot())
    }

    /// Drops what is kept for a terminated microVM.
    pub fn forget(&self, id: &str) {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}
