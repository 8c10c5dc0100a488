//! Webhooks: CreateWebhook, ListWebhooks, DeleteWebhook, ListWebhookDeliveries (see
//! `crate::webhooks` for the deliveries themselves).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use kiln_api::{
    CreateWebhookRequest, DeliveryList, ErrorBody, ErrorCode, Webhook, WebhookList, MAX_WEBHOOKS,
    WEBHOOK_EVENT_KINDS,
};
use kiln_store::WebhookRow;

use super::ApiJson;
use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

fn view(w: &WebhookRow, with_secret: bool) -> Webhook {
    Webhook {
        webhook_id: w.id.clone(),
        url: w.url.clone(),
        events: w.events.clone(),
        description: w.description.clone(),
        created_at: w.created_at / 1000,
        secret: with_secret.then(|| w.secret.clone()),
    }
}

#[utoipa::path(
    post, path = "/v1/webhooks", operation_id = "CreateWebhook", tag = "system", security(("bearer" = [])),
    description = "CreateWebhook: kilnd POSTs the events asked for (all by default) to `url` as \
        JSON `{webhookId, deliveryId, event}`, signed with `Kiln-Signature: t=<unix \
        seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<body>\")>` (reject an old `t` to stop \
        replays), retried with backoff (1, 2, 4, 8, 16 s) until a 2xx. The secret is in this \
        answer only.",
    request_body = CreateWebhookRequest,
    responses(
        (status = 201, description = "The webhook, with its secret", body = Webhook),
        (status = 400, description = "Not an http(s) URL, a private target, an unknown event kind", body = ErrorBody),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 413, description = "The body is over 64 KiB", body = ErrorBody),
        (status = 429, description = "32 webhooks exist", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn create_webhook(
    State(m): State<Arc<Manager>>,
    ApiJson(req): ApiJson<CreateWebhookRequest>,
) -> ApiResult<(StatusCode, Json<Webhook>)> {
    if req.url.len() > 2048 {
        return Err(ApiError::bad_request("url is over 2048 characters"));
    }
    if req
        .description
        .as_ref()
        .is_some_and(|d| d.chars().count() > 256)
    {
        return Err(ApiError::bad_request("description is over 256 characters"));
    }
    if let Some(bad) = req
        .events
        .iter()
        .find(|e| !WEBHOOK_EVENT_KINDS.contains(&e.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "events: {bad:?} is not an event kind; use {WEBHOOK_EVENT_KINDS:?}, or none for all"
        )));
    }
    let target = crate::webhooks::parse(&req.url).map_err(ApiError::bad_request)?;
    crate::webhooks::resolve(&target, m.cfg.allow_private_webhook_targets)
        .await
        .map_err(|e| ApiError::bad_request(format!("url: {e}")))?;
    let mut events = req.events.clone();
    events.sort();
    events.dedup();
    let row = WebhookRow {
        id: format!("wh-{:016x}", rand::random::<u64>()),
        url: req.url,
        events,
        description: req.description,
        secret: hex::encode(rand::random::<[u8; 32]>()),
        created_at: kiln_store::now_ms(),
        cursor: 0,
    };
    let _admission = m.admission.lock().unwrap_or_else(|p| p.into_inner());
    let count = m.store().webhooks()?.len();
    if count >= MAX_WEBHOOKS {
        return Err(ApiError::new(
            ErrorCode::ServiceQuotaExceededException,
            format!("{count} webhooks exist and the limit is {MAX_WEBHOOKS}: delete one"),
        ));
    }
    m.write(|s| s.insert_webhook(&row))?;
    Ok((StatusCode::CREATED, Json(view(&row, true))))
}

#[utoipa::path(
    get, path = "/v1/webhooks", operation_id = "ListWebhooks", tag = "system", security(("bearer" = [])),
    description = "ListWebhooks (without their secrets).",
    responses(
        (status = 200, description = "The webhooks", body = WebhookList),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn list_webhooks(State(m): State<Arc<Manager>>) -> ApiResult<Json<WebhookList>> {
    let rows = m.store().webhooks()?;
    Ok(Json(WebhookList {
        webhooks: rows.iter().map(|w| view(w, false)).collect(),
    }))
}

#[utoipa::path(
    delete, path = "/v1/webhooks/{id}", operation_id = "DeleteWebhook", tag = "system", security(("bearer" = [])),
    description = "DeleteWebhook: no further deliveries (one under way may finish).",
    params(("id" = String, Path, description = "The webhook's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn delete_webhook(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if !m.write(|s| s.delete_webhook(&id))? {
        return Err(ApiError::not_found("webhook", &id));
    }
    m.webhooks.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get, path = "/v1/webhooks/{id}/deliveries", operation_id = "ListWebhookDeliveries", tag = "system", security(("bearer" = [])),
    description = "The webhook's newest 100 deliveries, newest first: status (delivered, \
        retrying, failed), attempts, the receiver's last answer or error, the next attempt. \
        Kept in memory (a restart of kilnd starts the log again).",
    params(("id" = String, Path, description = "The webhook's id")),
    responses(
        (status = 200, description = "The deliveries", body = DeliveryList),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn webhook_deliveries(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeliveryList>> {
    if !m.store().webhooks()?.iter().any(|w| w.id == id) {
        return Err(ApiError::not_found("webhook", &id));
    }
    Ok(Json(DeliveryList {
        deliveries: m.webhooks.deliveries(&id),
    }))
}
