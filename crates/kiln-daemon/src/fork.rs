//! ForkMicrovm: a RUNNING microVM copied into new microVMs. The clones are recorded PENDING
//! first (counted against `--max-microvms`), the parent's actor writes them as suspended VMs
//! (the parent pauses once), then each is recorded SUSPENDED and handed to its own actor,
//! which resumes it. A crash before that leaves the clones TERMINATED with a reason (they
//! never ran) and the parent running; after it, each clone is SUSPENDED and resumable.

use std::sync::Arc;

use kiln_api::MAX_FORK_COUNT;
use kiln_store::{now_ms, MicrovmRow};
use kiln_types::{MicrovmState, VmId};
use kiln_vmm::kiln_net::CounterSnapshot;
use kiln_vmm::{fault, SuspendedVm};

use crate::actor::{Command, Slot};
use crate::error::{ApiError, ApiResult};
use crate::manager::{new_microvm_id, Manager, Usage};

// The API's bound is the VMM's: one number, checked where both are seen.
const _: () = assert!(MAX_FORK_COUNT as usize == kiln_vmm::fork::MAX_FORK);

impl Manager {
    /// Forks RUNNING microVM `id` into `count` clones; answers once each is SUSPENDED and
    /// told to resume.
    pub async fn fork(self: &Arc<Self>, id: &str, count: u64) -> ApiResult<Vec<MicrovmRow>> {
        if !(1..=MAX_FORK_COUNT).contains(&count) {
            return Err(ApiError::bad_request(format!(
                "count must be 1 to {MAX_FORK_COUNT} (got {count})"
            )));
        }
        let parent = self.row(id)?;
        if parent.state != MicrovmState::Running {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {}; only a RUNNING microVM can be forked",
                parent.state
            )));
        }
        // The actor checks the room the copies need before it pauses the parent.
        self.check_disk("no fork", 0)?;
        let clones = self.record_clones(&parent, count)?;
        let ids: Vec<String> = clones.iter().map(|r| r.id.clone()).collect();
        let targets = ids
            .iter()
            .map(|c| {
                Ok(kiln_vmm::ForkTarget {
                    id: VmId::new(c).map_err(ApiError::internal)?,
                    dir: self.microvm_dir(c),
                })
            })
            .collect::<ApiResult<Vec<_>>>()?;
        let forked = self
            .ask(id, "only a RUNNING microVM can be forked", |reply| {
                Command::Fork {
                    targets: targets.clone(),
                    extra_disk: 0,
                    reply,
                }
            })
            .await;
        let suspended = match forked {
            Ok(s) => s,
            Err(e) => {
                let why = format!("the fork of {id} failed: {}", e.message);
                for clone in &ids {
                    let _ = std::fs::remove_dir_all(self.microvm_dir(clone));
                    self.set_state(clone, MicrovmState::Terminated, Some(&why));
                }
                return Err(e);
            }
        };
        let reason = format!("forked from {id}");
        let mut handed = Vec::new();
        for (row, s) in clones.iter().zip(suspended) {
            match self.adopt_clone(row, s, &reason) {
                Ok(()) => handed.push(row.id.clone()),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(self.microvm_dir(&row.id));
                    let why = format!(
                        "{reason}, but its network could not be set up: {}",
                        e.message
                    );
                    self.set_state(&row.id, MicrovmState::Terminated, Some(&why));
                }
            }
        }
        fault::point("fork.recorded");
        for clone in &handed {
            self.tell(
                clone,
                Command::Resume {
                    reason: reason.clone(),
                    reply: None,
                },
            );
        }
        ids.iter().map(|c| self.row(c)).collect()
    }

    /// The clones' rows, PENDING, under the admission lock that counts them.
    fn record_clones(&self, parent: &MicrovmRow, count: u64) -> ApiResult<Vec<MicrovmRow>> {
        let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        let live = crate::cluster::own_live_count(self)?;
        if live + count as usize > self.cfg.max_microvms {
            return Err(ApiError::quota(format!(
                "{live} microVMs are not TERMINATED, {count} more would pass the limit of {}: \
                 terminate some, fork fewer, or raise kilnd --max-microvms",
                self.cfg.max_microvms
            )));
        }
        let now = now_ms();
        let usage = serde_json::to_value(Usage::default()).map_err(ApiError::internal)?;
        let rows: Vec<MicrovmRow> = (0..count)
            .map(|_| MicrovmRow {
                id: new_microvm_id(),
                image_id: parent.image_id.clone(),
                image_name: parent.image_name.clone(),
                state: MicrovmState::Pending,
                state_reason: Some(format!("forking from {}", parent.id)),
                created_at: now,
                state_changed_at: now,
                last_activity_at: now,
                config: parent.config.clone(),
                usage: usage.clone(),
                labels: parent.labels.clone(),
                node: self.cfg.node_name.clone(),
                memory_mib: parent.memory_mib,
            })
            .collect();
        self.write(|s| s.claim_and_insert(&rows, self.memory_cap()))?;
        Ok(rows)
    }

    /// A written clone: its network, SUSPENDED, and its own actor.
    fn adopt_clone(
        self: &Arc<Self>,
        row: &MicrovmRow,
        s: SuspendedVm,
        reason: &str,
    ) -> ApiResult<()> {
        let config = Manager::config_of(row)?;
        let network = self.network_of(&row.id, &config, CounterSnapshot::default())?;
        let slot = Slot {
            suspended: Some(s.with_network(network)),
            last_sample_ms: now_ms(),
            ..Slot::default()
        };
        self.set_state(&row.id, MicrovmState::Suspended, Some(reason));
        crate::actor::spawn(self, &row.id, MicrovmState::Suspended, slot);
        Ok(())
    }
}
