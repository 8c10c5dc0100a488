//! kilnd itself: health, the ingress, events.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `GET /health` (no key needed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
    /// `kvm`, or `tcg` (emulation: development only).
    #[schema(example = "kvm")]
    pub accelerator: String,
    /// Guests run under emulation: slow, and not an isolation boundary to rely on.
    pub dev_mode: bool,
    pub warning: Option<String>,
    pub jail: JailInfo,
}

/// The jail every QEMU runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JailInfo {
    /// False only with kilnd `--no-jail` (development only).
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// The host uids jailed processes run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uids_in_use: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Per controller: its version and directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<String>,
}

/// How clients reach microVM endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressInfo {
    /// Host-style endpoints are `ID.DOMAIN:PORT`.
    pub domain: String,
    pub port: u16,
    /// How endpoints are written: `ID.DOMAIN:PORT` (host) or `ADDRESS:PORT/m/ID` (path, the
    /// prefix stripped before the app sees the request, which gets it in
    /// `X-Forwarded-Prefix`). The ingress accepts both styles.
    pub endpoint_style: EndpointStyle,
    /// The address the ingress listens on.
    pub listen: String,
    /// The ingress speaks TLS.
    pub tls: bool,
    /// kilnd's own CA certificate (PEM), when it serves one (`--ingress-tls-self-signed`).
    pub ca_certificate: Option<String>,
}

/// How a microVM's `endpoint` names it (see [`IngressInfo::endpoint_style`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EndpointStyle {
    Host,
    Path,
}

/// Something that happened to a microVM or an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Increasing; give the last one seen as `since`.
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub microvm_id: Option<String>,
    pub image_id: Option<String>,
    /// `microvm` (a state change), `egress` (a denied destination), `adopted` (taken back
    /// after a kilnd restart), …
    pub kind: String,
    /// A microVM's state (kind `microvm`) or an image's status (kind `image`) before.
    pub from_state: Option<String>,
    /// The state or status after.
    pub to_state: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventList {
    pub events: Vec<Event>,
    /// Give it as `since` for the events after these.
    pub next_cursor: i64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this sequence number (default 0: from the oldest kept).
    #[param(minimum = 0)]
    pub since: Option<i64>,
    /// At most this many (default 100, 1 to 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// Event streams kilnd keeps open at once (StreamEvents).
pub const MAX_EVENT_STREAMS: usize = 16;

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventStreamQuery {
    /// Events after this sequence number (default: only those from now on; 0: every one
    /// kept first). An SSE client's `Last-Event-ID` header does the same.
    #[param(minimum = 0)]
    pub since: Option<i64>,
}

/// The events a StreamEvents stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventStreamEventName {
    /// `data` is an Event.
    Event,
}

/// One server-sent event of StreamEvents as an SSE parser reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventStreamSse {
    pub event: EventStreamEventName,
    /// The event's `seq`: resume after it with `since` or `Last-Event-ID`.
    #[schema(pattern = "^[0-9]+$")]
    pub id: String,
    /// JSON of the Event.
    pub data: String,
}
