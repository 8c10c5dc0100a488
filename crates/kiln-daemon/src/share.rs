//! Images travel between nodes through object storage (`--object-store`). Once built, an
//! image's template is uploaded as content-addressed blobs: its manifest, device state, RAM
//! file, boot files, and its disk flattened into one standalone qcow2 (the layer chain under
//! it names this node's paths). The list of those blobs, the image's *bundle*, is recorded
//! in the shared store only after every blob is in: a bundle never names a blob that is not
//! whole. A node launching an image it did not build assembles the template from the
//! bundle in `KILN_HOME/imported/<image>/template`, each blob checked against its digest on
//! download (kiln-objects), and launches from it like from its own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use kiln_api::ErrorCode;
use kiln_objects::{BlobId, ObjectError};
use kiln_store::ImageRow;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

const BUNDLE_FORMAT: u32 = 1;
/// The template's own disk and manifest: replaced in the bundle by portable versions.
const DISK_FILE: &str = "disk.qcow2";
const MANIFEST_FILE: &str = kiln_vmm::manifest::MANIFEST_FILE;
/// At most this many files in a bundle (a template holds a handful).
const MAX_BUNDLE_FILES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("object storage: {}", kiln_vmm::error_chain(.0))]
    Objects(#[from] ObjectError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("flattening the template's disk: {0}")]
    Disk(#[from] kiln_vmm::disk::DiskError),
    #[error("the image's bundle is unusable: {0}")]
    Bundle(String),
    #[error("database: {0}")]
    Store(#[from] kiln_store::StoreError),
    #[error("blob {0} is being removed by garbage collection: the upload is retried later")]
    Collecting(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ShareError + '_ {
    move |source| ShareError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Bundle {
    format: u32,
    image: String,
    files: Vec<BundleFile>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct BundleFile {
    /// Relative to the bundle's directory.
    pub path: String,
    pub blob: String,
    pub mode: u32,
}

/// The prefix of the store's keys for image bundles.
pub(crate) const BUNDLE_PREFIX: &str = "image-bundle/";

/// The store's key for an image's bundle.
fn bundle_key(image: &str) -> String {
    format!("{BUNDLE_PREFIX}{image}")
}

/// Whether every node can launch `image` (its bundle is recorded).
pub fn in_object_storage(m: &Manager, image: &str) -> ApiResult<bool> {
    Ok(m.blobs.is_some() && m.store().shared_value(&bundle_key(image))?.is_some())
}

/// Uploads the template of the SUCCESSFUL image `id` (built here) and records its bundle.
pub async fn publish(m: &Manager, id: &str, template: &Path) -> Result<(), ShareError> {
    let Some(blobs) = m.blobs.clone() else {
        return Ok(());
    };
    let started = Instant::now();
    let staging = m
        .cfg
        .home
        .join("exports")
        .join(format!("{id}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let result = async {
        let portable = portable_parts(template, &staging).await?;
        let files = upload_files(m, &blobs, template, template_files(template)?, &portable).await?;
        let bundle = Bundle {
            format: BUNDLE_FORMAT,
            image: id.to_string(),
            files,
        };
        let text = serde_json::to_string(&bundle).map_err(|e| ShareError::Bundle(e.to_string()))?;
        m.write(|s| s.set_shared_value(&bundle_key(id), &text))?;
        Ok::<_, ShareError>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    info!(
        image = id,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "image uploaded to object storage: every node launches it"
    );
    Ok(())
}

/// Uploads these files of `dir` (`replaced`: a file to send instead, by name), each blob
/// claimed against garbage collection (see `crate::gc`) until the caller records the list.
pub(crate) async fn upload_files(
    m: &Manager,
    blobs: &kiln_objects::Blobs,
    dir: &Path,
    names: Vec<String>,
    replaced: &[(String, PathBuf)],
) -> Result<Vec<BundleFile>, ShareError> {
    let mut files = Vec::new();
    let mut ids = Vec::new();
    for rel in names {
        let source = replaced
            .iter()
            .find(|(name, _)| *name == rel)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| dir.join(&rel));
        let meta = std::fs::metadata(&source).map_err(io(&source))?;
        let blob = kiln_objects::digest_of(&source).await?;
        let id = blob.to_string();
        crate::gc::claim(m, std::slice::from_ref(&id))?;
        ids.push(id);
        crate::gc::renewing(m, &ids, async {
            Ok(blobs.put_file_as(&source, &blob).await?)
        })
        .await?;
        files.push(BundleFile {
            path: rel,
            blob: blob.to_string(),
            mode: meta.permissions().mode() & 0o777,
        });
    }
    crate::gc::confirm(m, blobs, &ids).await?;
    Ok(files)
}

/// The template's disk as one standalone qcow2 and its manifest naming no local backing
/// file, written into `staging`: (name in the template, file).
async fn portable_parts(
    template: &Path,
    staging: &Path,
) -> Result<Vec<(String, PathBuf)>, ShareError> {
    let manifest_path = template.join(MANIFEST_FILE);
    let text = std::fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| ShareError::Bundle(e.to_string()))?;
    let disk = staging.join(DISK_FILE);
    match manifest["disk_backing"].as_str() {
        Some(base) => {
            kiln_vmm::disk::flatten(&template.join(DISK_FILE), Path::new(base), &disk).await?
        }
        None => {
            std::fs::copy(template.join(DISK_FILE), &disk).map_err(io(&disk))?;
        }
    }
    manifest["disk_backing"] = serde_json::Value::Null;
    let portable_manifest = staging.join(MANIFEST_FILE);
    let bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ShareError::Bundle(e.to_string()))?;
    std::fs::write(&portable_manifest, bytes).map_err(io(&portable_manifest))?;
    for p in [&disk, &portable_manifest] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).map_err(io(p))?;
    }
    Ok(vec![
        (DISK_FILE.to_string(), disk),
        (MANIFEST_FILE.to_string(), portable_manifest),
    ])
}

/// Every regular file under `dir`, relative, sorted.
pub(crate) fn template_files(dir: &Path) -> Result<Vec<String>, ShareError> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let here = dir.join(&rel);
        for entry in std::fs::read_dir(&here).map_err(io(&here))? {
            let entry = entry.map_err(io(&here))?;
            let kind = entry.file_type().map_err(io(&here))?;
            let child = rel.join(entry.file_name());
            if kind.is_dir() {
                todo.push(child);
            } else if kind.is_file() {
                out.push(child.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Where `img`'s template is on this node: its own build's, or assembled from its bundle
/// (downloaded on a miss). `None`: the image is not shared, so it runs where it was built.
pub async fn local_template(m: &Manager, img: &ImageRow) -> ApiResult<Option<PathBuf>> {
    let Some(blobs) = m.blobs.clone() else {
        return Ok(None);
    };
    let Some(text) = m.store().shared_value(&bundle_key(&img.id))? else {
        return Ok(None);
    };
    let dir = imported_dir(m, &img.id)?;
    let template = dir.join("template");
    if template.is_dir() {
        return Ok(Some(template));
    }
    let _one = m.imports.lock().await;
    if template.is_dir() {
        return Ok(Some(template));
    }
    let started = Instant::now();
    assemble(&blobs, &text, &dir).await.map_err(|e| {
        to_api(
            format!("image {} could not be fetched from object storage", img.id),
            e,
        )
    })?;
    info!(
        image = %img.id,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "image fetched from object storage"
    );
    crate::placement::mark_cached(m, &img.id);
    Ok(Some(template))
}

/// `what` failed because of `e`, for the API: 503 when object storage is unreachable.
pub(crate) fn to_api(what: String, e: ShareError) -> ApiError {
    let message = format!("{what}: {e}");
    warn!("{message}");
    match &e {
        ShareError::Objects(o) if o.is_unavailable() => ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!("{message}; nothing was started: retry once it is back"),
        ),
        _ => ApiError::internal(message),
    }
}

/// Where `img`'s template is on this node: its build's, or fetched from object storage.
pub async fn template_here(m: &Manager, img: &ImageRow) -> ApiResult<PathBuf> {
    if img.node.is_empty() || img.node == m.cfg.node_name {
        return img.record["template"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| ApiError::internal(format!("image {} has no template", img.id)));
    }
    local_template(m, img).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!(
                "image {} is not in object storage yet: only node {:?} holds it",
                img.id, img.node
            ),
        )
    })
}

/// `KILN_HOME/imported/<image>` (an image id is a name and a hex suffix).
fn imported_dir(m: &Manager, id: &str) -> ApiResult<PathBuf> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(ApiError::internal(format!(
            "image id {id:?} is no file name"
        )));
    }
    Ok(m.cfg.home.join("imported").join(id))
}

/// Fetches the bundle's blobs and links them into `dir/template`.
async fn assemble(blobs: &kiln_objects::Blobs, text: &str, dir: &Path) -> Result<(), ShareError> {
    let bundle: Bundle =
        serde_json::from_str(text).map_err(|e| ShareError::Bundle(e.to_string()))?;
    if bundle.format != BUNDLE_FORMAT || bundle.files.len() > MAX_BUNDLE_FILES {
        return Err(ShareError::Bundle(format!(
            "format {} with {} files (this kilnd reads format {BUNDLE_FORMAT}, at most \
             {MAX_BUNDLE_FILES} files)",
            bundle.format,
            bundle.files.len()
        )));
    }
    fetch_into(
        blobs,
        &bundle.files,
        &dir.join("template.part"),
        &dir.join("template"),
        true,
    )
    .await
}

/// Fetches `files` into `part`, then renames it to `dest`, which appears whole or not at
/// all. Linked from the cache (`link`: files nothing writes), or copied.
pub(crate) async fn fetch_into(
    blobs: &kiln_objects::Blobs,
    files: &[BundleFile],
    part: &Path,
    dest: &Path,
    link: bool,
) -> Result<(), ShareError> {
    let _ = std::fs::remove_dir_all(part);
    std::fs::create_dir_all(part).map_err(io(part))?;
    let result = async {
        for f in files {
            let rel = relative(&f.path)?;
            let id = BlobId::parse(&f.blob)?;
            let cached = blobs.fetch(&id).await?;
            let to = part.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            if !link || std::fs::hard_link(&cached, &to).is_err() {
                std::fs::copy(&cached, &to).map_err(io(&to))?;
            }
            // Linked files are read-only for everyone (a jailed QEMU reads them as another
            // user); copies keep their permissions.
            let mode = if link {
                f.mode & 0o555 | 0o444
            } else {
                f.mode & 0o777
            };
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                .map_err(io(&to))?;
        }
        std::fs::rename(part, dest).map_err(io(dest))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(part);
    }
    result
}

/// A bundle's path as a relative path that stays inside the template directory.
pub(crate) fn relative(path: &str) -> Result<&Path, ShareError> {
    let p = Path::new(path);
    let inside = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if inside {
        Ok(p)
    } else {
        Err(ShareError::Bundle(format!(
            "{path:?} leaves the template directory"
        )))
    }
}

/// How many rounds of [`publish_missing`] an image waits after its `failures`-th failed
/// upload in a row: the next round while object storage is unreachable (that is no fault
/// of the image, and each round stops at the first such failure), else twice as long each
/// time, up to 32 rounds (an image whose upload fails by itself is not flattened again
/// every round).
fn rounds_to_wait(failures: u32, unavailable: bool) -> u32 {
    if unavailable {
        1
    } else {
        1 << failures.saturating_sub(1).min(5)
    }
}

/// Uploads every SUCCESSFUL image built here that has no bundle yet (built before
/// `--object-store` was given, or while object storage was down): at start, then every
/// few heartbeats (one round), each image backing off after failures.
pub async fn publish_missing(m: &Manager) {
    if m.blobs.is_none() {
        return;
    }
    let Ok(images) = m.store().all_images() else {
        return;
    };
    let round = {
        let mut backoff = m.publish_backoff.lock().unwrap_or_else(|p| p.into_inner());
        backoff.round += 1;
        backoff.round
    };
    for img in images {
        let mine = img.node.is_empty() || img.node == m.cfg.node_name;
        let successful = img.status == kiln_types::ImageStatus::Successful;
        let template = img.record["template"].as_str().map(PathBuf::from);
        let (true, true, Some(t)) = (successful, mine, template) else {
            continue;
        };
        if in_object_storage(m, &img.id).unwrap_or(true) {
            continue;
        }
        let due = {
            let backoff = m.publish_backoff.lock().unwrap_or_else(|p| p.into_inner());
            backoff
                .images
                .get(&img.id)
                .is_none_or(|&(_, at)| at <= round)
        };
        if !due {
            continue;
        }
        let result = publish(m, &img.id, &t).await;
        let mut backoff = m.publish_backoff.lock().unwrap_or_else(|p| p.into_inner());
        let Err(e) = result else {
            backoff.images.remove(&img.id);
            continue;
        };
        let unavailable = matches!(&e, ShareError::Objects(o) if o.is_unavailable());
        let failures = backoff.images.get(&img.id).map_or(0, |&(f, _)| f) + 1;
        let wait = rounds_to_wait(failures, unavailable);
        backoff
            .images
            .insert(img.id.clone(), (failures, round + u64::from(wait)));
        warn!(image = %img.id, failures, "uploading the image failed (again in {wait} rounds): {e}");
        if unavailable {
            // The others would fail the same way: the next round tries again.
            break;
        }
    }
}

/// [`publish_missing`]'s rounds, and per image its failures in a row and the round it is
/// tried again at.
#[derive(Debug, Default)]
pub struct PublishBackoff {
    round: u64,
    images: std::collections::HashMap<String, (u32, u64)>,
}

/// Forgets an image's bundle (its blobs go at the next collection unless another list
/// names them, see `crate::gc`) and removes this node's copy of its template; the other
/// nodes remove theirs at their next prune ([`prune_imported`]).
pub fn forget(m: &Manager, id: &str) {
    if m.blobs.is_none() {
        return;
    }
    if let Err(e) = m.write(|s| s.delete_shared_value(&bundle_key(id))) {
        warn!(image = id, "forgetting the image's bundle failed: {e}");
    }
    crate::placement::forget_cached(m, id);
    if let Ok(dir) = imported_dir(m, id) {
        m.pool.forget_under(m, &dir);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes the templates assembled here of images whose bundle is gone (deleted through
/// another node): how many. Deleting an image needs it to have no live microVM.
pub fn prune_imported(m: &Manager) -> usize {
    let Ok(entries) = std::fs::read_dir(m.cfg.home.join("imported")) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let Some(id) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let gone = matches!(m.store().shared_value(&bundle_key(&id)), Ok(None));
        let unused = m
            .store()
            .live_microvms_of_image(&id)
            .is_ok_and(|l| l.is_empty());
        if gone && unused {
            m.pool.forget_under(m, &e.path());
            crate::placement::forget_cached(m, &id);
            if std::fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_uploads_back_off_unless_the_storage_is_down() {
        assert_eq!(
            (1..=8)
                .map(|f| rounds_to_wait(f, false))
                .collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 32, 32]
        );
        assert!((1..=8).all(|f| rounds_to_wait(f, true) == 1));
    }

    #[test]
    fn bundle_paths_stay_inside_the_template() {
        for good in ["disk.qcow2", "boot/kernel/vmlinux"] {
            assert!(relative(good).is_ok(), "{good}");
        }
        for bad in ["", "/etc/passwd", "../x", "boot/../../x", "./x"] {
            assert!(relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn template_files_are_listed_relative_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("boot/kernel")).unwrap();
        for f in [
            "manifest.json",
            "boot/kernel/vmlinux",
            "boot/initramfs.cpio",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        assert_eq!(
            template_files(dir.path()).unwrap(),
            [
                "boot/initramfs.cpio",
                "boot/kernel/vmlinux",
                "manifest.json"
            ]
        );
    }
}
