//! What a node knows of its RUNNING microVMs only in memory (the newest metrics sample and
//! the live egress counters), shared through the store at each heartbeat, so that a list
//! served by another node shows them too (at most a heartbeat old). A call about one
//! microVM is forwarded to its owner and needs none of this.

use std::collections::{HashMap, HashSet};

use kiln_api::{MicrovmMetrics, NetworkCounters};
use kiln_store::{now_ms, MicrovmRow};
use kiln_types::MicrovmState;
use serde::{Deserialize, Serialize};

use crate::manager::Manager;

const PREFIX: &str = "node-live/";

/// One node's record.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Live {
    pub at_ms: i64,
    pub microvms: HashMap<String, LiveVm>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveVm {
    pub metrics: Option<MicrovmMetrics>,
    pub network: Option<NetworkCounters>,
}

fn key(node: &str) -> String {
    format!("{PREFIX}{node}")
}

/// Writes this node's record (blocking: the store). Only in a cluster.
pub fn publish(m: &Manager) -> kiln_store::Result<()> {
    if !crate::cluster::is_shared(m) {
        return Ok(());
    }
    let rows = crate::cluster::own_microvms(m, Some(MicrovmState::Running))?;
    let live = Live {
        at_ms: now_ms(),
        microvms: rows
            .into_iter()
            .map(|r| {
                let vm = LiveVm {
                    metrics: m.metrics.latest(&r.id),
                    network: m.egress.counters(&r.id),
                };
                (r.id, vm)
            })
            .collect(),
    };
    let text = serde_json::to_string(&live)?;
    m.store().set_shared_value(&key(&m.cfg.node_name), &text)
}

/// Forgets a node's record (it left the cluster).
pub fn forget_in(store: &kiln_store::Store, node: &str) -> kiln_store::Result<()> {
    store.delete_shared_value(&key(node))
}

/// The records of the other nodes that own some of `rows`, by microVM id.
pub fn of_others(m: &Manager, rows: &[MicrovmRow]) -> HashMap<String, LiveVm> {
    let mut out = HashMap::new();
    if !crate::cluster::is_shared(m) {
        return out;
    }
    let owners: HashSet<&str> = rows
        .iter()
        .filter(|r| r.state == MicrovmState::Running && !crate::cluster::is_mine(m, r))
        .map(|r| r.node.as_str())
        .collect();
    for node in owners {
        let text = m.store().shared_value(&key(node)).ok().flatten();
        if let Some(live) = text.and_then(|t| serde_json::from_str::<Live>(&t).ok()) {
            out.extend(live.microvms);
        }
    }
    out
}
