//! Requests to the app inside a microVM through kilnd's ingress, the way a remote client
//! makes them: `http(s)://{endpoint}/path` (either endpoint style) with a fresh auth token. The
//! endpoint's name resolves to the ingress address kilnd reports (`GET /v1/ingress`) inside
//! this client only, and when kilnd serves its own certificate its CA is the one trusted.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use kiln_api::{AllowedPort, CreateTokenRequest, IngressInfo};
use serde_json::Value;

use crate::{Client, ClientError};

/// A request to an app port of a microVM.
#[derive(Debug, Clone)]
pub struct SandboxRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub port: u16,
    /// Sent as JSON when set.
    pub body: Option<Value>,
    pub timeout: std::time::Duration,
}

/// The app's answer.
#[derive(Debug, Clone)]
pub struct SandboxResponse {
    pub status: u16,
    pub body: String,
}

fn ingress_error(endpoint: &str, detail: impl std::fmt::Display) -> ClientError {
    ClientError::Unreachable {
        endpoint: endpoint.to_string(),
        detail: detail.to_string(),
    }
}

pub(crate) fn tls_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("kilnd's CA certificate: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("kilnd's CA certificate: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Client {
    /// kilnd's `GET /v1/ingress`.
    pub fn ingress_info(&self) -> Result<IngressInfo, ClientError> {
        self.call("GET", "/v1/ingress", None::<&()>)
    }

    /// Sends `req` to the microVM's app through the ingress with a token that allows only
    /// `req.port` and lives a few minutes.
    pub fn sandbox_request(
        &self,
        microvm: &str,
        req: &SandboxRequest<'_>,
    ) -> Result<SandboxResponse, ClientError> {
        let info = self.ingress_info()?;
        let token = self.create_token(&CreateTokenRequest {
            microvm_identifier: microvm.to_string(),
            expiration_in_minutes: 5,
            allowed_ports: vec![AllowedPort { port: req.port }],
            kind: None,
        })?;
        let endpoint = token.endpoint;
        let token = token.auth_token.kiln_auth;
        let ingress: Vec<SocketAddr> = info
            .listen
            .to_socket_addrs()
            .map_err(|e| ingress_error(&info.listen, e))?
            .collect();
        let domain = format!(".{}", info.domain.to_ascii_lowercase());
        // The endpoint's name (and only names under the ingress domain) resolve to the ingress.
        let resolver = move |netloc: &str| -> std::io::Result<Vec<SocketAddr>> {
            let host = netloc.rsplit_once(':').map_or(netloc, |(h, _)| h);
            if host.to_ascii_lowercase().ends_with(&domain) {
                let port = netloc.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
                Ok(ingress
                    .iter()
                    .map(|a| SocketAddr::new(a.ip(), port.unwrap_or(a.port())))
                    .collect())
            } else {
                netloc.to_socket_addrs().map(Iterator::collect)
            }
        };
        let mut agent = ureq::AgentBuilder::new()
            .timeout(req.timeout)
            .resolver(resolver);
        if let (true, Some(ca)) = (info.tls, &info.ca_certificate) {
            agent = agent.tls_config(tls_config(ca).map_err(|e| ingress_error(&endpoint, e))?);
        }
        let scheme = if info.tls { "https" } else { "http" };
        let url = format!("{scheme}://{endpoint}{}", req.path);
        let call = agent
            .build()
            .request(req.method, &url)
            .set("X-Kiln-Auth", &token)
            .set("X-Kiln-Port", &req.port.to_string());
        let answer = match &req.body {
            Some(b) => call.send_json(b.clone()),
            None => call.call(),
        };
        let resp = match answer {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(ingress_error(&url, e)),
        };
        let status = resp.status();
        let body = resp
            .into_string()
            .map_err(|e| ingress_error(&url, format!("reading the answer: {e}")))?;
        Ok(SandboxResponse { status, body })
    }
}
