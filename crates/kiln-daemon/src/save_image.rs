//! SaveMicrovmImage: a RUNNING microVM becomes a new image that others launch from. The
//! image is recorded CREATING, the microVM's actor forks it once into the image's staging
//! directory (the microVM pauses only for that, then runs on), and the answer goes back.
//! The template is then written in the background (the microVM's RAM as one file, its disk
//! flattened) and the image becomes SUCCESSFUL, or FAILED with the reason. A crash of kilnd
//! at any step leaves the microVM running and the image FAILED "interrupted".

use std::sync::Arc;

use kiln_api::CreateImageResponse;
use kiln_image::saved::SavedImage;
use kiln_image::{BuildError, ImageRecord};
use kiln_types::{ImageStatus, MicrovmState, VmId};
use kiln_vmm::{fault, ForkTarget, Template};
use tracing::{info, warn};

use crate::actor::Command;
use crate::error::{ApiError, ApiResult};
use crate::images::to_row;
use crate::manager::{error_chain, Manager};

impl Manager {
    /// Saves RUNNING microVM `id` as image `name`; answers once its state is captured.
    pub async fn save_image(
        self: &Arc<Self>,
        id: &str,
        name: &str,
        labels: Option<kiln_types::Labels>,
    ) -> ApiResult<CreateImageResponse> {
        let row = self.row(id)?;
        let labels = labels.unwrap_or_else(|| row.labels.clone());
        kiln_types::labels::check(&labels).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if row.state != MicrovmState::Running {
            return Err(ApiError::conflict(format!(
                "microVM {id} is {}; only a RUNNING microVM can be saved as an image",
                row.state
            )));
        }
        let source = self.store().image(&row.image_id)?.ok_or_else(|| {
            ApiError::conflict(format!("the image microVM {id} was launched from is gone"))
        })?;
        let source: ImageRecord =
            serde_json::from_value(source.record).map_err(ApiError::internal)?;
        self.check_disk("no image saved", 0)?;
        let saved = self
            .builder
            .begin_saved(name, &source, id)
            .map_err(|e| match e {
                BuildError::Invalid(_) => ApiError::bad_request(e.to_string()),
                BuildError::NameTaken(_) => ApiError::conflict(e.to_string()),
                e => ApiError::internal(error_chain(&e)),
            })?;
        let mut image = to_row(saved.record());
        image.labels = labels;
        image.node = self.cfg.node_name.clone();
        self.write(|s| s.upsert_image(&image))?;
        // Beyond the fork: the RAM file, and the flattened disk (at most its chain).
        let template = Manager::config_of(&row)?.template;
        let chain = kiln_vmm::disk::trusted_chain(&template.join("disk.qcow2"))
            .map(|files| {
                files
                    .iter()
                    .filter_map(|f| std::fs::metadata(f).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0u64);
        let extra_disk = (u64::from(source.memory_mib) << 20).saturating_add(chain);
        let target = ForkTarget {
            id: VmId::new(id).map_err(ApiError::internal)?,
            dir: saved.staging_dir(),
        };
        let captured = self
            .ask(
                id,
                "only a RUNNING microVM can be saved as an image",
                |reply| Command::Fork {
                    targets: vec![target],
                    extra_disk,
                    reply,
                },
            )
            .await;
        if let Err(e) = captured {
            self.finish_saved(
                saved,
                Err(format!("saving microVM {id} failed: {}", e.message)),
            );
            return Err(e);
        }
        fault::point("image.captured");
        let response = CreateImageResponse {
            image_identifier: saved.record().id.clone(),
            name: name.to_string(),
            status: ImageStatus::Creating,
        };
        let m = self.clone();
        tokio::spawn(async move {
            let outcome = Template::from_fork(&saved.staging_dir(), &saved.template_dir()).await;
            fault::point("image.written");
            let outcome = outcome.map(|t| t.dir().to_path_buf()).map_err(|e| {
                format!(
                    "writing the image's template failed: {}",
                    kiln_vmm::error_chain(&e)
                )
            });
            let (name, id) = m.finish_saved(saved, outcome);
            crate::images::share_then_sync(&m, &name, &id).await;
        });
        Ok(response)
    }

    /// Records the outcome on disk; the image's name and id.
    fn finish_saved(
        &self,
        saved: SavedImage,
        outcome: Result<std::path::PathBuf, String>,
    ) -> (String, String) {
        let (name, id) = (saved.record().name.clone(), saved.record().id.clone());
        match saved.finish(&self.builder, outcome) {
            Ok(record) => info!(image = %id, status = %record.status, "image saved from a microVM"),
            Err(e) => warn!(image = %id, "recording the saved image failed: {}", error_chain(&e)),
        }
        (name, id)
    }
}
