//! QEMU's migration streams to and from files: a full or template save, and a load at
//! start. kiln turns on QEMU's `events` capability and waits for the MIGRATION event that
//! ends a migration instead of polling its status.

use std::path::Path;
use std::time::Duration;

use kiln_types::VmId;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use crate::machine::StateFormat;
use crate::qmp::Qmp;
use crate::vm::{Incoming, Vm, VmError};

/// The migration bandwidth kiln sets (1 TiB/s: no limit a disk reaches).
const UNTHROTTLED_BYTES_PER_S: u64 = 1 << 40;
/// The longest a save may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);

fn qmp_err(id: &VmId) -> impl Fn(crate::qmp::QmpError) -> VmError + '_ {
    move |source| VmError::Qmp {
        id: id.clone(),
        source,
    }
}

/// `migrate-set-capabilities` with `events` on, and `x-ignore-shared` as given.
async fn set_capabilities(
    id: &VmId,
    qmp: &Qmp,
    ignore_shared: Option<bool>,
) -> Result<(), VmError> {
    let mut caps = vec![json!({"capability": "events", "state": true})];
    if let Some(state) = ignore_shared {
        caps.push(json!({"capability": "x-ignore-shared", "state": state}));
    }
    qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
        .await
        .map_err(qmp_err(id))?;
    Ok(())
}

/// What a migration's status says: done, still going, or failed with QEMU's reason.
fn verdict(status: &str) -> Option<bool> {
    match status {
        "completed" => Some(true),
        "failed" | "cancelled" => Some(false),
        _ => None,
    }
}

/// Waits for the migration under way to end, woken by QEMU's MIGRATION events (`events`
/// subscribed before it started, so none is missed). If events were dropped (the
/// subscriber lagged), QEMU's status is asked once and the wait goes on.
async fn ended(
    id: &VmId,
    qmp: &Qmp,
    events: &mut Receiver<Value>,
    what: &'static str,
    timeout: Duration,
) -> Result<(), VmError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                return Err(VmError::Timeout {
                    id: id.clone(),
                    what,
                    timeout,
                })
            }
            Ok(Ok(event)) if event["event"] == "MIGRATION" => {
                event["data"]["status"].as_str().unwrap_or("").to_string()
            }
            Ok(Ok(_)) => continue,
            Ok(Err(RecvError::Lagged(_))) | Ok(Err(RecvError::Closed)) => {
                let q = qmp
                    .execute("query-migrate", json!({}))
                    .await
                    .map_err(qmp_err(id))?;
                q["status"].as_str().unwrap_or("").to_string()
            }
        };
        match verdict(&status) {
            Some(true) => return Ok(()),
            Some(false) => {
                let q = qmp
                    .execute("query-migrate", json!({}))
                    .await
                    .unwrap_or_default();
                let reason = q["error-desc"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("migration {status}"));
                return Err(VmError::Migration {
                    id: id.clone(),
                    reason,
                });
            }
            None => {}
        }
    }
}

/// Loads `incoming` into a QEMU started with `-incoming defer -S`; the guest stays paused.
pub(crate) async fn load_state(
    id: &VmId,
    qmp: &Qmp,
    incoming: &Incoming,
    timeout: Duration,
) -> Result<(), VmError> {
    let ignore_shared =
        (incoming.format == StateFormat::Migration).then_some(incoming.ignore_shared);
    set_capabilities(id, qmp, ignore_shared).await?;
    let mut events = qmp.events();
    let uri = file_uri(id, &incoming.state)?;
    qmp.execute("migrate-incoming", json!({ "uri": uri }))
        .await
        .map_err(qmp_err(id))?;
    ended(id, qmp, &mut events, "loading state", timeout).await
}

impl Vm {
    /// Stops the guest and writes its state to `path` (`ignore_shared`: skip shared RAM).
    pub(crate) async fn save_state(&self, path: &Path, ignore_shared: bool) -> Result<(), VmError> {
        self.qmp("stop", json!({})).await?;
        set_capabilities(&self.id, &self.qmp, Some(ignore_shared)).await?;
        // QEMU throttles a migration to 128 MiB/s by default; to a local file nothing should.
        self.qmp(
            "migrate-set-parameters",
            json!({ "max-bandwidth": UNTHROTTLED_BYTES_PER_S }),
        )
        .await?;
        let mut events = self.qmp.events();
        let uri = file_uri(&self.id, path)?;
        self.qmp("migrate", json!({ "uri": uri })).await?;
        crate::fault::point("suspend.saving");
        ended(
            &self.id,
            &self.qmp,
            &mut events,
            "saving state",
            SAVE_TIMEOUT,
        )
        .await
    }
}

/// A `file:` migration URI (QEMU writes and reads the file itself: no shell, so `-sandbox`
/// can deny spawning). QEMU splits the URI at commas, so a path with one is refused.
fn file_uri(id: &VmId, path: &Path) -> Result<String, VmError> {
    let text = path
        .to_str()
        .filter(|s| !s.contains(',') && !s.contains('\n'))
        .ok_or_else(|| VmError::Invalid {
            id: id.clone(),
            reason: format!(
                "state path {} contains a comma or is not UTF-8",
                path.display()
            ),
        })?;
    Ok(format!("file:{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_completed_failed_and_cancelled_end_a_migration() {
        assert_eq!(verdict("completed"), Some(true));
        assert_eq!(verdict("failed"), Some(false));
        assert_eq!(verdict("cancelled"), Some(false));
        for going in ["setup", "active", "device", "pre-switchover", ""] {
            assert_eq!(verdict(going), None, "{going}");
        }
    }
}
