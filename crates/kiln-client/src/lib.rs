//! A small blocking client of kilnd's REST API. Configuration, in order: explicit values,
//! `KILN_ENDPOINT` / `KILN_API_KEY`, then the daemon's files in `KILN_HOME` (`kilnd.addr`,
//! `api-key`, written by the daemon on start).

mod ingress;

use std::path::PathBuf;

pub use ingress::{IngressInfo, SandboxRequest, SandboxResponse};

use serde_json::{json, Value};

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
            ClientError::Api { .. } => 1,
        }
    }
}

pub struct Client {
    endpoint: String,
    key: String,
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
            std::fs::read_to_string(home().join("kilnd.addr"))
                .ok()
                .map(|a| format!("http://{}", a.trim()))
        })
        .unwrap_or_else(|| "http://127.0.0.1:7070".into())
        .trim_end_matches('/')
        .to_string()
}

/// kilnd's unauthenticated health endpoint (`status`, `accelerator`, `devMode`, `warning`),
/// with a short timeout: for `kiln doctor`, which must not hang on a dead address.
pub fn health(endpoint: &str, timeout: std::time::Duration) -> Result<Value, ClientError> {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
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
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
        let req = ureq::request(method, &format!("{}{path}", self.endpoint))
            .set("Authorization", &format!("Bearer {}", self.key));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => {
                let text = r.into_string().unwrap_or_default();
                Ok(if text.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_str(&text).unwrap_or(Value::String(text))
                })
            }
            Err(e) => Err(self.error(e)),
        }
    }

    /// Uploads a build context (zip or tar); returns the artifact id.
    pub fn upload_artifact(&self, artifact: &[u8]) -> Result<String, ClientError> {
        let req = ureq::post(&format!("{}/v1/artifacts", self.endpoint))
            .set("Authorization", &format!("Bearer {}", self.key))
            .set("Content-Type", "application/octet-stream");
        let art: Value = match req.send_bytes(artifact) {
            Ok(r) => r.into_json().unwrap_or(Value::Null),
            Err(e) => return Err(self.error(e)),
        };
        Ok(art["artifactId"].as_str().unwrap_or_default().to_string())
    }

    /// Uploads a build context (zip or tar) and starts CreateMicrovmImage; returns its id.
    pub fn create_image(&self, name: &str, artifact: &[u8]) -> Result<String, ClientError> {
        let img = self.create_image_with(name, artifact, json!({}))?;
        Ok(img["imageIdentifier"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// CreateMicrovmImage with more request fields (`memorySizeMib`, `buildArgs`, …, see
    /// spec/openapi.yaml) merged into the body; returns the answer (`imageIdentifier`, …).
    pub fn create_image_with(
        &self,
        name: &str,
        artifact: &[u8],
        fields: Value,
    ) -> Result<Value, ClientError> {
        let artifact_id = self.upload_artifact(artifact)?;
        let mut body = json!({"name": name, "codeArtifact": {"artifactId": artifact_id}});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), fields) {
            body.extend(extra);
        }
        self.post("/v1/images", body)
    }

    /// An image's build log; with `follow`, a stream that ends when the build does.
    pub fn image_logs(
        &self,
        id: &str,
        follow: bool,
    ) -> Result<Box<dyn std::io::Read + Send + Sync>, ClientError> {
        self.get_stream(&format!("/v1/images/{id}/logs?follow={follow}"))
    }

    /// A GET whose body is read as it arrives (logs, disk downloads).
    pub fn get_stream(
        &self,
        path: &str,
    ) -> Result<Box<dyn std::io::Read + Send + Sync>, ClientError> {
        match ureq::get(&format!("{}{path}", self.endpoint))
            .set("Authorization", &format!("Bearer {}", self.key))
            .call()
        {
            Ok(r) => Ok(r.into_reader()),
            Err(e) => Err(self.error(e)),
        }
    }

    fn error(&self, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, r) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                ClientError::Api {
                    status,
                    code: v["code"].as_str().unwrap_or("Error").to_string(),
                    message: v["message"].as_str().unwrap_or("").to_string(),
                }
            }
            e => ClientError::Unreachable {
                endpoint: self.endpoint.clone(),
                detail: e.to_string(),
            },
        }
    }

    /// The API address this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None)
    }

    /// The microVM once it is in `state` or TERMINATED, or as it is after `timeout`: kilnd
    /// answers when the state changes (`waitFor`), so nothing polls.
    pub fn wait_microvm(
        &self,
        id: &str,
        state: &str,
        timeout: std::time::Duration,
    ) -> Result<Value, ClientError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            // Each request waits a bounded time; the loop covers longer waits.
            let seconds = left.as_secs().clamp(1, 60);
            let view = self.get(&format!(
                "/v1/microvms/{id}?waitFor={state}&timeoutSeconds={seconds}"
            ))?;
            let now = view["state"].as_str().unwrap_or_default();
            if now == state || now == "TERMINATED" || left.is_zero() {
                return Ok(view);
            }
        }
    }

    pub fn post(&self, path: &str, body: Value) -> Result<Value, ClientError> {
        self.call("POST", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call("DELETE", path, None)
    }

    pub fn run_microvm(
        &self,
        image: &str,
        idle: Option<Value>,
        payload: Option<String>,
        max_duration: Option<u64>,
        connectors: Option<Value>,
    ) -> Result<Value, ClientError> {
        let mut body = json!({"imageIdentifier": image});
        if let Some(c) = connectors {
            body["connectors"] = c;
        }
        if let Some(i) = idle {
            body["idlePolicy"] = i;
        }
        if let Some(p) = payload {
            body["runHookPayload"] = json!(p);
        }
        if let Some(m) = max_duration {
            body["maxDurationSeconds"] = json!(m);
        }
        self.post("/v1/microvms", body)
    }
}
