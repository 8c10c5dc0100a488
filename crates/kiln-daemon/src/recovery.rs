//! Start-up recovery after a crash or `kill -9`: every image and microVM is brought to a
//! consistent state. Guests die with the daemon (their QEMU is tied to it), so microVMs that
//! were running are TERMINATED with a reason and their files removed; suspended ones stay
//! SUSPENDED (their state is on disk) and resume on request; interrupted bakes are FAILED.

use std::sync::Arc;

use kiln_types::{MicrovmState, VmId};
use kiln_vmm::{SuspendedVm, Template};
use tracing::{info, warn};

use crate::images::sync_image;
use crate::manager::{Manager, MicrovmConfig, Usage};

/// The status of an image whose template this host cannot launch.
pub const REBUILD_REQUIRED: &str = "REBUILD_REQUIRED";

pub fn recover(manager: &Arc<Manager>) -> anyhow::Result<()> {
    for id in manager.builder.recover_interrupted()? {
        info!(id, "interrupted image build marked FAILED");
    }
    let creating: Vec<_> = manager
        .store()
        .images()?
        .into_iter()
        .filter(|i| i.status == "CREATING")
        .collect();
    for img in creating {
        sync_image(manager, &img.name, &img.id);
    }
    check_images(manager)?;
    // Bind the rows first: the store's guard must not live across the loop's own writes.
    let rows = manager.store().microvms(None, None)?;
    for row in rows {
        let state: MicrovmState = row.state.parse().unwrap_or(MicrovmState::Terminated);
        let dir = manager.microvm_dir(&row.id);
        match state {
            MicrovmState::Terminated => {}
            MicrovmState::Suspended => {
                let reopened = VmId::new(&row.id)
                    .map_err(anyhow::Error::from)
                    .and_then(|id| {
                        SuspendedVm::open(
                            id,
                            &dir,
                            manager.assets.clone(),
                            true,
                            manager.confinement,
                        )
                        .map_err(anyhow::Error::from)
                    })
                    .and_then(|mut s| {
                        // The NIC leads where the microVM's connectors say, as before.
                        let config: MicrovmConfig = serde_json::from_value(row.config.clone())?;
                        let usage: Usage =
                            serde_json::from_value(row.usage.clone()).unwrap_or_default();
                        let network = manager
                            .network_of(&row.id, &config, usage.network)
                            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                        s.set_network(network);
                        Ok(s)
                    });
                match reopened {
                    Ok(s) => {
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
                        manager
                            .slots
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(row.id.clone())
                            .or_default()
                            .try_lock()?
                            .suspended = Some(s);
                        info!(id = row.id, "suspended microVM re-adopted");
                    }
                    Err(e) => {
                        warn!(id = row.id, "suspended state unusable: {e}");
                        let _ = std::fs::remove_dir_all(&dir);
                        manager.store().set_state(
                            &row.id,
                            "TERMINATED",
                            Some(&format!("suspended state lost while kilnd was down: {e}")),
                        )?;
                    }
                }
            }
            _ => {
                kill_leftover_qemu(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                manager.store().set_state(
                    &row.id,
                    "TERMINATED",
                    Some(&format!(
                        "kilnd restarted while the microVM was {state}; its memory was lost"
                    )),
                )?;
            }
        }
    }
    Ok(())
}

/// Marks SUCCESSFUL images whose template this host cannot launch (another QEMU, machine
/// layout, …) REBUILD_REQUIRED with the differences, and gives the status back to those
/// that can launch again (QEMU rolled back).
fn check_images(manager: &Manager) -> anyhow::Result<()> {
    let images = manager.store().all_images()?;
    for mut img in images {
        if img.status != "SUCCESSFUL" && img.status != REBUILD_REQUIRED {
            continue;
        }
        let Some(template) = img.record["template"]
            .as_str()
            .map(std::path::PathBuf::from)
        else {
            continue;
        };
        let verdict = Template::open(&template)
            .map_err(|e| e.to_string())
            .and_then(|t| t.compatibility(&manager.assets).map_err(|e| e.to_string()));
        let (status, reason) = match verdict {
            Ok(()) => ("SUCCESSFUL", None),
            Err(why) => (
                REBUILD_REQUIRED,
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
                status, "image status after checking its template"
            );
            img.status = status.to_string();
            img.reason = reason;
            manager.store().upsert_image(&img)?;
        }
    }
    Ok(())
}

/// A QEMU whose pid file is still there and alive (it should have died with the daemon).
fn kill_leftover_qemu(dir: &std::path::Path) {
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
