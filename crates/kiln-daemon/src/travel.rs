//! SUSPENDED microVMs are not tied to a node (with `--object-store`). Once a microVM is
//! SUSPENDED, its owner uploads the snapshot (device state, memory diff against the image's
//! template, disk overlay, boot files) as blobs and records the list in the store, with the
//! ownership epoch and the suspend's time it belongs to: only then can it travel, and a
//! snapshot list never names a blob that is not whole.
//!
//! When a request for it reaches a node while its owner's lease has run out, that node
//! takes it over: it assembles the snapshot in its own home (re-pointed at its own copy of
//! the template), then moves the ownership in one transaction that checks the owner, the
//! epoch and the state it saw, and claims its memory; only the winner of that move keeps
//! it and serves it. A node coming back stops, without serving, whatever moved away while
//! it was gone (see [`forget_moved`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kiln_store::{MicrovmRow, StoreError};
use kiln_types::MicrovmState;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;
use crate::share::{BundleFile, ShareError};

const FORMAT: u32 = 1;
/// What of a microVM's directory a resume needs.
const PARTS: [&str; 3] = ["disk.qcow2", "boot", "suspended"];
const MAX_FILES: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    format: u32,
    microvm: String,
    /// The ownership epoch and the suspend (its `state_changed_at`) it was taken at.
    epoch: i64,
    suspended_at: i64,
    files: Vec<BundleFile>,
}

/// The prefix of the store's keys for snapshot lists.
pub(crate) const SNAPSHOT_PREFIX: &str = "snapshot/";

fn key(id: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{id}")
}

/// Uploads the snapshot of microVM `id`, SUSPENDED on this node, and records it.
pub async fn upload(m: &Manager, id: &str) {
    let Some(blobs) = m.blobs.clone() else {
        return;
    };
    let started = Instant::now();
    let result = async {
        let row = m
            .store()
            .microvm(id)?
            .ok_or_else(|| StoreError::NoSuchMicrovm(id.to_string()))?;
        let (_, epoch) = m
            .store()
            .ownership(id)?
            .ok_or_else(|| StoreError::NoSuchMicrovm(id.to_string()))?;
        let dir = m.microvm_dir(id);
        let names: Vec<String> = crate::share::template_files(&dir)?
            .into_iter()
            .filter(|n| {
                PARTS
                    .iter()
                    .any(|p| n == p || n.starts_with(&format!("{p}/")))
            })
            .collect();
        let files = crate::share::upload_files(m, &blobs, &dir, names, &[]).await?;
        let snapshot = Snapshot {
            format: FORMAT,
            microvm: id.to_string(),
            epoch,
            suspended_at: row.state_changed_at,
            files,
        };
        let text =
            serde_json::to_string(&snapshot).map_err(|e| ShareError::Bundle(e.to_string()))?;
        m.write(|s| s.set_shared_value(&key(id), &text))?;
        Ok::<_, ShareError>(())
    }
    .await;
    match result {
        Ok(()) => info!(
            id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot uploaded: the microVM resumes on any node"
        ),
        Err(e) => warn!(
            id,
            "uploading the snapshot failed: it resumes only on this node: {e}"
        ),
    }
}

/// The snapshot list of `row`'s last suspend, if it is recorded and usable.
fn snapshot_of(m: &Manager, row: &MicrovmRow) -> ApiResult<Option<Snapshot>> {
    let Some(text) = m.store().shared_value(&key(&row.id))? else {
        return Ok(None);
    };
    let snapshot: Snapshot = serde_json::from_str(&text)
        .map_err(|e| ApiError::internal(format!("the snapshot list of {}: {e}", row.id)))?;
    let usable = snapshot.format == FORMAT
        && snapshot.files.len() <= MAX_FILES
        && snapshot.suspended_at == row.state_changed_at;
    Ok(usable.then_some(snapshot))
}

/// Whether `row` (SUSPENDED on this node) can be handed to another node: its snapshot is
/// uploaded, at its current epoch.
pub fn has_snapshot(m: &Manager, row: &MicrovmRow) -> bool {
    let epoch = m.store().ownership(&row.id).ok().flatten().map(|(_, e)| e);
    matches!(snapshot_of(m, row), Ok(Some(s)) if Some(s.epoch) == epoch)
}

/// Uploads the snapshots of this node's SUSPENDED microVMs that have none at their
/// current epoch (an upload failed while object storage was down).
pub async fn upload_missing(m: &Arc<Manager>) {
    if m.blobs.is_none() {
        return;
    }
    let Ok(rows) = crate::cluster::own_microvms(m, Some(MicrovmState::Suspended)) else {
        return;
    };
    for row in rows {
        if m.actors_mut().contains_key(&row.id) && !has_snapshot(m, &row) {
            // Through its actor, so no resume runs while its files are read.
            let _ = m
                .ask(&row.id, "it is no longer SUSPENDED", |reply| {
                    crate::actor::Command::Upload { reply }
                })
                .await;
        }
    }
}

/// The SUSPENDED microVMs handed to this node by a drained one that it has not assembled
/// yet: assembled now (each heartbeat).
pub async fn adopt_handed(m: &Arc<Manager>) {
    if m.blobs.is_none() {
        return;
    }
    let Ok(rows) = crate::cluster::own_microvms(m, Some(MicrovmState::Suspended)) else {
        return;
    };
    for row in rows {
        if !m.actors_mut().contains_key(&row.id) {
            if let Err(e) = take_stranded(m, &row.id).await {
                warn!(id = row.id, "taking a handed microVM failed: {}", e.message);
            }
        }
    }
}

/// Takes microVM `id` over if it is SUSPENDED, its snapshot is in object storage, and
/// either its node's lease ran out or a drained node handed it to this one (which has not
/// assembled it yet): `true` when this node holds it now.
pub async fn take_stranded(m: &Arc<Manager>, id: &str) -> ApiResult<bool> {
    // Called on every request for a microVM: one this node already holds (an actor) costs
    // no database read.
    if m.blobs.is_none() || !crate::cluster::is_shared(m) || m.actors_mut().contains_key(id) {
        return Ok(false);
    }
    let Some(row) = m.store().microvm(id)? else {
        return Ok(false);
    };
    if row.state != MicrovmState::Suspended {
        return Ok(false);
    }
    let handed = crate::cluster::is_mine(m, &row);
    // Only from a node that is gone: a live owner resumes its own.
    if !handed {
        match crate::cluster::owner_elsewhere(m, id) {
            Err(e) if e.code == kiln_api::ErrorCode::ServiceUnavailable => {}
            _ => return Ok(false),
        }
    }
    let Some((owner, epoch)) = m.store().ownership(id)? else {
        return Ok(false);
    };
    let Some(snapshot) = snapshot_of(m, &row)? else {
        return Ok(false);
    };
    // A takeover needs the snapshot of the owner's epoch; a hand-off raised it since.
    let current = if handed {
        snapshot.epoch < epoch
    } else {
        snapshot.epoch == epoch
    };
    if !current {
        return Ok(false);
    }
    if !handed && !room_here(m, &row)? {
        return hand_on(m, &row, &owner, epoch);
    }
    let img = m.store().image(&row.image_id)?.ok_or_else(|| {
        ApiError::internal(format!("microVM {id}'s image {} is gone", row.image_id))
    })?;
    let template = crate::share::template_here(m, &img).await?;
    let _one = m.imports.lock().await;
    if handed && m.actors_mut().contains_key(id) {
        return Ok(true);
    }
    let started = Instant::now();
    let dir = m.microvm_dir(id);
    let part = dir.with_extension("part");
    // Whatever this node kept of it from before it moved away is stale.
    let _ = std::fs::remove_dir_all(&dir);
    let assembled = async {
        let blobs = m
            .blobs
            .as_deref()
            .ok_or_else(|| ShareError::Bundle("no object storage".into()))?;
        crate::share::fetch_into(
            blobs,
            &snapshot.files,
            &part,
            &part.with_extension("ready"),
            false,
        )
        .await?;
        repoint(&part.with_extension("ready"), &template).await
    }
    .await;
    let ready = part.with_extension("ready");
    if let Err(e) = assembled {
        let _ = std::fs::remove_dir_all(&ready);
        return Err(crate::share::to_api(
            format!("microVM {id}'s snapshot could not be fetched from object storage"),
            e,
        ));
    }
    kiln_vmm::fault::point("takeover.assembled");
    let moved = if handed {
        Ok(epoch)
    } else {
        m.write(|s| s.move_suspended(id, &owner, epoch, &m.cfg.node_name, m.memory_cap()))
    };
    if let Err(e) = moved {
        let _ = std::fs::remove_dir_all(&ready);
        return match e {
            // Another node won: it serves it.
            StoreError::Fenced { .. } => Ok(false),
            e => Err(e.into()),
        };
    }
    kiln_vmm::fault::point("takeover.moved");
    if let Err(e) = std::fs::rename(&ready, &dir) {
        warn!(id, "placing the snapshot failed: {e}");
    }
    let row = m
        .store()
        .microvm(id)?
        .ok_or_else(|| ApiError::not_found("microVM", id))?;
    match crate::recovery::reopen_suspended(m, &row) {
        Ok(s) => crate::recovery::keep_suspended(m, id, MicrovmState::Suspended, s),
        Err(e) => {
            let why = format!("its snapshot, taken over from node {owner:?}, is unusable: {e}");
            m.set_state(id, MicrovmState::Terminated, Some(&why));
        }
    }
    info!(
        id,
        from = owner,
        elapsed_ms = started.elapsed().as_millis() as u64,
        handed,
        "took over a SUSPENDED microVM from another node"
    );
    Ok(true)
}

/// Whether this node can take `row` on: it is not draining and has the memory free.
fn room_here(m: &Manager, row: &MicrovmRow) -> ApiResult<bool> {
    if crate::drain::is_draining(m, &m.cfg.node_name) {
        return Ok(false);
    }
    let Some(cap) = m.memory_cap() else {
        return Ok(true);
    };
    let used = crate::placement::used_by_node(m)?;
    let here = used.get(&m.cfg.node_name).copied().unwrap_or(0);
    Ok(here + row.memory_mib <= cap)
}

/// Moves the stranded `row` (of the gone node `owner`, at `epoch`) straight to the node
/// with the most room, which assembles it on its next request or cluster step: `false`,
/// as this node does not hold it (the caller passes the request on to the new owner).
fn hand_on(m: &Manager, row: &MicrovmRow, owner: &str, epoch: i64) -> ApiResult<bool> {
    let id = row.id.as_str();
    let Some((to, capacity)) = crate::drain::pick_node(m, row.memory_mib)? else {
        return Err(ApiError::quota(format!(
            "microVM {id} cannot resume yet: its node {owner:?} is gone, and no reachable, \
             undrained node has the {} MiB it needs free (node {:?} included); retry later",
            row.memory_mib, m.cfg.node_name
        )));
    };
    match m.write(|s| s.move_suspended(id, owner, epoch, &to.name, Some(capacity))) {
        Ok(_) => info!(
            id,
            from = owner,
            to = to.name,
            "no room here for a stranded microVM: handed to a node with room"
        ),
        // Another node took it first: the caller finds the new owner.
        Err(StoreError::Fenced { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(false)
}

/// Points the snapshot in `dir` at this node's copy of the image's template: the memory
/// diff's base, the disk chain the manifest records, and the overlay's backing file (which
/// holds the same guest data as the owner's chain: it was flattened from it).
async fn repoint(dir: &Path, template: &Path) -> Result<(), ShareError> {
    let path = dir
        .join("suspended")
        .join(kiln_vmm::manifest::MANIFEST_FILE);
    let text = std::fs::read(&path).map_err(|source| ShareError::Io {
        path: path.clone(),
        source,
    })?;
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| ShareError::Bundle(e.to_string()))?;
    let disk = template.join("disk.qcow2");
    manifest["disk_backing"] = disk.to_string_lossy().into_owned().into();
    if manifest["memory_diff"].is_object() {
        manifest["memory_diff"]["base"] = template
            .join("memory.ram")
            .to_string_lossy()
            .into_owned()
            .into();
    }
    let bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ShareError::Bundle(e.to_string()))?;
    std::fs::write(&path, bytes).map_err(|source| ShareError::Io {
        path: path.clone(),
        source,
    })?;
    let overlay = dir.join("disk.qcow2");
    let out = tokio::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-F", "qcow2", "-b"])
        .arg(&disk)
        .arg(&overlay)
        .output()
        .await
        .map_err(|source| ShareError::Io {
            path: overlay.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ShareError::Bundle(format!(
            "qemu-img rebase of {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// At start: the microVM directories this node keeps of microVMs another node owns now
/// (taken over while this node was gone) are removed, their processes ended: never served.
pub async fn forget_moved(m: &Arc<Manager>) {
    if !crate::cluster::is_shared(m) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(m.cfg.home.join("microvms")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(".ready") {
            // Assembled by a takeover that kilnd did not finish: kept if the move won.
            let won = m
                .store()
                .microvm(id)
                .ok()
                .flatten()
                .is_some_and(|r| !moved_away(m, &r));
            let dir = m.microvm_dir(id);
            if won && !dir.exists() && std::fs::rename(entry.path(), &dir).is_ok() {
                continue;
            }
            let _ = std::fs::remove_dir_all(entry.path());
            continue;
        }
        if name.ends_with(".part") {
            let _ = std::fs::remove_dir_all(entry.path());
            continue;
        }
        let id = name;
        let row = match m.store().microvm(&id) {
            Ok(Some(row)) => row,
            _ => continue,
        };
        if moved_away(m, &row) {
            crate::recovery::end_local_leftovers(m, &id);
            let _ = std::fs::remove_dir_all(entry.path());
            warn!(
                id,
                owner = row.node,
                "this microVM moved to another node while this one was away: its copy here is removed, never served"
            );
        }
    }
}

fn moved_away(m: &Manager, row: &MicrovmRow) -> bool {
    !row.node.is_empty() && row.node != m.cfg.node_name
}

/// Forgets the snapshot list of a microVM that resumed (or ended): it is stale.
pub fn forget(m: &Manager, id: &str) {
    if m.blobs.is_some() {
        let _ = m.write(|s| s.delete_shared_value(&key(id)));
    }
}
