//! Draining a node (DrainNode). The mark is in the store; the drained node, at each
//! heartbeat, suspends its RUNNING microVMs and hands each SUSPENDED one whose snapshot is
//! in object storage to the reachable, undrained node with the most free memory: one
//! transaction moves its ownership (fenced by owner and epoch, its memory claimed there).
//! The receiving node assembles it at its next heartbeat or request ([`crate::travel`]).
//! Meanwhile RunMicrovm through the drained node places new microVMs elsewhere.

use std::collections::HashSet;
use std::sync::Arc;

use kiln_store::{now_ms, MicrovmRow, NodeRow};
use kiln_types::MicrovmState;
use tracing::{info, warn};

use crate::error::ApiResult;
use crate::manager::Manager;

const PREFIX: &str = "node-draining/";

/// The nodes marked draining.
pub fn draining_nodes(m: &Manager) -> ApiResult<HashSet<String>> {
    let mut out = HashSet::new();
    // Bound first: the store's guard must not live across the loop's own reads.
    let nodes = m.store().nodes()?;
    for node in nodes {
        if m.store()
            .shared_value(&format!("{PREFIX}{}", node.name))?
            .is_some()
        {
            out.insert(node.name);
        }
    }
    Ok(out)
}

pub fn is_draining(m: &Manager, node: &str) -> bool {
    crate::cluster::is_shared(m)
        && m.store()
            .shared_value(&format!("{PREFIX}{node}"))
            .ok()
            .flatten()
            .is_some()
}

/// Removes `node` from the cluster's store: its row, its draining mark and the records of
/// the images it cached (its TERMINATED microVMs stay, as records).
pub fn forget_node(m: &Manager, node: &str) -> ApiResult<()> {
    m.write(|s| s.remove_node(node))?;
    m.write(|s| s.delete_shared_value(&format!("{PREFIX}{node}")))?;
    crate::placement::forget_node(m, node)?;
    m.write(|s| crate::live::forget_in(s, node))?;
    Ok(())
}

/// At a clean stop: a drained node that holds no microVM (all handed off or TERMINATED)
/// leaves the cluster, and its heartbeat stops for good.
pub fn leave_if_drained(m: &Manager) {
    let me = m.cfg.node_name.as_str();
    if !crate::cluster::is_shared(m) || !is_draining(m, me) {
        return;
    }
    match crate::cluster::own_live_count(m) {
        Ok(0) => {}
        Ok(n) => {
            info!(node = me, "stopping while draining, but {n} microVMs are still this node's: it stays registered");
            return;
        }
        Err(e) => {
            warn!(node = me, "could not count this node's microVMs: {e}");
            return;
        }
    }
    m.left_cluster
        .store(true, std::sync::atomic::Ordering::SeqCst);
    match forget_node(m, me) {
        Ok(()) => info!(node = me, "drained and stopped: this node left the cluster"),
        Err(e) => warn!(node = me, "leaving the cluster failed: {}", e.message),
    }
}

pub fn set(m: &Manager, node: &str, on: bool) -> ApiResult<()> {
    let key = format!("{PREFIX}{node}");
    if on {
        m.write(|s| s.set_shared_value(&key, &now_ms().to_string()))?;
        info!(node, "node draining");
    } else {
        m.write(|s| s.delete_shared_value(&key))?;
        info!(node, "node no longer draining");
    }
    Ok(())
}

/// The reachable, undrained node other than this one with the most memory free for a
/// microVM of `need_mib`, and its capacity.
pub fn pick_node(m: &Manager, need_mib: i64) -> ApiResult<Option<(NodeRow, i64)>> {
    let draining = draining_nodes(m)?;
    let used = crate::placement::used_by_node(m)?;
    let now = now_ms();
    let mut best: Option<(NodeRow, i64, i64)> = None;
    let nodes = m.store().nodes()?;
    for n in nodes {
        if n.name == m.cfg.node_name
            || draining.contains(&n.name)
            || !crate::cluster::reachable(m, &n, now)
        {
            continue;
        }
        let (capacity, free) = crate::placement::memory(&n, &used);
        if free >= need_mib && best.as_ref().is_none_or(|(_, _, f)| free > *f) {
            best = Some((n, capacity, free));
        }
    }
    Ok(best.map(|(n, capacity, _)| (n, capacity)))
}

/// One drain step of this node, if it is draining.
pub async fn tick(m: &Arc<Manager>) {
    if m.blobs.is_none() || !is_draining(m, &m.cfg.node_name) {
        return;
    }
    let Ok(rows) = crate::cluster::own_microvms(m, None) else {
        return;
    };
    for row in rows {
        match row.state {
            MicrovmState::Running => {
                if let Err(e) = m.suspend(&row.id, "its node is draining").await {
                    warn!(
                        id = row.id,
                        "suspending for the drain failed: {}", e.message
                    );
                }
            }
            MicrovmState::Suspended => hand_off(m, &row),
            _ => {}
        }
    }
}

/// Moves a SUSPENDED microVM with an uploaded snapshot to another node.
fn hand_off(m: &Arc<Manager>, row: &MicrovmRow) {
    let id = row.id.as_str();
    if !crate::travel::has_snapshot(m, row) {
        return;
    }
    let Ok(Some((node, epoch))) = m.store().ownership(id) else {
        return;
    };
    let target = match pick_node(m, row.memory_mib) {
        Ok(Some(t)) => t,
        Ok(None) => {
            warn!(id, "draining: no other node has room for it yet");
            return;
        }
        Err(e) => {
            warn!(id, "draining: {}", e.message);
            return;
        }
    };
    let (to, capacity) = (target.0.name, target.1);
    match m.write(|s| s.move_suspended(id, &node, epoch, &to, Some(capacity))) {
        Ok(_) => {
            m.actors_mut().remove(id);
            m.forget_runtime(id);
            let _ = std::fs::remove_dir_all(m.microvm_dir(id));
            info!(id, to, "draining: handed to another node");
        }
        Err(e) => warn!(id, to, "draining: the hand-off failed: {e}"),
    }
}
