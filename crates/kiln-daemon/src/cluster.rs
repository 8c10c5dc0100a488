//! kilnd among nodes that share one PostgreSQL database.
//!
//! Each kilnd is a node (`--node-name`, unique: the store holds a lock per name for the
//! life of the process) registered with where the others reach its API (`--advertise`) and
//! what it offers (`--capacity-*`), and a heartbeat every third of `--node-lease-seconds`.
//! Every microVM row names its owner node; a node recovers, meters and idles only its own.
//! An API call for a microVM owned by another node is forwarded to it (one hop, with the
//! cluster's API key: every node is given the same `api-key` file), so any node serves any
//! microVM. The ingress token keys and revocations are merged through the store
//! ([`sync_tokens`]), so a token from any node works on every node. A call for one whose owner's lease ran out answers 503: the microVM is
//! unreachable until that node is back, never started a second time elsewhere.
//!
//! With SQLite (one node), every row is this node's and nothing is forwarded.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use kiln_api::{ErrorCode, NodeCapacity};
use kiln_store::{now_ms, MicrovmRow, NodeRow};
use kiln_types::MicrovmState;
use tracing::{info, warn};

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

/// Set on a forwarded call: the owner serves it, whatever its store says (one hop only).
pub const FORWARDED_BY: &str = "x-kiln-forwarded-by";
/// How long a forward waits for the owner to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The store is shared with other nodes (PostgreSQL).
pub fn is_shared(m: &Manager) -> bool {
    matches!(m.cfg.database, crate::config::Database::Postgres { .. })
}

/// This node owns the row (always, with SQLite; rows from before nodes have no owner).
pub fn is_mine(m: &Manager, row: &MicrovmRow) -> bool {
    !is_shared(m) || row.node == m.cfg.node_name || row.node.is_empty()
}

/// This node's microVMs (of one state), oldest first.
pub fn own_microvms(
    m: &Manager,
    state: Option<MicrovmState>,
) -> kiln_store::Result<Vec<MicrovmRow>> {
    let rows = m.store().microvms(state, None)?;
    Ok(rows.into_iter().filter(|r| is_mine(m, r)).collect())
}

/// This node's microVMs that are not TERMINATED (what `--max-microvms` counts).
pub fn own_live_count(m: &Manager) -> kiln_store::Result<usize> {
    if !is_shared(m) {
        return m.store().count_live_microvms();
    }
    let rows = own_microvms(m, None)?;
    Ok(rows
        .iter()
        .filter(|r| r.state != MicrovmState::Terminated)
        .count())
}

/// The node that owns the row.
pub(crate) fn owner<'a>(m: &'a Manager, row: &'a MicrovmRow) -> &'a str {
    if is_mine(m, row) {
        &m.cfg.node_name
    } else {
        &row.node
    }
}

fn lease_ms(m: &Manager) -> i64 {
    m.cfg.node_lease.as_millis() as i64
}

pub(crate) fn reachable(m: &Manager, node: &NodeRow, now: i64) -> bool {
    node.name == m.cfg.node_name || now - node.heartbeat_at <= lease_ms(m)
}

/// What this node offers: the flags, else the machine's memory, CPUs and KILN_HOME's disk.
fn capacity(m: &Manager) -> NodeCapacity {
    let c = &m.cfg.capacity;
    let memory = || {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    let disk = || {
        nix::sys::statvfs::statvfs(&m.cfg.home)
            .map_or(0, |s| s.blocks() * s.fragment_size() / (1 << 20))
    };
    NodeCapacity {
        memory_mib: c.memory_mib.unwrap_or_else(memory),
        vcpus: c
            .vcpus
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)),
        disk_mib: c.disk_mib.unwrap_or_else(disk),
    }
}

/// Registers this node (its API at `api`, unless `--advertise` says otherwise) and keeps
/// its heartbeat going.
pub fn register(m: &Arc<Manager>, api: std::net::SocketAddr) -> anyhow::Result<()> {
    let advertise = m.cfg.advertise.clone().unwrap_or_else(|| api.to_string());
    let now = now_ms();
    let row = NodeRow {
        name: m.cfg.node_name.clone(),
        advertise: advertise.clone(),
        capacity: serde_json::to_value(capacity(m))?,
        started_at: now,
        heartbeat_at: now,
    };
    m.write(|s| s.upsert_node(&row))?;
    tokio::task::block_in_place(|| sync_tokens(m))?;
    if is_shared(m) && m.cfg.api_tls_cert.is_some() && m.node_tls.is_none() {
        warn!(
            "the API speaks TLS, but this node calls the others over plain HTTP: give every \
             node --cluster-ca-file (the CA that signed the nodes' --api-tls-cert), or the \
             nodes cannot pass calls to this one at --advertise {advertise}"
        );
    }
    info!(node = %row.name, %advertise, "node registered");
    // Drain steps and hand-offs: apart from the heartbeat, which a slow suspend must never
    // hold up (the lease would run out).
    let mover = m.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(mover.cfg.node_lease / 3);
        for n in 0u64.. {
            tick.tick().await;
            // Images and snapshots whose upload failed (object storage was down): at
            // start, then every tenth step.
            if n % 10 == 0 {
                crate::share::publish_missing(&mover).await;
                crate::travel::upload_missing(&mover).await;
            }
            crate::drain::tick(&mover).await;
            crate::travel::adopt_handed(&mover).await;
            crate::gc::tick(&mover).await;
        }
    });
    let m = m.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(m.cfg.node_lease / 3);
        loop {
            tick.tick().await;
            if m.left_cluster.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let beat = m.write(|s| -> kiln_store::Result<()> {
                if !s.heartbeat(&row.name, now_ms())? {
                    s.upsert_node(&NodeRow {
                        heartbeat_at: now_ms(),
                        ..row.clone()
                    })?;
                }
                Ok(())
            });
            if let Err(e) = beat {
                warn!("node heartbeat failed (its lease runs out unless the next one lands): {e}");
            }
            let shared = m.clone();
            match tokio::task::spawn_blocking(move || {
                if let Err(e) = crate::live::publish(&shared) {
                    warn!("sharing this node's live figures failed: {e}");
                }
                sync_tokens(&shared)
            })
            .await
            {
                Ok(Err(e)) => warn!("syncing the ingress token keys failed: {e:#}"),
                Err(e) => warn!("syncing the ingress token keys: {e}"),
                Ok(Ok(())) => {}
            }
        }
    });
    Ok(())
}

/// Where the ingress token keys and revocations are shared in the store.
const TOKEN_KEYS: &str = "ingress-keys";
const TOKEN_REVOCATIONS: &str = "ingress-revocations";

/// Merges the cluster's ingress token keys and revocations with this node's and writes the
/// union back, so a token issued, or revoked, on any node holds on every node (within a
/// heartbeat; at once on the node that changed them). Blocking (files, the store).
pub fn sync_tokens(m: &Manager) -> anyhow::Result<()> {
    if !is_shared(m) {
        return Ok(());
    }
    let stored_keys = m.store().shared_value(TOKEN_KEYS)?;
    let stored_revoked = m.store().shared_value(TOKEN_REVOCATIONS)?;
    if let Some(keys) = &stored_keys {
        let revoked = stored_revoked
            .clone()
            .unwrap_or_else(|| m.tokens.export().1);
        m.tokens.merge(keys, &revoked)?;
    }
    let (keys, revoked) = m.tokens.export();
    if stored_keys.as_deref() != Some(keys.as_str()) {
        m.store().set_shared_value(TOKEN_KEYS, &keys)?;
    }
    if stored_revoked.as_deref() != Some(revoked.as_str()) {
        m.store().set_shared_value(TOKEN_REVOCATIONS, &revoked)?;
    }
    Ok(())
}

/// [`sync_tokens`] from an async task, right after this node changed its keys or
/// revocations; a failure is logged (the next heartbeat tries again).
pub fn share_tokens(m: &Manager) {
    if !is_shared(m) {
        return;
    }
    if let Err(e) = tokio::task::block_in_place(|| sync_tokens(m)) {
        warn!("sharing the ingress token keys failed (the next heartbeat retries): {e:#}");
    }
}

/// The microVM a path is about: `/v1/microvms/{id}` and everything under it.
fn microvm_in_path(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/v1/microvms/")?.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// The node to forward a call about `id` to, if another node owns it and it is live (an
/// error says when it is not). With SQLite, never.
pub fn owner_elsewhere(m: &Manager, id: &str) -> ApiResult<Option<NodeRow>> {
    if !is_shared(m) {
        return Ok(None);
    }
    let Some(row) = m.store().microvm(id)? else {
        return Ok(None);
    };
    // A TERMINATED microVM is a record: any node answers from the store.
    if is_mine(m, &row) || row.state == MicrovmState::Terminated {
        return Ok(None);
    }
    let node = m.store().nodes()?.into_iter().find(|n| n.name == row.node);
    let Some(node) = node else {
        return Err(ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!(
                "microVM {id} belongs to node {:?}, which is not registered",
                row.node
            ),
        ));
    };
    let now = now_ms();
    if !reachable(m, &node, now) {
        return Err(ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!(
                "microVM {id} is UNREACHABLE: its node {:?} ({}) sent no heartbeat for {} s \
                 (lease {} s); it is not started elsewhere, and is served again when that node \
                 is back",
                node.name,
                node.advertise,
                (now - node.heartbeat_at) / 1000,
                m.cfg.node_lease.as_secs()
            ),
        ));
    }
    Ok(Some(node))
}

/// Sends a JSON call to `node` (this node's caller authenticated) and answers with its reply.
pub async fn forward_json(
    m: &Manager,
    node: &NodeRow,
    path: &str,
    body: &impl serde::Serialize,
) -> ApiResult<Response> {
    let bytes = serde_json::to_vec(body).map_err(ApiError::internal)?;
    let req = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(bytes))
        .map_err(ApiError::internal)?;
    forward(m, node, req).await
}

/// Refused (409) when the store says another node owns microVM `id` now.
pub fn still_mine(m: &Manager, id: &str) -> ApiResult<()> {
    if !is_shared(m) {
        return Ok(());
    }
    match m.store().ownership(id)? {
        Some((node, _)) if !node.is_empty() && node != m.cfg.node_name => {
            Err(ApiError::conflict(format!(
                "microVM {id} belongs to node {node:?} now, not {:?}",
                m.cfg.node_name
            )))
        }
        _ => Ok(()),
    }
}

/// Why `row` is UNREACHABLE, if it is: another node owns it, it is not TERMINATED, and that
/// node's lease has run out (or it is not registered).
pub fn unreachable(m: &Manager, row: &MicrovmRow) -> Option<String> {
    if is_mine(m, row) || row.state == MicrovmState::Terminated {
        return None;
    }
    match owner_elsewhere(m, &row.id) {
        Err(e) if e.code == ErrorCode::ServiceUnavailable => Some(e.message),
        _ => None,
    }
}

/// Middleware (after authentication): a call about another node's microVM goes to it.
pub async fn to_owner(Extension(m): Extension<Arc<Manager>>, req: Request, next: Next) -> Response {
    if !is_shared(&m) {
        return next.run(req).await;
    }
    let Some(id) = microvm_in_path(req.uri().path()).map(str::to_string) else {
        return next.run(req).await;
    };
    // A call already passed on once is served only by the owner: never a second hop, and
    // never acted on by a node that does not own the microVM (whoever set the header). A
    // SUSPENDED one stranded on a node that is gone, or handed to this one, is taken over
    // first (a node without room hands it on to one with room, and passes the call there).
    let forwarded = req.headers().contains_key(FORWARDED_BY);
    if let Err(e) = crate::travel::take_stranded(&m, &id).await {
        return e.into_response();
    }
    match owner_elsewhere(&m, &id) {
        Ok(None) => next.run(req).await,
        // Handed to the very node that passed the call on, while it was on its way: a
        // moment's race, answered as one (retry).
        Ok(Some(node))
            if forwarded
                && req
                    .headers()
                    .get(FORWARDED_BY)
                    .and_then(|v| v.to_str().ok())
                    == Some(node.name.as_str()) =>
        {
            ApiError::new(
                ErrorCode::ServiceUnavailable,
                format!(
                    "microVM {id} moved to node {:?} while this call was on its way: retry",
                    node.name
                ),
            )
            .into_response()
        }
        Ok(Some(node)) if forwarded => ApiError::conflict(format!(
            "microVM {id} belongs to node {:?}, not {:?}: send the call without {FORWARDED_BY}",
            node.name, m.cfg.node_name
        ))
        .into_response(),
        Ok(Some(node)) => forward(&m, &node, req)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(e) => e.into_response(),
    }
}

/// The TLS connector for calls to other nodes, trusting the PEM CA certificates in `ca`.
pub fn node_connector(ca: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use anyhow::Context;
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .with_context(|| format!("reading the CA certificates in {}", ca.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        ca.display()
    );
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .with_context(|| format!("a CA certificate in {}", ca.display()))?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// An HTTP/1.1 connection to `node`'s API (HTTPS with `--cluster-ca-file`), its driver
/// spawned (upgrades allowed); the error says what failed, for the caller's message.
pub(crate) async fn connect_node<B>(
    m: &Manager,
    node: &NodeRow,
) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connect = tokio::net::TcpStream::connect(&node.advertise);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let Some(tls) = &m.node_tls else {
        return http1(stream).await;
    };
    let host = advertised_host(&node.advertise);
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("--advertise host {host:?}: {e}"))?;
    let handshake = tls.connect(name, stream);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| "the TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    http1(stream).await
}

/// The host of an `--advertise` address (`host:port`, `[v6]:port`).
fn advertised_host(advertise: &str) -> &str {
    let host = advertise
        .rsplit_once(':')
        .map_or(advertise, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

async fn http1<IO, B>(io: IO) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Sends the call to `node` as it came (streams both ways), authenticated with the key
/// (a browser's session cookie means nothing there).
async fn forward(m: &Manager, node: &NodeRow, mut req: Request) -> ApiResult<Response> {
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::new(
            ErrorCode::ServiceUnavailable,
            format!(
                "node {:?} at {}, which runs this microVM, does not answer ({e}); retry",
                node.name, node.advertise
            ),
        )
    };
    let mut sender = connect_node(m, node).await.map_err(|e| unreachable(&e))?;
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *req.uri_mut() = path.parse().map_err(ApiError::internal)?;
    let headers = req.headers_mut();
    headers.remove(header::COOKIE);
    let value = |s: &str| HeaderValue::from_str(s).map_err(ApiError::internal);
    headers.insert(header::AUTHORIZATION, value(&format!("Bearer {}", m.key))?);
    headers.insert(header::HOST, value(&node.advertise)?);
    headers.insert(FORWARDED_BY, value(&m.cfg.node_name)?);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    Ok(resp.map(axum::body::Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_microvm_of_a_path() {
        assert_eq!(microvm_in_path("/v1/microvms/mvm-1"), Some("mvm-1"));
        assert_eq!(
            microvm_in_path("/v1/microvms/mvm-1/files/content"),
            Some("mvm-1")
        );
        assert_eq!(microvm_in_path("/v1/microvms"), None);
        assert_eq!(microvm_in_path("/v1/microvms/"), None);
        assert_eq!(microvm_in_path("/v1/images/x"), None);
    }

    #[test]
    fn the_host_of_an_advertise_address() {
        assert_eq!(advertised_host("10.0.0.5:7070"), "10.0.0.5");
        assert_eq!(advertised_host("node-a.internal:7070"), "node-a.internal");
        assert_eq!(advertised_host("[fd00::5]:7070"), "fd00::5");
    }
}
