//! The idle scheduler: suspends microVMs idle longer than `maxIdleDurationSeconds`,
//! terminates those suspended longer than `suspendedDurationSeconds` or older than
//! `maxDurationSeconds`, and samples usage.

use std::sync::Arc;

use kiln_store::now_ms;
use kiln_types::MicrovmState;
use tracing::warn;

use crate::actor::Command;
use crate::manager::{Manager, MicrovmConfig};

pub fn spawn(manager: Arc<Manager>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(manager.cfg.tick);
        loop {
            tick.tick().await;
            if let Err(e) = pass(&manager).await {
                warn!("idle policy pass failed: {e}");
            }
        }
    });
}

async fn pass(manager: &Arc<Manager>) -> Result<(), kiln_store::StoreError> {
    manager.flush_activity();
    let rows = crate::cluster::own_microvms(manager, None)?;
    let running: std::collections::HashSet<&str> = rows
        .iter()
        .filter(|r| r.state == MicrovmState::Running)
        .map(|r| r.id.as_str())
        .collect();
    manager.metrics.retain(|id| running.contains(id));
    let now = now_ms();
    for row in rows {
        let state = row.state;
        if matches!(
            state,
            MicrovmState::Terminated | MicrovmState::Pending | MicrovmState::Resuming
        ) {
            continue;
        }
        let Ok(config) = serde_json::from_value::<MicrovmConfig>(row.config.clone()) else {
            continue;
        };
        let age_s = (now - row.created_at) / 1000;
        let max_idle = config.idle_policy.max_idle_duration_seconds;
        let action: Option<(&str, String)> = if manager.not_resumable(&row.id).is_some() {
            // Kept for its owner to download: policy never deletes it.
            None
        } else if age_s >= config.max_duration_seconds as i64 {
            Some((
                "terminate",
                format!(
                    "reached maxDurationSeconds ({})",
                    config.max_duration_seconds
                ),
            ))
        } else if state == MicrovmState::Running
            && manager.open_requests(&row.id) == 0
            && (now - manager.last_activity(&row.id, row.last_activity_at)) / 1000
                >= config.idle_policy.max_idle_duration_seconds as i64
        {
            Some((
                "suspend",
                format!(
                    "idle for {} s",
                    config.idle_policy.max_idle_duration_seconds
                ),
            ))
        } else if state == MicrovmState::Suspended
            && (now - row.state_changed_at) / 1000
                >= config.idle_policy.suspended_duration_seconds as i64
        {
            Some((
                "terminate",
                format!(
                    "suspended for over {} s",
                    config.idle_policy.suspended_duration_seconds
                ),
            ))
        } else {
            None
        };
        match action {
            // Metering, burst credit and a QEMU that ended on its own: the actor's tick
            // (dropped, not queued, while it is busy with a transition).
            None => {
                manager.tell(&row.id, Command::Tick);
            }
            Some((what, reason)) => {
                let (m, id) = (manager.clone(), row.id.clone());
                tokio::spawn(async move {
                    let command = if what == "suspend" {
                        kiln_vmm::fault::hold("idle.decided").await;
                        // The actor checks idleness again when it takes the command.
                        Command::Suspend {
                            reason,
                            if_idle_for: Some(max_idle),
                            reply: None,
                        }
                    } else {
                        Command::Terminate {
                            reason,
                            reply: None,
                        }
                    };
                    m.tell(&id, command);
                });
            }
        }
    }
    Ok(())
}
