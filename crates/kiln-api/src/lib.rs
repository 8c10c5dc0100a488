//! The REST API's types, one definition each: kilnd serves them, kiln-client returns them,
//! the CLI and MCP print them, and `spec/openapi.yaml` is generated from them (utoipa).
//! Field names are camelCase, as in the seed's calls (imageIdentifier, microvmId, …).
#![forbid(unsafe_code)]

mod error;
pub mod files;
pub mod fuzzing;
mod image;
mod labels;
mod microvm;
mod node;
pub mod process;
mod system;
mod token;
mod webhook;

pub use error::{ErrorBody, ErrorCode};
pub use files::{
    FileEntry, FileEvent, FileEventKind, FileKind, FileList, FilePathQuery, FileWatchEventName,
    FileWatchSse, ListFilesQuery, MakeDirectoryRequest, MoveFileRequest, RemoveFileQuery,
    WriteFileQuery,
};
pub use image::{
    Artifact, ArtifactFormat, BuildStep, CodeArtifact, CreateImageRequest, CreateImageResponse,
    Image, ImageList, ListImagesQuery, LogsQuery, SaveMicrovmImageRequest, MAX_DISK_MIB,
    MAX_READY_TIMEOUT_SECONDS,
};
pub use kiln_types::{
    Connector, Destination, ImageStatus, Labels, MicrovmState, NetworkCounters,
    ParseImageStatusError, ParseStateError, TokenKind,
};
pub use microvm::{
    AppLogs, AppLogsQuery, ExecRequest, ExecResponse, ForkMicrovmRequest, ForkMicrovmResponse,
    GetMicrovmQuery, IdlePolicy, ListMicrovmsQuery, MetricsQuery, Microvm, MicrovmList,
    MicrovmMetrics, MicrovmMetricsHistory, RunMicrovmRequest, RunMicrovmResponse,
    UpdateLabelsRequest, Usage, DEFAULT_PAGE, MAX_FORK_COUNT, MAX_PAGE, MAX_WAIT_SECONDS,
    METRICS_KEPT,
};
pub use node::{Node, NodeCapacity, NodeList};
pub use process::{
    GetProcessQuery, ListProcessesQuery, OutputStreamName, Process, ProcessList,
    ProcessOutputEvent, ProcessOutputEventName, ProcessOutputQuery, ProcessOutputSse,
    SignalProcessRequest, StartProcessRequest, TerminalSize, WriteStdinQuery,
};
pub use system::{
    EndpointStyle, Event, EventList, EventStreamEventName, EventStreamQuery, EventStreamSse,
    EventsQuery, Health, IngressInfo, JailInfo, MAX_EVENT_STREAMS,
};
pub use token::{
    AllowedPort, AuthTokenHeaders, CreateTokenRequest, CreateTokenResponse, RotateKeyResponse,
};
pub use webhook::{
    CreateWebhookRequest, Delivery, DeliveryList, DeliveryStatus, Webhook, WebhookList,
    WebhookPayload, MAX_WEBHOOKS, WEBHOOK_EVENT_KINDS,
};
