//! Images saved from a running microVM ("save as image"): the microVM's memory, processes
//! and disk become a new image's template, launched like any other. The record lives where
//! a build's does (`<images>/<name>/<id>/image.json`), CREATING under the build lock until
//! the template is written, so an interrupted save is recovered like an interrupted build
//! (FAILED "interrupted", its partial files removed).

use std::path::PathBuf;

use crate::build::{io, now, valid_image_name};
use crate::{BuildError, Builder, ImageRecord, ImageStatus};

/// Where a save writes: the fork clone it starts from, then the template made of it.
const STAGING_DIR: &str = "vm";
const TEMPLATE_DIR: &str = "template";

/// A save in progress: its CREATING record, held under the build lock.
#[derive(Debug)]
pub struct SavedImage {
    dir: PathBuf,
    record: ImageRecord,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Builder {
    /// Starts saving microVM `microvm` (launched from image `source`) as a new image `name`:
    /// records it CREATING with `source`'s runtime settings. A name that has a Dockerfile
    /// build is refused: a saved image would hide that build from `kiln image rebuild`.
    pub fn begin_saved(
        &self,
        name: &str,
        source: &ImageRecord,
        microvm: &str,
    ) -> Result<SavedImage, BuildError> {
        if !valid_image_name(name) {
            return Err(BuildError::Invalid(format!(
                "name {name:?}: use 1-40 characters of a-z, 0-9 and '-', not starting with '-'"
            )));
        }
        if let Some(built) = self.find(name).filter(|r| r.saved_from.is_none()) {
            return Err(BuildError::NameTaken(format!(
                "image {name} is built from a Dockerfile (build {}): save under another name",
                built.id
            )));
        }
        let id = format!("{name}-{:x}", now_millis());
        let dir = self.build_dir(name, &id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock_path = dir.join(".lock");
        let lock_file = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| BuildError::Io {
                path: lock_path.clone(),
                source: e.into(),
            })?;
        let record = ImageRecord {
            id,
            name: name.to_string(),
            status: ImageStatus::Creating,
            reason: None,
            log_tail: None,
            base: source.base.clone(),
            steps: Vec::new(),
            created_unix: now(),
            finished_unix: None,
            template: None,
            image_key: None,
            request: None,
            saved_from: Some(microvm.to_string()),
            ..source.clone()
        };
        record.write(&dir)?;
        Ok(SavedImage {
            dir,
            record,
            _lock: lock,
        })
    }
}

fn now_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl SavedImage {
    pub fn record(&self) -> &ImageRecord {
        &self.record
    }

    /// Where the microVM's fork clone is written (it must not exist yet).
    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join(STAGING_DIR)
    }

    /// Where the template goes.
    pub fn template_dir(&self) -> PathBuf {
        self.dir.join(TEMPLATE_DIR)
    }

    /// Records the outcome: SUCCESSFUL with `outcome`'s template (and the image's name now
    /// means this build), or FAILED with its reason and nothing left but the record.
    pub fn finish(
        mut self,
        builder: &Builder,
        outcome: Result<PathBuf, String>,
    ) -> Result<ImageRecord, BuildError> {
        self.record.finished_unix = Some(now());
        let succeeded = outcome.is_ok();
        match outcome {
            Ok(template) => {
                self.record.status = ImageStatus::Successful;
                self.record.template = Some(template);
            }
            Err(reason) => {
                self.record.status = ImageStatus::Failed;
                self.record.reason = Some(reason);
                let _ = std::fs::remove_dir_all(self.staging_dir());
                let _ = std::fs::remove_dir_all(self.template_dir());
            }
        }
        self.record.write(&self.dir)?;
        if succeeded {
            kiln_vmm::fault::point("image.recorded");
            let current = builder.images_dir.join(&self.record.name).join("current");
            std::fs::write(&current, &self.record.id).map_err(io(&current))?;
        }
        let _ = std::fs::remove_file(self.dir.join(".lock"));
        Ok(self.record)
    }
}
