//! Start-up recovery after a crash, a `kill -9` or an upgrade: every image and microVM is
//! brought to a consistent state. Guests outlive kilnd, so RUNNING microVMs are taken back
//! (their QEMU and network backend watched again, QMP and a new agent session opened, idle
//! timers and metering resumed); one whose QEMU ended while kilnd was down is TERMINATED
//! with the reason and its console tail. Suspended ones stay SUSPENDED (their state is on
//! disk) and resume on request; microVMs caught mid-launch are TERMINATED, their leftover
//! processes killed; interrupted bakes are FAILED.

use std::sync::Arc;
use std::time::Duration;

use kiln_store::now_ms;
use kiln_types::{ImageStatus, MicrovmState, VmId};
use kiln_vmm::{AdoptConfig, SuspendedVm, Template, Vm, VmRecord};
use tracing::{info, warn};

use crate::images::sync_image;
use crate::manager::{Manager, MicrovmConfig, Slot, Usage};

pub async fn recover(manager: &Arc<Manager>) -> anyhow::Result<()> {
    // Spares of templates deleted while kilnd was away would stay forever otherwise.
    kiln_vmm::spare::clear(&manager.spare_overlays_dir());
    crate::pool::recover(manager).await;
    for id in manager.builder.recover_interrupted()? {
        info!(id, "interrupted image build marked FAILED");
    }
    let creating: Vec<_> = manager
        .store()
        .images()?
        .into_iter()
        .filter(|i| i.status == ImageStatus::Creating)
        .collect();
    for img in creating {
        sync_image(manager, &img.name, &img.id);
    }
    check_images(manager)?;
    // What moved to another node while this one was away is never served here.
    crate::travel::forget_moved(manager).await;
    // Bind the rows first: the store's guard must not live across the loop's own writes.
    let rows = crate::cluster::own_microvms(manager, None)?;
    // Running microVMs are taken back at once (each waits on its own QMP and agent).
    let mut adoptions = tokio::task::JoinSet::new();
    for row in rows {
        match row.state {
            MicrovmState::Terminated => {}
            MicrovmState::Suspended => match reopen_suspended(manager, &row) {
                Ok(s) => keep_suspended(manager, &row.id, MicrovmState::Suspended, s),
                Err(e) => {
                    warn!(id = row.id, "suspended state unusable: {e}");
                    let _ = std::fs::remove_dir_all(manager.microvm_dir(&row.id));
                    manager.set_state(
                        &row.id,
                        MicrovmState::Terminated,
                        Some(&format!("suspended state lost while kilnd was down: {e}")),
                    );
                }
            },
            MicrovmState::Running | MicrovmState::Resuming => {
                let manager = manager.clone();
                adoptions.spawn(async move { readopt(&manager, &row, row.state).await });
            }
            MicrovmState::Pending => {
                // A launch is rolled back: its template is untouched, its guest never served.
                end_leftovers(manager, &row.id).await;
                let _ = std::fs::remove_dir_all(manager.microvm_dir(&row.id));
                let why = match row.state_reason.as_deref() {
                    Some(r) if r.starts_with("forking from") => {
                        format!("kilnd restarted while it was {r}; it never ran: fork again")
                    }
                    _ => "kilnd restarted while the microVM was launching; launch it again"
                        .to_string(),
                };
                manager.set_state(&row.id, MicrovmState::Terminated, Some(&why));
            }
        }
    }
    adoptions.join_all().await;
    Ok(())
}

/// A SUSPENDED microVM's actor, owning its snapshot.
pub(crate) fn keep_suspended(
    manager: &Arc<Manager>,
    id: &str,
    state: MicrovmState,
    s: SuspendedVm,
) {
    let slot = Slot {
        suspended: Some(s),
        last_sample_ms: now_ms(),
        ..Slot::default()
    };
    crate::actor::spawn(manager, id, state, slot);
    info!(id, "suspended microVM re-adopted");
}

/// Opens a SUSPENDED microVM's snapshot again, flagging one this host cannot resume.
pub fn reopen_suspended(
    manager: &Arc<Manager>,
    row: &kiln_store::MicrovmRow,
) -> anyhow::Result<SuspendedVm> {
    let id = VmId::new(&row.id)?;
    let dir = manager.microvm_dir(&row.id);
    let mut s = SuspendedVm::open(
        id,
        &dir,
        manager.assets.clone(),
        false,
        manager.confinement.clone(),
    )?;
    // The NIC leads where the microVM's connectors say, as before.
    let config: MicrovmConfig = serde_json::from_value(row.config.clone())?;
    let usage: Usage = serde_json::from_value(row.usage.clone()).unwrap_or_default();
    let network = manager
        .network_of(&row.id, &config, usage.network)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    s.set_network(network);
    if let Err(mismatch) = s.compatibility() {
        warn!(
            id = row.id,
            "suspended microVM cannot be resumed here: {mismatch}"
        );
        manager
            .not_resumable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(row.id.clone(), mismatch.to_string());
    }
    Ok(s)
}

/// Kills what is left of a microVM's processes and releases their jails.
async fn end_leftovers(manager: &Manager, id: &str) {
    if let Some(record) = recorded(manager, id) {
        record.end().await;
    }
    end_local_leftovers(manager, id);
}

/// Kills a QEMU of this node's directory of the microVM, from what this node holds alone
/// (never the store's runtime record: that may be another node's now).
pub(crate) fn end_local_leftovers(manager: &Manager, id: &str) {
    kill_leftover_qemu(&manager.microvm_dir(id));
    let _ = std::fs::remove_file(manager.net_control(id));
}

/// The runtime record kept for a microVM, if there is a readable one.
fn recorded(manager: &Manager, id: &str) -> Option<VmRecord> {
    let value = manager.store().runtime(id).ok().flatten()?;
    match serde_json::from_value(value) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(id, "the microVM's runtime record is unreadable: {e}");
            None
        }
    }
}

/// Takes a RUNNING (or RESUMING) microVM back, rolling an interrupted suspend or resume
/// forward when its guest still runs. When it cannot be taken back, a complete snapshot
/// (a suspend that had saved, a resume that had not started the guest) makes it
/// SUSPENDED; otherwise it is TERMINATED with why.
async fn readopt(manager: &Arc<Manager>, row: &kiln_store::MicrovmRow, state: MicrovmState) {
    let id = row.id.as_str();
    let dir = manager.microvm_dir(id);
    let record = recorded(manager, id);
    let why = match adopt(manager, row, record).await {
        Ok(vm) => {
            // A half-written suspend, or the state a finished resume came from.
            vm.forget_suspended_state();
            install(manager, row, vm, state);
            if state == MicrovmState::Resuming {
                manager.set_state(
                    id,
                    MicrovmState::Running,
                    Some("the resume completed after a kilnd restart"),
                );
            }
            return;
        }
        Err(why) => why,
    };
    end_leftovers(manager, id).await;
    manager.forget_runtime(id);
    if let Ok(s) = reopen_suspended(manager, row) {
        let reason = match state {
            MicrovmState::Resuming => {
                "kilnd restarted during a resume that had not started the guest; the \
                 snapshot is kept"
            }
            _ => "kilnd restarted during a suspend that had saved the state",
        };
        warn!(id, "{reason} ({why})");
        keep_suspended(manager, id, state, s);
        manager.set_state(id, MicrovmState::Suspended, Some(reason));
        return;
    }
    warn!(id, "running microVM lost: {why}");
    let _ = std::fs::remove_dir_all(&dir);
    manager.set_state(id, MicrovmState::Terminated, Some(&why));
}

/// A taken-back microVM's actor: its VM, a fresh burst credit, metering from now.
fn install(manager: &Arc<Manager>, row: &kiln_store::MicrovmRow, vm: Vm, state: MicrovmState) {
    let id = row.id.as_str();
    let config: Option<MicrovmConfig> = serde_json::from_value(row.config.clone()).ok();
    let cpu = config.as_ref().map(|config| {
        crate::cpu::CpuCredit::new(
            Manager::baseline_of(config),
            manager.cfg.cpu_credit_max_seconds,
        )
    });
    manager.publish(id, Some(vm.agent().clone()));
    let slot = Slot {
        vm: Some(vm),
        last_sample_ms: now_ms(),
        cpu,
        ..Slot::default()
    };
    crate::actor::spawn(manager, id, state, slot);
    if let Err(e) =
        manager
            .store()
            .record_event(id, "adopted", "kilnd restarted and took the microVM back")
    {
        warn!(id, "recording the adoption failed: {e}");
    }
    info!(id, "running microVM re-adopted");
}

/// What is needed to adopt a RUNNING microVM, then the adoption; Err is the reason it
/// becomes TERMINATED.
async fn adopt(
    manager: &Arc<Manager>,
    row: &kiln_store::MicrovmRow,
    record: Option<VmRecord>,
) -> Result<Vm, String> {
    let id = row.id.as_str();
    let Some(record) = record else {
        return Err(
            "kilnd restarted while the microVM was RUNNING and no record of its processes              was kept (it ran under a kilnd older than re-adoption); its memory was lost"
                .into(),
        );
    };
    let config: MicrovmConfig =
        serde_json::from_value(row.config.clone()).map_err(|e| format!("its config: {e}"))?;
    let usage: Usage = serde_json::from_value(row.usage.clone()).unwrap_or_default();
    let network = manager
        .network_of(id, &config, usage.network)
        .map_err(|e| e.message)?;
    let vm_id = VmId::new(id).map_err(|e| e.to_string())?;
    let console = manager.microvm_dir(id).join("console.log");
    Vm::adopt(AdoptConfig {
        id: vm_id,
        dir: manager.microvm_dir(id),
        record,
        network,
        confinement: manager.confinement_of(&config),
        timeout: Duration::from_secs(30),
    })
    .await
    .map_err(|e| {
        let mut why = format!(
            "kilnd restarted and could not take the microVM back: {}",
            kiln_vmm::error_chain(&e)
        );
        if !matches!(
            e,
            kiln_vmm::VmError::Crashed { .. } | kiln_vmm::VmError::AgentUnreachable { .. }
        ) {
            let tail = kiln_vmm::process::tail_of_file(&console, kiln_vmm::vm::CONSOLE_TAIL);
            why.push_str(&format!("\n--- console tail ---\n{tail}"));
        }
        why
    })
}

/// Marks SUCCESSFUL images whose template this host cannot launch (another QEMU, machine
/// layout, …) REBUILD_REQUIRED with the differences, and gives the status back to those
/// that can launch again (QEMU rolled back).
fn check_images(manager: &Manager) -> anyhow::Result<()> {
    let images = manager.store().all_images()?;
    for mut img in images {
        if !matches!(
            img.status,
            ImageStatus::Successful | ImageStatus::RebuildRequired
        ) {
            continue;
        }
        let Some(template) = img.record["template"]
            .as_str()
            .map(std::path::PathBuf::from)
        else {
            continue;
        };
        // Another node's build (a shared database): its files are there, not here.
        if crate::cluster::is_shared(manager) && !template.exists() {
            continue;
        }
        let verdict = Template::open(&template)
            .map_err(|e| e.to_string())
            .and_then(|t| t.compatibility(&manager.assets).map_err(|e| e.to_string()));
        let (status, reason) = match verdict {
            Ok(()) => (ImageStatus::Successful, None),
            Err(why) => (
                ImageStatus::RebuildRequired,
                Some(format!(
                    "{why}. Rebuild it with `kiln image rebuild {}` (its build context and \
                     settings are submitted again)",
                    img.name
                )),
            ),
        };
        if img.status != status {
            info!(
                id = img.id,
                %status, "image status after checking its template"
            );
            img.status = status;
            img.reason = reason;
            manager.store().upsert_image(&img)?;
        }
    }
    Ok(())
}

/// A QEMU whose pid file is still there and alive (it should have died with the daemon).
pub(crate) fn kill_leftover_qemu(dir: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("qemu.pid")) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
