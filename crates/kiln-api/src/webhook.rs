//! Webhooks: URLs kilnd POSTs lifecycle events to, signed, retried, with a delivery log.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::system::Event;

/// The event kinds a webhook can ask for (an `Event`'s `kind`).
pub const WEBHOOK_EVENT_KINDS: [&str; 4] = ["microvm", "image", "egress", "adopted"];
/// Webhooks kilnd keeps at most.
pub const MAX_WEBHOOKS: usize = 32;

/// CreateWebhook's request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWebhookRequest {
    /// Where to POST: `http://` or `https://`. Targets on loopback, link-local and private
    /// addresses are refused unless kilnd runs with `--allow-private-webhook-targets`.
    #[schema(
        max_length = 2048,
        pattern = "^https?://",
        example = "https://hooks.example.com/kiln"
    )]
    pub url: String,
    /// Event kinds to send (`microvm`: state changes with reasons, `image`: build status
    /// including SUCCESSFUL and FAILED, `egress`: denied destinations, `adopted`); all when
    /// absent or empty.
    #[serde(default)]
    #[schema(max_items = 4)]
    pub events: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub description: Option<String>,
}

/// A webhook. `secret` is shown once, in CreateWebhook's answer: deliveries carry
/// `Kiln-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    #[schema(example = "wh-0123456789abcdef")]
    pub webhook_id: String,
    pub url: String,
    pub events: Vec<String>,
    pub description: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<Webhook>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// The receiver answered 2xx.
    Delivered,
    /// An attempt failed; another is due at `nextAttemptAtMs`.
    Retrying,
    /// Every attempt failed.
    Failed,
}

/// One event's delivery to one webhook (the newest 100 per webhook are kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub delivery_id: String,
    pub event_seq: i64,
    pub event_kind: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    /// The receiver's last HTTP status, if it answered.
    pub last_status_code: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// Unix milliseconds of the last attempt.
    pub last_attempt_at_ms: i64,
    pub next_attempt_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<Delivery>,
}

/// The body of a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    pub webhook_id: String,
    pub delivery_id: String,
    pub event: Event,
}
