//! The ingress server: routes `<microvmId>.<domain>` requests (host style) and
//! `/m/<microvmId>/…` requests on any host (path style, the prefix stripped and sent on as
//! `X-Forwarded-Prefix`) that carry a valid token to a port inside that microVM, over the agent channel (no guest network needed). HTTP/1.1
//! (keep-alive, chunked, streamed bodies), HTTP/2 cleartext (h2c, gRPC trailers included) and
//! WebSocket upgrades pass through; HTTP/2 requests to an app that speaks only HTTP/1.1 are
//! translated (see [`crate::h2`]). Auth headers are stripped before forwarding.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST, UPGRADE};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::{debug, info_span, warn, Instrument};

use crate::h2::Http2Apps;
use crate::token::{TokenError, TokenKind, TokenService};

pub const AUTH_HEADERS: [&str; 2] = ["x-kiln-auth", "x-aws-proxy-auth"];
pub const PORT_HEADERS: [&str; 2] = ["x-kiln-port", "x-aws-proxy-port"];
pub const DEFAULT_PORT: u16 = 8080;
/// Path-style routing: `/m/<microvmId>` and everything under it, on any Host.
pub const PATH_PREFIX: &str = "/m/";
/// What a path-style request's app is told the stripped prefix was.
pub const FORWARDED_PREFIX: &str = "x-forwarded-prefix";
/// WebSocket subprotocol entries that carry the token and port for browsers.
pub(crate) const WS_AUTH_PREFIX: &str = "kiln-auth.";
const WS_PORT_PREFIX: &str = "kiln-port.";

pub trait GuestStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> GuestStream for T {}

#[derive(Debug)]
pub enum BackendError {
    /// Unknown or terminated: 404.
    NotFound,
    /// Exists but cannot take traffic now (suspended without auto-resume…): 409.
    NotRunning(String),
    /// The guest side failed: 502.
    Unavailable(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the proxy needs from the control plane.
pub trait Backend: Send + Sync + 'static {
    /// A byte stream to `port` inside the microVM (resuming it first if allowed).
    fn connect(
        &self,
        microvm: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn GuestStream>, BackendError>>;
    /// Held while a request or stream is open: the microVM is not suspended meanwhile.
    fn activity(&self, microvm: &str) -> Box<dyn Send + Sync>;
    /// The lifecycle hook port, never reachable through the proxy.
    fn hook_port(&self, microvm: &str) -> Option<u16>;
    /// Opens an interactive terminal in the microVM (shell tokens).
    fn shell(
        &self,
        microvm: &str,
        cols: u16,
        rows: u16,
    ) -> BoxFuture<'_, Result<crate::shell::ShellChannels, BackendError>>;
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub domain: String,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            domain: "localhost".into(),
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
        }
    }
}

type ProxyBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({"code": code, "message": message}).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// TLS for the ingress: a certificate chain and key from PEM files (rustls), ALPN h2 and
/// http/1.1, so HTTP/2 (gRPC) works over TLS too.
pub fn tls_acceptor(
    cert_pem: &std::path::Path,
    key_pem: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
        .and_then(|it| it.collect())
        .map_err(|e| format!("reading certificates from {}: {e}", cert_pem.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert_pem.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .map_err(|e| format!("reading the private key from {}: {e}", key_pem.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not match: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// Serves the ingress on `listener` until the task is dropped; over TLS when `tls` is set.
pub async fn serve(
    listener: TcpListener,
    tokens: Arc<TokenService>,
    backend: Arc<dyn Backend>,
    cfg: ProxyConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let cfg = Arc::new(cfg);
    let apps = Arc::new(Http2Apps::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("ingress accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tokens, backend, cfg, tls) =
            (tokens.clone(), backend.clone(), cfg.clone(), tls.clone());
        let apps = apps.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    serve_connection(TokioIo::new(stream), peer, tokens, backend, cfg, apps).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(cfg.header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let io = TokioIo::new(tls_stream);
                            serve_connection(io, peer, tokens, backend, cfg, apps).await
                        }
                        Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    tokens: Arc<TokenService>,
    backend: Arc<dyn Backend>,
    cfg: Arc<ProxyConfig>,
    apps: Arc<Http2Apps>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (header_timeout, max_buf) = (cfg.header_timeout, cfg.max_header_bytes.max(8192));
    let service = hyper::service::service_fn(move |req| {
        let (tokens, backend, cfg, apps) =
            (tokens.clone(), backend.clone(), cfg.clone(), apps.clone());
        async move {
            let resp = handle(req, peer, &tokens, backend, &cfg, &apps).await;
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(max_buf);
    builder.http2().timer(TokioTimer::new());
    if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
        debug!(%peer, "ingress connection ended: {e}");
    }
}

/// The microVM id from a Host (or :authority) of the form `<id>.<domain>[:port]`.
pub fn microvm_from_host(host: &str, domain: &str) -> Option<String> {
    let host = host
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map(|(h, _)| h)
        .unwrap_or(host);
    let id = host.strip_suffix(domain)?.strip_suffix('.')?;
    valid_id(id).then(|| id.to_string())
}

/// The microVM id from a path of the form `/m/<id>[/rest]`, and the path the app gets:
/// `/rest`, or `/` for `/m/<id>` itself.
pub fn microvm_from_path(path: &str) -> Option<(String, &str)> {
    let rest = path.strip_prefix(PATH_PREFIX)?;
    let (id, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let tail = if tail.is_empty() { "/" } else { tail };
    valid_id(id).then(|| (id.to_string(), tail))
}

/// A DNS label as microVM ids are: lowercase letters, digits and `-`, 1 to 63 of them.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Routes a path-style request: its target loses the `/m/<id>` prefix (the query stays) and
/// the app is told the prefix in `X-Forwarded-Prefix` (any such header the client sent is
/// replaced). The microVM's id, or `None` when the path names none.
fn route_by_path(req: &mut Request<Incoming>) -> Option<String> {
    let (id, tail) = microvm_from_path(req.uri().path())?;
    let target = match req.uri().query() {
        Some(q) => format!("{tail}?{q}"),
        None => tail.to_string(),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(target.parse().ok()?);
    *req.uri_mut() = hyper::Uri::from_parts(parts).ok()?;
    let prefix = HeaderValue::from_str(&format!("{PATH_PREFIX}{id}")).ok()?;
    req.headers_mut()
        .insert(HeaderName::from_static(FORWARDED_PREFIX), prefix);
    Some(id)
}

fn header<'a>(req: &'a Request<Incoming>, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| req.headers().get(*n))
        .and_then(|v| v.to_str().ok())
}

/// Token and port carried in `Sec-WebSocket-Protocol` (browsers cannot set headers).
fn websocket_credentials(req: &Request<Incoming>) -> (Option<String>, Option<String>) {
    let mut token = None;
    let mut port = None;
    for p in websocket_protocols(req) {
        if let Some(t) = p.strip_prefix(WS_AUTH_PREFIX) {
            token = Some(t.to_string());
        } else if let Some(n) = p.strip_prefix(WS_PORT_PREFIX) {
            port = Some(n.to_string());
        }
    }
    (token, port)
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    tokens: &TokenService,
    backend: Arc<dyn Backend>,
    cfg: &ProxyConfig,
    apps: &Http2Apps,
) -> Response<ProxyBody> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| header(&req, &[HOST.as_str()]).map(str::to_string));
    // Host style first (an app's own `/m/…` paths stay its own), then path style.
    let by_host = host
        .as_deref()
        .and_then(|h| microvm_from_host(h, &cfg.domain));
    let Some(id) = by_host.or_else(|| route_by_path(&mut req)) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadHost",
            &format!(
                "name the microVM: Host <microvmId>.{} or a path starting with {PATH_PREFIX}<microvmId>/",
                cfg.domain
            ),
        );
    };
    let span = info_span!("ingress", microvm = %id, %peer, method = %req.method(), path = %req.uri().path());
    async move {
        let (ws_token, ws_port) = websocket_credentials(&req);
        let Some(token) = header(&req, &AUTH_HEADERS).map(str::to_string).or(ws_token) else {
            return error(
                StatusCode::UNAUTHORIZED,
                "MissingToken",
                "send the token from CreateMicrovmAuthToken in X-Kiln-Auth (or X-aws-proxy-auth)",
            );
        };
        let claims = match tokens.verify(&token) {
            Ok(c) => c,
            Err(
                e @ (TokenError::Expired
                | TokenError::Revoked
                | TokenError::Forged
                | TokenError::Malformed),
            ) => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "InvalidToken",
                    &format!("{e}: create a new token"),
                )
            }
        };
        if claims.sub != id {
            return error(
                StatusCode::FORBIDDEN,
                "WrongMicrovm",
                "the token was issued for another microVM",
            );
        }
        let wants_shell = req.uri().path() == crate::shell::SHELL_PATH;
        match (claims.kind, wants_shell) {
            (TokenKind::Shell, true) => {
                for name in AUTH_HEADERS.iter().chain(PORT_HEADERS.iter()) {
                    req.headers_mut().remove(*name);
                }
                let guard = backend.activity(&id);
                let b = backend.clone();
                let shell_id = id.clone();
                let resp = crate::shell::accept(
                    req,
                    move |cols, rows| async move {
                        b.shell(&shell_id, cols, rows).await.map_err(|e| match e {
                            BackendError::NotFound => (
                                StatusCode::NOT_FOUND,
                                format!("microVM {shell_id} does not exist or was terminated"),
                            ),
                            BackendError::NotRunning(why) => (StatusCode::CONFLICT, why),
                            BackendError::Unavailable(why) => (StatusCode::BAD_GATEWAY, why),
                        })
                    },
                    guard,
                )
                .await;
                return resp.map(|b| b.map_err(|e| match e {}).boxed());
            }
            (TokenKind::Shell, false) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "WrongTokenKind",
                    &format!("a shell token only opens {}", crate::shell::SHELL_PATH),
                )
            }
            (TokenKind::Ingress, true) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "WrongTokenKind",
                    "the shell needs a token of kind shell",
                )
            }
            (TokenKind::Ingress, false) => {}
        }
        let port_text = header(&req, &PORT_HEADERS).map(str::to_string).or(ws_port);
        let port = match port_text.as_deref().map(|p| p.trim().parse::<u16>()) {
            None => DEFAULT_PORT,
            Some(Ok(p)) if p > 0 => p,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadPort",
                    "X-Kiln-Port must be a port number",
                )
            }
        };
        if backend.hook_port(&id) == Some(port) {
            return error(
                StatusCode::FORBIDDEN,
                "PortNotAllowed",
                "the lifecycle hook port is never reachable through the ingress",
            );
        }
        if !claims.ports.contains(&port) {
            return error(
                StatusCode::FORBIDDEN,
                "PortNotAllowed",
                &format!(
                    "port {port} is not in the token's allowedPorts {:?}",
                    claims.ports
                ),
            );
        }
        for name in AUTH_HEADERS.iter().chain(PORT_HEADERS.iter()) {
            req.headers_mut().remove(*name);
        }
        strip_websocket_credentials(&mut req);
        let guard = backend.activity(&id);
        let http2 = req.version() == Version::HTTP_2
            && (is_grpc(&req)
                || match apps.known(&id, port) {
                    Some(known) => known,
                    None => match backend.connect(&id, port).await {
                        Ok(probe_stream) => {
                            let found = crate::h2::probe(probe_stream).await;
                            debug!(port, http2 = found, "the guest app's protocol");
                            apps.learn(&id, port, found);
                            found
                        }
                        Err(_) => false, // reported by the connect below
                    },
                });
        let stream = match backend.connect(&id, port).await {
            Ok(s) => s,
            Err(BackendError::NotFound) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "MicrovmNotFound",
                    &format!("microVM {id} does not exist or was terminated"),
                )
            }
            Err(BackendError::NotRunning(why)) => {
                return error(StatusCode::CONFLICT, "MicrovmNotRunning", &why)
            }
            Err(BackendError::Unavailable(why)) => {
                return error(StatusCode::BAD_GATEWAY, "GuestUnavailable", &why)
            }
        };
        forward(req, stream, guard, http2).await
    }
    .instrument(span)
    .await
}

/// The entries of every `Sec-WebSocket-Protocol` header, trimmed, empty ones dropped.
pub(crate) fn websocket_protocols(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .flat_map(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .map(|p| p.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|p| !p.is_empty())
        .collect()
}

fn strip_websocket_credentials(req: &mut Request<Incoming>) {
    let kept: Vec<String> = websocket_protocols(req)
        .into_iter()
        .filter(|p| {
            !p.is_empty() && !p.starts_with(WS_AUTH_PREFIX) && !p.starts_with(WS_PORT_PREFIX)
        })
        .collect();
    req.headers_mut().remove("sec-websocket-protocol");
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            req.headers_mut()
                .insert(HeaderName::from_static("sec-websocket-protocol"), v);
        }
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(UPGRADE)
        && req
            .headers()
            .get(CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"))
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// An HTTP/2 request as an HTTP/1.1 one: origin-form target and a Host header (HTTP/2 carries
/// the authority in the URI).
fn to_http1(req: &mut Request<Incoming>) {
    if let Some(authority) = req.uri().authority().cloned() {
        if !req.headers().contains_key(HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(HOST, v);
            }
        }
    }
    if let Some(pq) = req.uri().path_and_query().cloned() {
        if let Ok(uri) = hyper::Uri::builder().path_and_query(pq).build() {
            *req.uri_mut() = uri;
        }
    }
}

/// Forwards one request over a fresh guest stream: HTTP/2 when `http2` (an HTTP/2 client and
/// an app that speaks it), else HTTP/1.1 (with upgrades). The activity guard lives until the
/// response body ends.
async fn forward(
    mut req: Request<Incoming>,
    stream: Box<dyn GuestStream>,
    guard: Box<dyn Send + Sync>,
    http2: bool,
) -> Response<ProxyBody> {
    let bad_gateway = |what: &str, e: &dyn std::fmt::Display| {
        error(
            StatusCode::BAD_GATEWAY,
            "GuestUnavailable",
            &format!("{what}: {e}"),
        )
    };
    let io = TokioIo::new(stream);
    if http2 {
        let (mut sender, conn) =
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await {
                Ok(pair) => pair,
                Err(e) => return bad_gateway("HTTP/2 to the guest app failed", &e),
            };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return match sender.send_request(req).await {
            Ok(resp) => resp.map(|b| {
                GuardedBody {
                    inner: b,
                    _guard: guard,
                }
                .boxed()
            }),
            Err(e) => bad_gateway("the guest app reset the connection", &e),
        };
    }
    let upgrading = is_upgrade(&req);
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
        Ok(pair) => pair,
        Err(e) => return bad_gateway("HTTP/1.1 to the guest app failed", &e),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    if req.version() == Version::HTTP_2 {
        to_http1(&mut req);
    }
    *req.version_mut() = Version::HTTP_11;
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return bad_gateway("the guest app reset the connection", &e),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let guest_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _guard = guard;
                if let (Ok(client), Ok(guest)) = (client_upgrade.await, guest_upgrade.await) {
                    let (mut c, mut g) = (TokioIo::new(client), TokioIo::new(guest));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut g).await;
                }
            });
            return resp.map(|b| {
                b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .boxed()
            });
        }
    }
    resp.map(|b| {
        GuardedBody {
            inner: b,
            _guard: guard,
        }
        .boxed()
    })
}

/// A response body that keeps the microVM's activity guard until it ends.
struct GuardedBody {
    inner: Incoming,
    _guard: Box<dyn Send + Sync>,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as Self::Error)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_select_a_microvm() {
        assert_eq!(
            microvm_from_path("/m/mvm-1/execute"),
            Some(("mvm-1".to_string(), "/execute"))
        );
        assert_eq!(
            microvm_from_path("/m/mvm-1"),
            Some(("mvm-1".to_string(), "/"))
        );
        assert_eq!(
            microvm_from_path("/m/mvm-1/"),
            Some(("mvm-1".to_string(), "/"))
        );
        assert_eq!(
            microvm_from_path("/m/mvm-1/a/b/"),
            Some(("mvm-1".to_string(), "/a/b/"))
        );
        for bad in [
            "/",
            "/m/",
            "/m//x",
            "/m/MVM/x",
            "/x/m/mvm-1/",
            "/mvm-1/",
            "m/mvm-1/",
        ] {
            assert_eq!(microvm_from_path(bad), None, "{bad}");
        }
        assert_eq!(microvm_from_path(&format!("/m/{}/", "a".repeat(64))), None);
    }

    #[test]
    fn host_names_select_a_microvm() {
        assert_eq!(
            microvm_from_host("mvm-1.localhost", "localhost").as_deref(),
            Some("mvm-1")
        );
        assert_eq!(
            microvm_from_host("mvm-1.localhost:8443", "localhost").as_deref(),
            Some("mvm-1")
        );
        assert_eq!(
            microvm_from_host("mvm-1.sandbox.example", "sandbox.example").as_deref(),
            Some("mvm-1")
        );
        for bad in [
            "localhost",
            ".localhost",
            "a.b.localhost",
            "MVM.localhost",
            "mvm-1.otherhost",
            "mvm_1.localhost",
        ] {
            assert_eq!(microvm_from_host(bad, "localhost"), None, "{bad}");
        }
    }
}
