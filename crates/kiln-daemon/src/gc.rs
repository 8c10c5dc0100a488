//! Garbage collection of object storage (`--object-store`). Blobs are content-addressed and
//! shared: an image's bundle and every snapshot list name theirs, and a blob may be named
//! by several. A blob no list names is removed once it is older than the grace period
//! (`--blob-gc-grace-seconds`) and no upload claimed it within that period.
//!
//! S3 has no conditional delete, so "unnamed and old" alone would race an upload that found
//! the blob present and skipped sending it. Claims in the store close that race:
//! - an upload claims each blob before it looks for it, keeps claiming the blobs of its
//!   upload while it runs, and claims them all once more, then checks each is present,
//!   right before it records the list that names them;
//! - the collector marks a blob *doomed* in one transaction with the check that no claim
//!   is recent (serialized with claims), deletes it, then forgets claim and mark. A claim
//!   that meets a mark fails, and the upload is retried later (it then sends the blob).
//!
//! A round's cut-off (claims older than it do not protect) is fixed when the round starts,
//! before it reads the lists: a list recorded after that reading was claimed after the
//! cut-off, so its blobs are never doomed. One node collects per interval (a shared record of the last round); the others skip.
//! Each node also removes blobs of its own cache that nothing names or links to.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use kiln_objects::{BlobId, Blobs};
use kiln_store::now_ms;
use tracing::{info, warn};

use crate::manager::Manager;
use crate::share::ShareError;

/// The store's record of the last round (ms), so one node collects per interval.
const LAST_ROUND: &str = "blob-gc/last-round";
/// The lists that name blobs: image bundles and snapshot lists.
const NAMING_PREFIXES: [&str; 2] = [crate::share::BUNDLE_PREFIX, crate::travel::SNAPSHOT_PREFIX];

/// What [`named_blobs`] reads of a bundle or a snapshot list (both carry `files`).
#[derive(serde::Deserialize)]
struct Naming {
    files: Vec<crate::share::BundleFile>,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub deleted: u64,
    pub bytes: u64,
    pub kept: u64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct GcCounters {
    pub deleted: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
    pub rounds: std::sync::atomic::AtomicU64,
    /// When this node last pruned its own cache (ms): not a metric, the prune's timer.
    pub pruned_at: std::sync::atomic::AtomicI64,
}

fn grace_ms(m: &Manager) -> i64 {
    m.cfg.blob_gc_grace.as_millis() as i64
}

/// How often an upload renews its claims: well inside the grace period.
fn renew_every(m: &Manager) -> Duration {
    (m.cfg.blob_gc_grace / 4).max(Duration::from_millis(250))
}

/// Claims blobs `ids` for an upload: fails when garbage collection is removing one.
pub(crate) fn claim(m: &Manager, ids: &[String]) -> Result<(), ShareError> {
    let doomed = m.write(|s| s.claim_blobs(ids, now_ms()))?;
    match doomed.first() {
        None => Ok(()),
        Some(id) => Err(ShareError::Collecting(id.clone())),
    }
}

/// Runs `work` (an upload of more blobs) while renewing the claims of `ids`.
pub(crate) async fn renewing<T>(
    m: &Manager,
    ids: &[String],
    work: impl Future<Output = Result<T, ShareError>>,
) -> Result<T, ShareError> {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(renew_every(m));
    tick.tick().await;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => claim(m, ids)?,
        }
    }
}

/// Right before a list naming `ids` is recorded: claims them all again and checks each is
/// in the store (a blob found at the start may have been collected since).
pub(crate) async fn confirm(m: &Manager, blobs: &Blobs, ids: &[String]) -> Result<(), ShareError> {
    claim(m, ids)?;
    for id in ids {
        let blob = BlobId::parse(id)?;
        if !blobs.exists(&blob).await? {
            return Err(ShareError::Collecting(id.clone()));
        }
    }
    Ok(())
}

/// Every blob a recorded list names. A list that cannot be read stops the round: nothing
/// is removed on doubt.
fn named_blobs(m: &Manager) -> Result<HashSet<String>, ShareError> {
    let mut out = HashSet::new();
    for prefix in NAMING_PREFIXES {
        let names = m.store().shared_value_names(prefix)?;
        for name in names {
            let Some(text) = m.store().shared_value(&name)? else {
                continue;
            };
            let list: Naming = serde_json::from_str(&text)
                .map_err(|e| ShareError::Bundle(format!("{name}: {e}")))?;
            out.extend(list.files.into_iter().map(|f| f.blob));
        }
    }
    Ok(out)
}

/// One round: finishes marks a crashed round left, then removes unnamed, unclaimed blobs
/// older than the grace period.
pub async fn collect(m: &Manager, blobs: &Blobs) -> Result<Round, ShareError> {
    let cut = now_ms() - grace_ms(m);
    let mut round = Round::default();
    // A mark older than the grace period is a round that stopped between marking and
    // forgetting: its blob is deleted (again) and forgotten.
    let marks = m
        .store()
        .shared_value_names(kiln_store::BLOB_DOOMED_PREFIX)?;
    for name in marks {
        let id = name.trim_start_matches(kiln_store::BLOB_DOOMED_PREFIX);
        let since = m
            .store()
            .shared_value(&name)?
            .and_then(|v| v.parse::<i64>().ok());
        if since.is_some_and(|t| t < cut) {
            if let Ok(blob) = BlobId::parse(id) {
                blobs.delete(&blob).await?;
            }
            m.write(|s| s.bury_blob(id))?;
        }
    }
    let named = named_blobs(m)?;
    for listed in blobs.list().await? {
        let id = listed.id.as_str();
        if named.contains(id) || listed.modified_ms >= cut {
            round.kept += 1;
            continue;
        }
        if !m.write(|s| s.doom_blob(id, cut, now_ms()))? {
            round.kept += 1;
            continue;
        }
        let deleted = blobs.delete(&listed.id).await;
        // Forgotten either way: an upload that claims it then finds it present (it stays
        // for the next round) or absent (and sends it again), never a mark that blocks
        // uploads until a later round finishes it.
        m.write(|s| s.bury_blob(id))?;
        deleted?;
        round.deleted += 1;
        round.bytes += listed.bytes;
    }
    Ok(round)
}

/// This node's part: templates of deleted images assembled here, then cached blobs that no
/// list names and nothing links to.
fn prune_local(m: &Manager, blobs: &Blobs) -> Result<(), ShareError> {
    let templates = crate::share::prune_imported(m);
    let named = named_blobs(m)?;
    let before = std::time::SystemTime::now() - m.cfg.blob_gc_grace;
    let (files, bytes) = blobs.prune_cache(&named, before);
    if templates + files > 0 {
        info!(
            templates,
            files, bytes, "this node's copies of what object storage no longer names removed"
        );
    }
    Ok(())
}

/// Runs a round if none ran in the cluster within the interval (each heartbeat step).
pub async fn tick(m: &Manager) {
    let Some(blobs) = m.blobs.clone() else {
        return;
    };
    let interval = m.cfg.blob_gc_interval.as_millis() as i64;
    if now_ms() - m.gc.pruned_at.load(Relaxed) >= interval {
        m.gc.pruned_at.store(now_ms(), Relaxed);
        if let Err(e) = prune_local(m, &blobs) {
            warn!("pruning this node's cache failed (retried next interval): {e}");
        }
    }
    let last = m
        .store()
        .shared_value(LAST_ROUND)
        .ok()
        .flatten()
        .and_then(|v| v.parse::<i64>().ok());
    if last.is_some_and(|t| now_ms() - t < interval) {
        return;
    }
    if m.write(|s| s.set_shared_value(LAST_ROUND, &now_ms().to_string()))
        .is_err()
    {
        return;
    }
    let started = Instant::now();
    match collect(m, &blobs).await {
        Ok(r) => {
            let c = &m.gc;
            c.rounds.fetch_add(1, Relaxed);
            c.deleted.fetch_add(r.deleted, Relaxed);
            c.bytes.fetch_add(r.bytes, Relaxed);
            info!(
                deleted = r.deleted,
                bytes = r.bytes,
                kept = r.kept,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "object storage collected"
            );
        }
        Err(e) => warn!("collecting object storage failed (the next round retries): {e}"),
    }
}
