//! Image builds started through the API: recorded in the store as CREATING, baked in the
//! background, then synced from the build's record.

use std::path::PathBuf;
use std::sync::Arc;

use kiln_image::{BuildSpec, ImageRecord};
use kiln_store::ImageRow;
use tracing::{info, warn};

use crate::manager::Manager;

/// Copies a build's on-disk record into the store.
pub fn sync_image(manager: &Manager, name: &str, id: &str) {
    let dir = manager.builder.build_dir(name, id);
    match ImageRecord::read(&dir) {
        Ok(record) => {
            let row = to_row(&record);
            if let Err(e) = manager.write(|s| s.upsert_image(&row)) {
                warn!(id, "storing image failed: {e}");
            }
        }
        Err(e) => warn!(id, "image record unreadable: {e}"),
    }
}

/// Uploads a SUCCESSFUL build's template (in a cluster with object storage) before the
/// store shows it SUCCESSFUL, so that every node can launch it from then on; then syncs
/// the record. An upload that fails leaves the image SUCCESSFUL on this node (its microVMs
/// run here), and is tried again when kilnd starts.
pub async fn share_then_sync(manager: &Manager, name: &str, id: &str) {
    let dir = manager.builder.build_dir(name, id);
    if let Ok(record) = ImageRecord::read(&dir) {
        if let (kiln_types::ImageStatus::Successful, Some(t)) = (record.status, &record.template) {
            if let Err(e) = crate::share::publish(manager, id, t).await {
                warn!(id, "uploading the image to object storage failed: {e}");
            }
        }
    }
    sync_image(manager, name, id);
}

pub fn to_row(record: &ImageRecord) -> ImageRow {
    ImageRow {
        id: record.id.clone(),
        name: record.name.clone(),
        status: record.status,
        reason: record.reason.clone(),
        created_at: record.created_unix as i64 * 1000,
        record: serde_json::to_value(record).unwrap_or_default(),
        // Kept as the store has them: an upsert never changes an image's labels or node.
        labels: kiln_types::Labels::new(),
        node: String::new(),
    }
}

/// Starts a bake with these labels (checked by the caller); returns the build id at once.
pub fn start_build(
    manager: &Arc<Manager>,
    mut spec: BuildSpec,
    labels: kiln_types::Labels,
) -> String {
    let id = format!("{}-{:x}", spec.name, kiln_store::now_ms());
    spec.id = Some(id.clone());
    let placeholder = ImageRow {
        id: id.clone(),
        name: spec.name.clone(),
        status: kiln_types::ImageStatus::Creating,
        reason: None,
        created_at: kiln_store::now_ms(),
        record: serde_json::json!({"id": id, "name": spec.name, "status": "CREATING"}),
        labels,
        node: manager.cfg.node_name.clone(),
    };
    if let Err(e) = manager.write(|s| s.upsert_image(&placeholder)) {
        warn!(id, "storing image failed: {e}");
    }
    let (m, name, bid) = (manager.clone(), spec.name.clone(), id.clone());
    tokio::spawn(async move {
        match m.builder.build(spec).await {
            Ok(_) => share_then_sync(&m, &name, &bid).await,
            Err(e) => {
                let mut row = placeholder;
                row.status = kiln_types::ImageStatus::Failed;
                row.reason = Some(e.to_string());
                let _ = m.write(|s| s.upsert_image(&row));
            }
        }
    });
    id
}

/// Where uploaded build-context artifacts are kept.
pub fn artifacts_dir(manager: &Manager) -> PathBuf {
    manager.cfg.home.join("artifacts")
}

/// An uploaded build context no image build refers to is removed this long after its
/// upload (the build requests of kept images keep theirs, to be submitted again).
pub const ARTIFACT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// A partial upload (kilnd died while receiving it) is removed after this long.
const PARTIAL_UPLOAD_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes artifacts no image refers to once older than [`ARTIFACT_TTL`], and partial
/// uploads left by a crash. If the images cannot be read, nothing is removed. Returns how
/// many files went.
pub fn sweep_artifacts(manager: &Manager) -> usize {
    let Ok(images) = manager.store().all_images() else {
        return 0;
    };
    let referenced: std::collections::HashSet<String> = images
        .iter()
        .filter_map(|i| i.record["request"]["codeArtifact"]["artifactId"].as_str())
        .map(str::to_string)
        .collect();
    let Ok(entries) = std::fs::read_dir(artifacts_dir(manager)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let id = name
            .strip_suffix(".zip")
            .or_else(|| name.strip_suffix(".tar"));
        let stale = if name.starts_with('.') && name.ends_with(".upload") {
            age > PARTIAL_UPLOAD_TTL
        } else if let Some(id) = id.filter(|id| id.starts_with("art-")) {
            age > ARTIFACT_TTL && !referenced.contains(id)
        } else {
            false
        };
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            info!(artifact = %name, "removed an unused build context");
            removed += 1;
        }
    }
    removed
}
