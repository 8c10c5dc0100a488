//! Images: CreateMicrovmImage, GetMicrovmImage, ListMicrovmImages, build artifacts.

use std::collections::BTreeMap;

use kiln_types::{Connector, ImageStatus, Labels};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Most a root disk may grow to (MiB).
pub const MAX_DISK_MIB: u32 = 256 * 1024;
/// Longest a build may wait for the app's `/ready` (seconds).
pub const MAX_READY_TIMEOUT_SECONDS: u64 = 3600;

/// An uploaded build context (`POST /v1/artifacts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Give it to CreateMicrovmImage as `codeArtifact.artifactId`.
    #[schema(example = "art-0123456789abcdef")]
    pub artifact_id: String,
    pub bytes: u64,
    pub format: ArtifactFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactFormat {
    Zip,
    Tar,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CodeArtifact {
    /// An id `POST /v1/artifacts` returned.
    #[schema(pattern = "^art-[0-9a-f]{16}$", example = "art-0123456789abcdef")]
    pub artifact_id: String,
}

/// CreateMicrovmImage's request. Recorded with the build (`buildRequest` in
/// GetMicrovmImage) so that `kiln image rebuild` can submit it again.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateImageRequest {
    /// The image's name; RunMicrovm takes it (newest successful build) or a build id.
    #[schema(min_length = 1, max_length = 40, pattern = "^[a-z0-9][a-z0-9-]*$")]
    pub name: String,
    pub code_artifact: CodeArtifact,
    /// The Dockerfile's text; default: `Dockerfile` in the build context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// Guest memory; default 512.
    #[serde(
        default,
        deserialize_with = "kiln_types::whole::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 512, maximum = 8192)]
    pub memory_size_mib: Option<u32>,
    #[serde(
        default,
        deserialize_with = "kiln_types::whole::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 8)]
    pub vcpus: Option<u8>,
    /// CPUs the microVM is held to once its burst credit is spent (fractions allowed);
    /// it bursts to 4x. Default: a quarter of `vcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_baseline: Option<f64>,
    #[serde(
        default,
        deserialize_with = "kiln_types::whole::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 64, maximum = 262144)]
    pub disk_size_mib: Option<u32>,
    /// The port the app answers lifecycle hooks on (default 9000).
    #[serde(
        default,
        deserialize_with = "kiln_types::whole::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1)]
    pub hook_port: Option<u16>,
    #[serde(
        default,
        deserialize_with = "kiln_types::whole::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 3600)]
    pub ready_timeout_seconds: Option<u64>,
    /// Answer once the build has ended instead of at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_ready: Option<bool>,
    /// Check the request and the Dockerfile without building.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate: Option<bool>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub build_args: BTreeMap<String, String>,
    /// Accepted for compatibility with the seed's calls; kiln needs no roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_role_arn: Option<String>,
    /// Accepted for compatibility with the seed's calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image_arn: Option<String>,
    /// Egress connectors of the build's RUN steps; `[{"type": "internet"}]` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 64)]
    pub connectors: Option<Vec<Connector>>,
    /// The image's labels (as RunMicrovm's), matched by ListMicrovmImages' `label` filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::labels::labels)]
    pub labels: Option<Labels>,
}

/// CreateMicrovmImage's answer: the build has started (`status` CREATING); follow it with
/// GetMicrovmImage or its logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateImageResponse {
    pub image_identifier: String,
    pub name: String,
    pub status: ImageStatus,
}

/// One Dockerfile step of a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuildStep {
    pub number: usize,
    /// Its line in the Dockerfile.
    pub line: usize,
    pub text: String,
    /// The layer cache key.
    pub key: String,
    /// Taken from the layer cache instead of run.
    pub cached: bool,
    pub millis: u64,
}

/// An image build (GetMicrovmImage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    #[schema(example = "app-18c9d3e2f41")]
    pub image_identifier: String,
    pub name: String,
    pub status: ImageStatus,
    /// Why it FAILED or needs a rebuild.
    pub status_reason: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    pub memory_size_mib: Option<u32>,
    pub vcpus: Option<u8>,
    pub cpu_baseline: Option<f64>,
    pub hook_port: Option<u16>,
    pub exposed_ports: Vec<u16>,
    pub steps: Vec<BuildStep>,
    /// The end of the build log, when the build ended.
    pub log_tail: Option<String>,
    /// The request that made this build (`kiln image rebuild NAME` sends it again).
    pub build_request: Option<CreateImageRequest>,
    /// The microVM this image was saved from (SaveMicrovmImage), for an image not built
    /// from a Dockerfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_microvm_id: Option<String>,
    /// The labels given at creation or by UpdateMicrovmImage (not the Dockerfile's LABELs).
    #[serde(default)]
    #[schema(schema_with = crate::labels::labels)]
    pub labels: Labels,
}

/// SaveMicrovmImage's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SaveMicrovmImageRequest {
    /// The new image's name: 1-40 of a-z, 0-9 and '-', not starting with '-'. A name with
    /// a Dockerfile build is refused; saving under a saved image's name makes a newer build
    /// of it.
    #[schema(
        example = "app-warm",
        max_length = 40,
        pattern = "^[a-z0-9][a-z0-9-]{0,39}$"
    )]
    pub name: String,
    /// The new image's labels (default: the microVM's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::labels::labels)]
    pub labels: Option<Labels>,
}

/// One page of ListMicrovmImages (the newest build of each name), by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageList {
    pub images: Vec<Image>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListImagesQuery {
    /// Only images with this status.
    pub status: Option<ImageStatus>,
    /// Only images with this label: `key=value`, or `key` for any value. Repeat it for all
    /// of several.
    #[serde(default)]
    #[param(schema_with = crate::labels::label_filters)]
    pub label: Vec<String>,
    /// At most this many per page (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The previous page's `nextCursor`.
    #[param(pattern = "^[a-z0-9.-]{1,160}$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Stream the log as it grows until the build ends.
    #[serde(default)]
    pub follow: bool,
}
