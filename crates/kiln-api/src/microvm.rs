//! MicroVMs: RunMicrovm, GetMicrovm, ListMicrovms, suspend, resume, terminate, exec, logs.

use std::collections::BTreeMap;

use kiln_types::{Connector, Labels, MicrovmState, NetworkCounters};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The longest a `waitFor` request waits (seconds).
pub const MAX_WAIT_SECONDS: u64 = 300;

/// When a microVM suspends on its own, how long it stays suspended, and whether a request
/// to its endpoint resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdlePolicy {
    /// Seconds without activity before it is suspended (API minimum 60; kilnd
    /// --min-idle-seconds may lower it).
    #[serde(deserialize_with = "kiln_types::whole::de")]
    #[schema(minimum = 60)]
    pub max_idle_duration_seconds: u64,
    /// Seconds it stays SUSPENDED before it is terminated.
    #[serde(deserialize_with = "kiln_types::whole::de")]
    pub suspended_duration_seconds: u64,
    /// A request to its endpoint resumes it.
    pub auto_resume_enabled: bool,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy {
            max_idle_duration_seconds: 300,
            suspended_duration_seconds: 1800,
            auto_resume_enabled: true,
        }
    }
}

/// RunMicrovm's request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunMicrovmRequest {
    /// An image name (its newest successful build) or a build id.
    pub image_identifier: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_policy: Option<IdlePolicy>,
    /// The body of the app's `/run` hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 16384)]
    pub run_hook_payload: Option<String>,
    /// The microVM is terminated after this long (default and most: 8 hours).
    #[serde(
        default,
        deserialize_with = "kiln_types::whole::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 28800)]
    pub max_duration_seconds: Option<u64>,
    /// Accepted and ignored: kiln has no IAM roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_role_arn: Option<String>,
    /// Egress connectors; `[{"type": "internet"}]` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 64)]
    pub connectors: Option<Vec<Connector>>,
    /// Labels (`key: value`, at most 64; keys of letters, digits, `._-/`), returned
    /// everywhere and matched by ListMicrovms' `label` filter. Clones of a fork inherit them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::labels::labels)]
    pub labels: Option<Labels>,
}

/// UpdateMicrovm's request: labels to set (a value) or remove (`null`); others are kept.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateLabelsRequest {
    #[serde(default)]
    #[schema(schema_with = crate::labels::label_changes)]
    pub labels: BTreeMap<String, Option<String>>,
}

/// The most items one list page holds (`limit`), and how many it holds without one.
pub const MAX_PAGE: u32 = 1000;
pub const DEFAULT_PAGE: u32 = 100;

/// RunMicrovm's answer: the microVM is PENDING and launching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunMicrovmResponse {
    #[schema(example = "mvm-0123456789abcdef")]
    pub microvm_id: String,
    /// Where its app is reached: `http(s)://{endpoint}/…` works as it is. `ID.DOMAIN:PORT`
    /// (host style) or `ADDRESS:PORT/m/ID` (path style), as kilnd chose at start
    /// (`GET /v1/ingress` says which).
    pub endpoint: String,
    pub state: MicrovmState,
}

/// The most clones one ForkMicrovm makes.
pub const MAX_FORK_COUNT: u64 = 100;

/// ForkMicrovm's request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForkMicrovmRequest {
    /// How many clones (1 to 100; 1 when absent).
    #[serde(
        default,
        deserialize_with = "kiln_types::whole::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 100)]
    pub count: Option<u64>,
}

/// ForkMicrovm's answer: the clones, each SUSPENDED or RESUMING from the parent's copy, on
/// the way to RUNNING (`waitFor=RUNNING` waits for one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForkMicrovmResponse {
    pub parent_microvm_id: String,
    pub microvms: Vec<RunMicrovmResponse>,
}

/// Metering, as the seed bills.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub running_seconds: f64,
    /// Burst: CPU-seconds above the baseline.
    pub cpu_seconds_above_baseline: f64,
    pub suspended_snapshot_byte_seconds: f64,
    /// CPU time used, read from the microVM's cgroup.
    #[serde(default)]
    pub cpu_seconds: f64,
    /// CPUs held to once the burst credit is spent.
    #[serde(default)]
    pub cpu_baseline: f64,
    /// Burst credit left, in CPU-seconds above the baseline.
    #[serde(default)]
    pub cpu_credit_seconds: f64,
    #[serde(default)]
    pub network: NetworkCounters,
}

/// A microVM (GetMicrovm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Microvm {
    pub microvm_id: String,
    pub image_identifier: String,
    pub image_name: String,
    pub state: MicrovmState,
    /// Why it is in this state (which call or policy, or what failed).
    pub state_reason: Option<String>,
    pub endpoint: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last request, stream or exec.
    pub last_activity_at: i64,
    pub idle_policy: IdlePolicy,
    pub max_duration_seconds: u64,
    pub usage: Usage,
    pub connectors: Vec<Connector>,
    /// For a SUSPENDED microVM this host cannot resume (snapshot taken with another QEMU or
    /// machine): the differences. Such a microVM is kept, never terminated by policy;
    /// download its disk, then terminate it.
    pub resume_blocked_reason: Option<String>,
    #[serde(default)]
    #[schema(schema_with = crate::labels::labels)]
    pub labels: Labels,
    /// The newest metrics sample, while it runs (see GetMicrovmMetrics for the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MicrovmMetrics>,
    /// The kilnd node that owns it (`--node-name`); any node serves it.
    #[serde(default)]
    pub node: String,
    /// Set while the microVM is UNREACHABLE: its node's lease ran out (kilnd there stopped
    /// or lost the database). It is not started elsewhere; calls about it answer 503 until
    /// that node is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}

/// One sample of a running microVM's metrics, taken every `--tick-ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmMetrics {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// CPU used since the previous sample, in percent of one CPU (100: one CPU busy).
    pub cpu_percent: f64,
    /// CPU-seconds used since launch (as `usage.cpuSeconds`).
    pub cpu_seconds: f64,
    /// Host memory of the microVM's QEMU: its proportional set size (pages shared with
    /// other microVMs of the image are counted by share).
    pub host_memory_bytes: u64,
    /// Host disk the microVM's own disk overlay takes (allocated blocks).
    pub host_disk_bytes: u64,
    /// The guest's own figures (absent when its agent is older than protocol generation 4
    /// or did not answer in time).
    pub guest_memory_total_bytes: Option<u64>,
    pub guest_memory_available_bytes: Option<u64>,
    pub guest_disk_total_bytes: Option<u64>,
    pub guest_disk_used_bytes: Option<u64>,
    /// Bytes through its egress backend since launch.
    pub network_bytes_in: u64,
    pub network_bytes_out: u64,
}

/// GetMicrovmMetrics: the samples kilnd keeps (the last [`METRICS_KEPT`]), oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmMetricsHistory {
    pub microvm_id: String,
    /// Milliseconds between samples (kilnd's `--tick-ms`).
    pub interval_ms: u64,
    pub samples: Vec<MicrovmMetrics>,
}

/// Samples kept per microVM.
pub const METRICS_KEPT: usize = 300;

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Only samples taken after this time (Unix milliseconds).
    #[param(minimum = 0)]
    pub since_ms: Option<i64>,
}

/// One page of ListMicrovms, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicrovmList {
    pub microvms: Vec<Microvm>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListMicrovmsQuery {
    /// Only microVMs in this state.
    pub state: Option<MicrovmState>,
    /// Only microVMs of this image (name or build id).
    pub image_identifier: Option<String>,
    /// The same as `imageIdentifier`.
    pub image: Option<String>,
    /// Only microVMs with this label: `key=value`, or `key` for any value. Repeat it for
    /// all of several.
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GetMicrovmQuery {
    /// Answer once the microVM is in this state (or TERMINATED, which it never leaves), or
    /// when `timeoutSeconds` have passed, with the microVM as it is then.
    pub wait_for: Option<MicrovmState>,
    /// How long `waitFor` waits (default 60).
    #[param(minimum = 0, maximum = 300)]
    pub timeout_seconds: Option<u64>,
}

/// A command to run in a RUNNING microVM (no shell: wrap it in `sh -c` for one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments.
    #[schema(min_items = 1, example = json!(["sh", "-c", "echo hello"]))]
    pub command: Vec<String>,
    /// Default 60, 1 to 3600.
    #[serde(
        default,
        deserialize_with = "kiln_types::whole::de_opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecResponse {
    pub stdout: String,
    pub stderr: String,
    /// None when a signal ended it or it timed out. A program that cannot start answers as
    /// a shell would: 127 (not found) or 126 (not executable), the reason on stderr.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AppLogsQuery {
    /// The newest this many bytes (default 64 KiB, at most 1 MiB).
    #[param(minimum = 1, maximum = 1048576)]
    pub max_bytes: Option<u32>,
}

/// The app's stdout and stderr, interleaved, as the guest keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppLogs {
    pub microvm_id: String,
    pub logs: String,
}
