//! A small blocking client of kilnd's REST API, typed with kiln-api's requests and
//! responses. Configuration, in order: explicit values, `KILN_ENDPOINT` / `KILN_API_KEY`,
//! then the daemon's files in `KILN_HOME` (`kilnd.addr`, `api-key`, written by the daemon on
//! start).

mod files;
mod ingress;
mod processes;
mod sse;

use std::path::PathBuf;
use std::time::Duration;

pub use files::{FileWatch, WriteOptions};
pub use ingress::{SandboxRequest, SandboxResponse};
pub use kiln_api as api;
pub use processes::{OutputItem, ProcessOutput};

use kiln_api::{
    AppLogs, Artifact, CodeArtifact, CreateImageRequest, CreateImageResponse, CreateTokenRequest,
    CreateTokenResponse, CreateWebhookRequest, DeliveryList, ErrorBody, EventList, ExecRequest,
    ExecResponse, ForkMicrovmRequest, ForkMicrovmResponse, Health, Image, ImageList,
    ListImagesQuery, ListMicrovmsQuery, Microvm, MicrovmList, MicrovmMetricsHistory, MicrovmState,
    RotateKeyResponse, RunMicrovmRequest, RunMicrovmResponse, SaveMicrovmImageRequest,
    UpdateLabelsRequest, Webhook, WebhookList,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{code} ({status}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error(
        "Cannot reach kilnd at {endpoint}: {detail} (is it running? scripts/run.sh starts it)"
    )]
    Unreachable { endpoint: String, detail: String },
    #[error("kilnd at {endpoint} answered {what} with something this client cannot read: {detail} (are kiln and kilnd the same version?)")]
    Unexpected {
        endpoint: String,
        what: String,
        detail: String,
    },
    #[error("No API key: set KILN_API_KEY or KILN_HOME (the key is in $KILN_HOME/api-key)")]
    NoKey,
}

impl ClientError {
    /// Exit codes scripts can rely on: 2 usage/validation, 3 not found, 4 conflict,
    /// 5 auth, 6 unreachable, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Api { status: 400, .. } => 2,
            ClientError::Api { status: 404, .. } => 3,
            ClientError::Api { status: 409, .. } => 4,
            ClientError::Api {
                status: 401 | 403, ..
            }
            | ClientError::NoKey => 5,
            ClientError::Unreachable { .. } => 6,
            ClientError::Api { .. } | ClientError::Unexpected { .. } => 1,
        }
    }
}

pub struct Client {
    endpoint: String,
    key: String,
    agent: ureq::Agent,
}

/// The agent every call goes through: the system's roots, plus the CA in `KILN_API_CA`
/// when the API's certificate comes from a private one (kilnd --api-tls-cert).
fn agent() -> Result<ureq::Agent, ClientError> {
    let mut builder = ureq::AgentBuilder::new();
    if let Some(path) = std::env::var_os("KILN_API_CA") {
        let path = PathBuf::from(path);
        let bad = |detail: String| ClientError::Unreachable {
            endpoint: format!("(KILN_API_CA={})", path.display()),
            detail,
        };
        let pem = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        builder = builder.tls_config(ingress::tls_config(&pem).map_err(bad)?);
    }
    Ok(builder.build())
}

fn home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}

/// kilnd's API address: `endpoint` if given, else `KILN_ENDPOINT`, else `KILN_HOME/kilnd.addr`,
/// else the default `http://127.0.0.1:7070`.
pub fn endpoint_from_env(endpoint: Option<String>) -> String {
    endpoint
        .or_else(|| std::env::var("KILN_ENDPOINT").ok())
        .or_else(|| {
            // "host:port", or with its scheme when kilnd serves the API over TLS.
            std::fs::read_to_string(home().join("kilnd.addr"))
                .ok()
                .map(|a| match a.trim() {
                    a if a.contains("://") => a.to_string(),
                    a => format!("http://{a}"),
                })
        })
        .unwrap_or_else(|| "http://127.0.0.1:7070".into())
        .trim_end_matches('/')
        .to_string()
}

/// kilnd's unauthenticated health endpoint, with a short timeout: for `kiln doctor`, which
/// must not hang on a dead address.
pub fn health(endpoint: &str, timeout: Duration) -> Result<Health, ClientError> {
    let mut builder = ureq::AgentBuilder::new().timeout(timeout);
    if let Some(pem) = std::env::var_os("KILN_API_CA").and_then(|p| std::fs::read_to_string(p).ok())
    {
        if let Ok(tls) = ingress::tls_config(&pem) {
            builder = builder.tls_config(tls);
        }
    }
    let agent = builder.build();
    let unreachable = |detail: String| ClientError::Unreachable {
        endpoint: endpoint.to_string(),
        detail,
    };
    let resp = agent
        .get(&format!("{endpoint}/health"))
        .call()
        .map_err(|e| unreachable(e.to_string()))?;
    resp.into_json()
        .map_err(|e| unreachable(format!("not kilnd's health answer: {e}")))
}

impl Client {
    pub fn from_env(endpoint: Option<String>, key: Option<String>) -> Result<Client, ClientError> {
        let endpoint = endpoint_from_env(endpoint);
        let key = key
            .or_else(|| std::env::var("KILN_API_KEY").ok())
            .or_else(|| std::fs::read_to_string(home().join("api-key")).ok())
            .map(|k| k.trim().to_string())
            .ok_or(ClientError::NoKey)?;
        Ok(Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            key,
            agent: agent()?,
        })
    }

    /// The API address this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.endpoint))
            .set("Authorization", &format!("Bearer {}", self.key))
    }

    /// One call: `body` sent as JSON, the answer read as `T`.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let req = self.request(method, path);
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = resp.map_err(|e| self.error(e))?;
        resp.into_json().map_err(|e| ClientError::Unexpected {
            endpoint: self.endpoint.clone(),
            what: format!("{method} {path}"),
            detail: e.to_string(),
        })
    }

    /// A call answered with 204 No Content.
    fn call_empty(&self, method: &str, path: &str) -> Result<(), ClientError> {
        self.request(method, path)
            .call()
            .map(drop)
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, r) => {
                let text = r.into_string().unwrap_or_default();
                match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(body) => ClientError::Api {
                        status,
                        code: body.code.to_string(),
                        message: body.message,
                    },
                    Err(_) => ClientError::Api {
                        status,
                        code: "Error".into(),
                        message: text.chars().take(500).collect(),
                    },
                }
            }
            e => ClientError::Unreachable {
                endpoint: self.endpoint.clone(),
                detail: e.to_string(),
            },
        }
    }

    /// A GET of any path as plain JSON: for what this client has no type for (a newer
    /// kilnd's fields) and for tests of the wire format. Everything else has a typed call.
    pub fn raw_get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.call("GET", path, None::<&()>)
    }

    /// Uploads a build context (zip or tar).
    pub fn upload_artifact(&self, artifact: &[u8]) -> Result<Artifact, ClientError> {
        let req = self
            .request("POST", "/v1/artifacts")
            .set("Content-Type", "application/octet-stream");
        let resp = req.send_bytes(artifact).map_err(|e| self.error(e))?;
        resp.into_json().map_err(|e| ClientError::Unexpected {
            endpoint: self.endpoint.clone(),
            what: "POST /v1/artifacts".into(),
            detail: e.to_string(),
        })
    }

    /// CreateMicrovmImage as given (its `codeArtifact` already uploaded).
    pub fn create_image(
        &self,
        req: &CreateImageRequest,
    ) -> Result<CreateImageResponse, ClientError> {
        self.call("POST", "/v1/images", Some(req))
    }

    /// Uploads `artifact`, then CreateMicrovmImage with `req`'s other fields and this name.
    pub fn build_image(
        &self,
        name: &str,
        artifact: &[u8],
        mut req: CreateImageRequest,
    ) -> Result<CreateImageResponse, ClientError> {
        let uploaded = self.upload_artifact(artifact)?;
        req.name = name.to_string();
        req.code_artifact = CodeArtifact {
            artifact_id: uploaded.artifact_id,
        };
        self.create_image(&req)
    }

    /// Every image (the newest build of each name), every page followed.
    pub fn list_images(&self) -> Result<ImageList, ClientError> {
        Ok(ImageList {
            images: self.list_all_images(&ListImagesQuery::default())?,
            next_cursor: None,
        })
    }

    /// Every page of ListMicrovmImages, followed to the end.
    pub fn list_all_images(&self, q: &ListImagesQuery) -> Result<Vec<Image>, ClientError> {
        let mut q = q.clone();
        let mut out = Vec::new();
        loop {
            let page = self.list_images_page(&q)?;
            out.extend(page.images);
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// One page of ListMicrovmImages.
    pub fn list_images_page(&self, q: &ListImagesQuery) -> Result<ImageList, ClientError> {
        let mut query = Vec::new();
        if let Some(s) = q.status {
            query.push(format!("status={s}"));
        }
        page_query(&mut query, &q.label, q.limit, q.cursor.as_deref());
        self.call("GET", &with_query("/v1/images", &query), None::<&()>)
    }

    /// UpdateMicrovmImage: labels set (`Some`) or removed (`None`), the others kept.
    pub fn update_image_labels(
        &self,
        id: &str,
        labels: &UpdateLabelsRequest,
    ) -> Result<Image, ClientError> {
        self.call("PATCH", &format!("/v1/images/{}", seg(id)), Some(labels))
    }

    /// An image by build id, or by name its newest successful build.
    pub fn get_image(&self, id: &str) -> Result<Image, ClientError> {
        self.call("GET", &format!("/v1/images/{}", seg(id)), None::<&()>)
    }

    pub fn delete_image(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/images/{}", seg(id)))
    }

    /// An image's build log; with `follow`, a stream that ends when the build does.
    pub fn image_logs(
        &self,
        id: &str,
        follow: bool,
    ) -> Result<Box<dyn std::io::Read + Send + Sync>, ClientError> {
        self.get_stream(&format!("/v1/images/{}/logs?follow={follow}", seg(id)))
    }

    /// A GET whose body is read as it arrives (logs, disk downloads).
    pub fn get_stream(
        &self,
        path: &str,
    ) -> Result<Box<dyn std::io::Read + Send + Sync>, ClientError> {
        match self.request("GET", path).call() {
            Ok(r) => Ok(r.into_reader()),
            Err(e) => Err(self.error(e)),
        }
    }

    pub fn run_microvm(&self, req: &RunMicrovmRequest) -> Result<RunMicrovmResponse, ClientError> {
        self.call("POST", "/v1/microvms", Some(req))
    }

    pub fn get_microvm(&self, id: &str) -> Result<Microvm, ClientError> {
        self.call("GET", &format!("/v1/microvms/{}", seg(id)), None::<&()>)
    }

    /// One page of ListMicrovms (`q.cursor` from the previous page's `next_cursor`).
    pub fn list_microvms(&self, q: &ListMicrovmsQuery) -> Result<MicrovmList, ClientError> {
        let mut query = Vec::new();
        if let Some(s) = q.state {
            query.push(format!("state={s}"));
        }
        if let Some(i) = &q.image_identifier {
            query.push(format!("imageIdentifier={}", seg(i)));
        }
        if let Some(i) = &q.image {
            query.push(format!("image={}", seg(i)));
        }
        page_query(&mut query, &q.label, q.limit, q.cursor.as_deref());
        self.call("GET", &with_query("/v1/microvms", &query), None::<&()>)
    }

    /// Every page of ListMicrovms, followed to the end.
    pub fn list_all_microvms(&self, q: &ListMicrovmsQuery) -> Result<Vec<Microvm>, ClientError> {
        let mut q = q.clone();
        let mut out = Vec::new();
        loop {
            let page = self.list_microvms(&q)?;
            out.extend(page.microvms);
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// CreateWebhook: the answer carries the secret (once).
    pub fn create_webhook(&self, req: &CreateWebhookRequest) -> Result<Webhook, ClientError> {
        self.call("POST", "/v1/webhooks", Some(req))
    }

    /// ListNodes: the kilnd nodes sharing the database (this one alone without a cluster).
    pub fn list_nodes(&self) -> Result<api::NodeList, ClientError> {
        self.call("GET", "/v1/nodes", None::<&()>)
    }

    /// DrainNode: the node hands its microVMs to others and takes no new ones.
    pub fn drain_node(&self, name: &str) -> Result<api::Node, ClientError> {
        self.call(
            "POST",
            &format!("/v1/nodes/{}/drain", seg(name)),
            None::<&()>,
        )
    }

    /// UndrainNode.
    pub fn undrain_node(&self, name: &str) -> Result<api::Node, ClientError> {
        self.call(
            "POST",
            &format!("/v1/nodes/{}/undrain", seg(name)),
            None::<&()>,
        )
    }

    /// RemoveNode: forgets a node that is gone for good and holds no microVM.
    pub fn remove_node(&self, name: &str) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/nodes/{}", seg(name)))
    }

    pub fn list_webhooks(&self) -> Result<WebhookList, ClientError> {
        self.call("GET", "/v1/webhooks", None::<&()>)
    }

    pub fn delete_webhook(&self, id: &str) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/webhooks/{}", seg(id)))
    }

    pub fn webhook_deliveries(&self, id: &str) -> Result<DeliveryList, ClientError> {
        self.call(
            "GET",
            &format!("/v1/webhooks/{}/deliveries", seg(id)),
            None::<&()>,
        )
    }

    /// GetMicrovmMetrics: the samples kilnd keeps of a running microVM, oldest first.
    pub fn microvm_metrics(&self, id: &str) -> Result<MicrovmMetricsHistory, ClientError> {
        self.call(
            "GET",
            &format!("/v1/microvms/{}/metrics", seg(id)),
            None::<&()>,
        )
    }

    /// UpdateMicrovm: labels set (`Some`) or removed (`None`), the others kept.
    pub fn update_microvm_labels(
        &self,
        id: &str,
        labels: &UpdateLabelsRequest,
    ) -> Result<Microvm, ClientError> {
        self.call("PATCH", &format!("/v1/microvms/{}", seg(id)), Some(labels))
    }

    /// The microVM once it is in `state` or TERMINATED, or as it is after `timeout`: kilnd
    /// answers when the state changes (`waitFor`), so nothing polls.
    pub fn wait_microvm(
        &self,
        id: &str,
        state: MicrovmState,
        timeout: Duration,
    ) -> Result<Microvm, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // Each request waits a bounded time; the loop covers longer waits.
            let seconds = left.as_secs().clamp(1, 60);
            let view: Microvm = self.call(
                "GET",
                &format!(
                    "/v1/microvms/{}?waitFor={state}&timeoutSeconds={seconds}",
                    seg(id)
                ),
                None::<&()>,
            )?;
            if view.state == state || view.state == MicrovmState::Terminated || left.is_zero() {
                return Ok(view);
            }
        }
    }

    fn microvm_action(&self, id: &str, action: &str) -> Result<Microvm, ClientError> {
        self.call(
            "POST",
            &format!("/v1/microvms/{}/{action}", seg(id)),
            Some(&serde_json::json!({})),
        )
    }

    pub fn suspend_microvm(&self, id: &str) -> Result<Microvm, ClientError> {
        self.microvm_action(id, "suspend")
    }

    pub fn resume_microvm(&self, id: &str) -> Result<Microvm, ClientError> {
        self.microvm_action(id, "resume")
    }

    pub fn terminate_microvm(&self, id: &str) -> Result<Microvm, ClientError> {
        self.microvm_action(id, "terminate")
    }

    /// ForkMicrovm: `count` clones of RUNNING microVM `id`, on their way to RUNNING.
    pub fn fork_microvm(&self, id: &str, count: u64) -> Result<ForkMicrovmResponse, ClientError> {
        self.call(
            "POST",
            &format!("/v1/microvms/{}/fork", seg(id)),
            Some(&ForkMicrovmRequest { count: Some(count) }),
        )
    }

    /// SaveMicrovmImage: RUNNING microVM `id` becomes image `name` (CREATING once this
    /// answers; [`Client::wait_image`] waits for it).
    pub fn save_microvm_image(
        &self,
        id: &str,
        name: &str,
    ) -> Result<CreateImageResponse, ClientError> {
        self.call(
            "POST",
            &format!("/v1/microvms/{}/image", seg(id)),
            Some(&SaveMicrovmImageRequest {
                name: name.to_string(),
                labels: None,
            }),
        )
    }

    /// The image once it is no longer CREATING, or as it is when `timeout` has passed.
    pub fn wait_image(&self, id: &str, timeout: Duration) -> Result<Image, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let image = self.get_image(id)?;
            if image.status != kiln_api::ImageStatus::Creating
                || std::time::Instant::now() > deadline
            {
                return Ok(image);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResponse, ClientError> {
        self.call("POST", &format!("/v1/microvms/{}/exec", seg(id)), Some(req))
    }

    /// The newest `max_bytes` of the app's output.
    pub fn microvm_logs(&self, id: &str, max_bytes: Option<u32>) -> Result<AppLogs, ClientError> {
        let query = max_bytes
            .map(|m| format!("?maxBytes={m}"))
            .unwrap_or_default();
        self.call(
            "GET",
            &format!("/v1/microvms/{}/logs{query}", seg(id)),
            None::<&()>,
        )
    }

    pub fn create_token(
        &self,
        req: &CreateTokenRequest,
    ) -> Result<CreateTokenResponse, ClientError> {
        self.call("POST", "/v1/auth-tokens", Some(req))
    }

    pub fn revoke_token(&self, token_id: &str) -> Result<(), ClientError> {
        self.call_empty("DELETE", &format!("/v1/auth-tokens/{}", seg(token_id)))
    }

    pub fn revoke_microvm_tokens(&self, id: &str) -> Result<(), ClientError> {
        self.request("POST", &format!("/v1/microvms/{}/revoke-tokens", seg(id)))
            .send_json(serde_json::json!({}))
            .map(drop)
            .map_err(|e| self.error(e))
    }

    pub fn rotate_token_key(&self) -> Result<RotateKeyResponse, ClientError> {
        self.call(
            "POST",
            "/v1/auth-tokens/rotate-key",
            Some(&serde_json::json!({})),
        )
    }

    /// Events after `since` (at most `limit`).
    pub fn events(&self, since: i64, limit: Option<i64>) -> Result<EventList, ClientError> {
        let limit = limit.map(|l| format!("&limit={l}")).unwrap_or_default();
        self.call(
            "GET",
            &format!("/v1/events?since={since}{limit}"),
            None::<&()>,
        )
    }
}

/// An id or name as one path segment or query value: anything outside the characters ids
/// and names use is percent-encoded, so no input can reach another route.
/// The `label`, `limit` and `cursor` parameters every list takes.
fn page_query(
    query: &mut Vec<String>,
    labels: &[String],
    limit: Option<u32>,
    cursor: Option<&str>,
) {
    query.extend(labels.iter().map(|l| format!("label={}", seg(l))));
    if let Some(n) = limit {
        query.push(format!("limit={n}"));
    }
    if let Some(c) = cursor {
        query.push(format!("cursor={}", seg(c)));
    }
}

fn with_query(path: &str, query: &[String]) -> String {
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_one_path_segment() {
        assert_eq!(seg("mvm-00ab"), "mvm-00ab");
        assert_eq!(seg("../images?x=1"), "..%2Fimages%3Fx%3D1");
    }
}
