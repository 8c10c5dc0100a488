//! Webhooks: lifecycle events POSTed to users' URLs. A dispatcher reads the store's events
//! after each webhook's cursor every tick and hands the ones it asked for to that webhook's
//! own worker (a bounded queue), which delivers them in order, signed, with retries and
//! backoff, and records each delivery in a log (the newest [`LOG_KEPT`] in memory). A slow
//! or failing receiver holds only its own worker: kilnd's API, actors and other webhooks
//! never wait on it. Every attempt resolves the target again and refuses loopback,
//! link-local and private addresses unless kilnd runs with `--allow-private-webhook-targets`
//! (a name that resolves elsewhere later cannot point kilnd at its own network).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use kiln_api::{Delivery, DeliveryStatus, Event, WebhookPayload};
use kiln_store::{EventRow, WebhookRow};
use sha2::Sha256;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::manager::Manager;

/// Deliveries kept per webhook in the log.
pub const LOG_KEPT: usize = 100;
/// Events queued per webhook before new ones are recorded as failed ("queue full").
const QUEUE: usize = 1000;
/// Attempts per delivery, and the wait before each retry.
const BACKOFF_S: [u64; 5] = [1, 2, 4, 8, 16];
/// One attempt: connect, send, and the receiver's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// A webhook's target, checked: the scheme, where to connect, and what to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parses and checks a webhook URL (scheme, host, no credentials).
pub fn parse(url: &str) -> Result<Target, String> {
    let u = url::Url::parse(url).map_err(|e| format!("url {url:?} is not a URL: {e}"))?;
    let https = match u.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(format!(
                "url: the scheme must be http or https, not {other:?}"
            ))
        }
    };
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "url: credentials in the URL are not sent; put them in the path or drop them".into(),
        );
    }
    let host = u
        .host_str()
        .ok_or_else(|| format!("url {url:?} has no host"))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = u
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    let mut path = u.path().to_string();
    if let Some(q) = u.query() {
        path = format!("{path}?{q}");
    }
    Ok(Target {
        https,
        host,
        port,
        path,
    })
}

/// Addresses a webhook may not reach without `--allow-private-webhook-targets`.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared (CGNAT) space
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00 // unique local
                    || (first & 0xffc0) == 0xfe80 // link local
            }
        },
    }
}

/// Where to connect: the first address the host resolves to, all of them allowed.
pub async fn resolve(t: &Target, allow_private: bool) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((t.host.as_str(), t.port)),
    )
    .await
    .map_err(|_| format!("{} did not resolve in 5 s", t.host))?
    .map_err(|e| format!("{} does not resolve: {e}", t.host))?
    .collect();
    if !allow_private {
        if let Some(bad) = addrs.iter().find(|a| forbidden(a.ip())) {
            return Err(format!(
                "{} resolves to {}, a loopback, link-local or private address: refused \
                 (kilnd --allow-private-webhook-targets allows it)",
                t.host,
                bad.ip()
            ));
        }
    }
    addrs
        .first()
        .copied()
        .ok_or_else(|| format!("{} has no address", t.host))
}

/// `Kiln-Signature`'s value: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    // INVARIANT: HMAC takes a key of any length.
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// What a webhook's worker does next, in order.
enum Job {
    Deliver(EventRow),
    /// Everything up to this event is done: the stored cursor moves, so a restart of kilnd
    /// delivers again only what was not finished.
    Done(i64),
}

/// The workers and delivery logs of every webhook.
#[derive(Default)]
pub struct Webhooks {
    workers: Mutex<HashMap<String, mpsc::Sender<Job>>>,
    /// The last event handed to each worker (the stored cursor trails it).
    dispatched: Mutex<HashMap<String, i64>>,
    log: Arc<Mutex<HashMap<String, VecDeque<Delivery>>>>,
}

impl Webhooks {
    pub fn deliveries(&self, id: &str) -> Vec<Delivery> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.get(id)
            .map(|d| d.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    pub fn forget(&self, id: &str) {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.dispatched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

fn record(log: &Mutex<HashMap<String, VecDeque<Delivery>>>, webhook: &str, d: &Delivery) {
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    let entries = log.entry(webhook.to_string()).or_default();
    match entries.iter_mut().find(|e| e.delivery_id == d.delivery_id) {
        Some(e) => *e = d.clone(),
        None => {
            if entries.len() == LOG_KEPT {
                entries.pop_front();
            }
            entries.push_back(d.clone());
        }
    }
}

/// Hands new events to the webhooks' workers, every tick, until kilnd stops.
pub fn spawn_dispatcher(m: &Arc<Manager>) {
    let m = m.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(m.cfg.tick).await;
            if let Err(e) = dispatch(&m) {
                warn!("webhook dispatch failed: {e}");
            }
        }
    });
}

fn dispatch(m: &Arc<Manager>) -> Result<(), kiln_store::StoreError> {
    let hooks = m.store().webhooks()?;
    {
        let mut workers = m.webhooks.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.retain(|id, _| hooks.iter().any(|h| &h.id == id));
    }
    for hook in hooks {
        let from = {
            let d = m
                .webhooks
                .dispatched
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            d.get(&hook.id).copied().unwrap_or(0).max(hook.cursor)
        };
        let events = m.store().events_since(from, 200)?;
        let Some(last) = events.last().map(|e| e.seq) else {
            continue;
        };
        let tx = worker(m, &hook);
        for e in events {
            if !hook.events.is_empty() && !hook.events.contains(&e.kind) {
                continue;
            }
            if let Err(full) = tx.try_send(Job::Deliver(e)) {
                if let Job::Deliver(e) = full.into_inner() {
                    let why = "dropped: over 1000 deliveries were waiting for this receiver";
                    record(&m.webhooks.log, &hook.id, &failed(&e, why));
                }
            }
        }
        // A full queue only delays the stored cursor: the next Done carries it past this.
        let _ = tx.try_send(Job::Done(last));
        m.webhooks
            .dispatched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hook.id.clone(), last);
    }
    Ok(())
}

fn failed(e: &EventRow, why: &str) -> Delivery {
    Delivery {
        delivery_id: format!("dl-{}-{}", e.seq, rand::random::<u32>()),
        event_seq: e.seq,
        event_kind: e.kind.clone(),
        status: DeliveryStatus::Failed,
        attempts: 0,
        last_status_code: None,
        last_error: Some(why.into()),
        last_attempt_at_ms: kiln_store::now_ms(),
        next_attempt_at_ms: None,
    }
}

/// The webhook's worker (started on first use): its events, one at a time, in order.
fn worker(m: &Arc<Manager>, hook: &WebhookRow) -> mpsc::Sender<Job> {
    let mut workers = m.webhooks.workers.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = workers.get(&hook.id) {
        return tx.clone();
    }
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
    workers.insert(hook.id.clone(), tx.clone());
    let (m, hook) = (m.clone(), hook.clone());
    tokio::spawn(async move {
        let allow = m.cfg.allow_private_webhook_targets;
        while let Some(job) = rx.recv().await {
            match job {
                Job::Deliver(e) => deliver(&hook, &e, &m.webhooks.log, allow).await,
                Job::Done(seq) => {
                    if let Err(e) = m.write(|s| s.set_webhook_cursor(&hook.id, seq)) {
                        warn!(webhook = %hook.id, "storing the webhook's cursor: {e}");
                    }
                }
            }
        }
        debug!(webhook = %hook.id, "webhook worker ended");
    });
    tx
}

async fn deliver(
    hook: &WebhookRow,
    e: &EventRow,
    log: &Mutex<HashMap<String, VecDeque<Delivery>>>,
    allow_private: bool,
) {
    let delivery_id = format!("dl-{:016x}", rand::random::<u64>());
    let payload = WebhookPayload {
        webhook_id: hook.id.clone(),
        delivery_id: delivery_id.clone(),
        event: Event {
            seq: e.seq,
            at_ms: e.at_ms,
            microvm_id: e.microvm_id.clone(),
            image_id: e.image_id.clone(),
            kind: e.kind.clone(),
            from_state: e.from_state.clone(),
            to_state: e.to_state.clone(),
            reason: e.reason.clone(),
        },
    };
    let body = serde_json::to_vec(&payload).unwrap_or_default();
    let mut d = Delivery {
        delivery_id,
        event_seq: e.seq,
        event_kind: e.kind.clone(),
        status: DeliveryStatus::Retrying,
        attempts: 0,
        last_status_code: None,
        last_error: None,
        last_attempt_at_ms: kiln_store::now_ms(),
        next_attempt_at_ms: None,
    };
    for attempt in 0..=BACKOFF_S.len() {
        d.attempts = attempt as u32 + 1;
        d.last_attempt_at_ms = kiln_store::now_ms();
        let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, post(hook, &d, &body, allow_private))
            .await
            .unwrap_or_else(|_| Err(format!("no answer in {ATTEMPT_TIMEOUT:?}")));
        match outcome {
            Ok(code) => {
                d.last_status_code = Some(code);
                d.last_error = (!(200..300).contains(&code)).then(|| format!("HTTP {code}"));
            }
            Err(why) => {
                d.last_status_code = None;
                d.last_error = Some(why);
            }
        }
        if d.last_error.is_none() {
            d.status = DeliveryStatus::Delivered;
            d.next_attempt_at_ms = None;
            record(log, &hook.id, &d);
            return;
        }
        match BACKOFF_S.get(attempt) {
            Some(wait) => {
                d.status = DeliveryStatus::Retrying;
                d.next_attempt_at_ms = Some(d.last_attempt_at_ms + *wait as i64 * 1000);
                record(log, &hook.id, &d);
                tokio::time::sleep(Duration::from_secs(*wait)).await;
            }
            None => {
                d.status = DeliveryStatus::Failed;
                d.next_attempt_at_ms = None;
                record(log, &hook.id, &d);
                warn!(webhook = %hook.id, seq = e.seq, error = ?d.last_error, "webhook delivery failed");
            }
        }
    }
}

/// One POST; the receiver's status code.
async fn post(
    hook: &WebhookRow,
    d: &Delivery,
    body: &[u8],
    allow_private: bool,
) -> Result<u16, String> {
    let t = parse(&hook.url)?;
    let addr = resolve(&t, allow_private).await?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let now = kiln_store::now_ms() / 1000;
    let req = hyper::Request::post(&t.path)
        .header("host", host_header(&t))
        .header("content-type", "application/json")
        .header("user-agent", "kiln-webhooks")
        .header("kiln-webhook-id", &hook.id)
        .header("kiln-delivery-id", &d.delivery_id)
        .header("kiln-signature", signature(&hook.secret, now, body))
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            body,
        )))
        .map_err(|e| e.to_string())?;
    if t.https {
        let tls = tls_connector()
            .connect(server_name(&t.host)?, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", t.host))?;
        send(hyper_util::rt::TokioIo::new(tls), req).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req).await
    }
}

async fn send<I>(
    io: I,
    req: hyper::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<u16, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    Ok(resp.status().as_u16())
}

fn host_header(t: &Target) -> String {
    let host = if t.host.contains(':') {
        format!("[{}]", t.host)
    } else {
        t.host.clone()
    };
    match (t.https, t.port) {
        (true, 443) | (false, 80) => host,
        (_, p) => format!("{host}:{p}"),
    }
}

fn server_name(host: &str) -> Result<tokio_rustls::rustls::pki_types::ServerName<'static>, String> {
    tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host} is not a TLS server name: {e}"))
}

/// TLS to receivers, trusting the web's public roots (Mozilla's, from webpki-roots).
fn tls_connector() -> tokio_rustls::TlsConnector {
    use std::sync::OnceLock;
    static CONFIG: OnceLock<Arc<tokio_rustls::rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let roots = tokio_rustls::rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Arc::new(
            tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|_| {
                tokio_rustls::rustls::ClientConfig::builder()
                    .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
                    .with_no_client_auth()
            }),
        )
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let t = parse("https://hooks.example.com/a/b?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                https: true,
                host: "hooks.example.com".into(),
                port: 443,
                path: "/a/b?x=1".into()
            }
        );
        assert_eq!(parse("http://127.0.0.1:9/").unwrap().port, 9);
        assert_eq!(parse("http://[::1]:9/x").unwrap().host, "::1");
        for bad in [
            "ftp://x/",
            "file:///etc/passwd",
            "not a url",
            "http://u:p@x/",
            "gopher://x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn private_ranges_are_forbidden() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(forbidden(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(!forbidden(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn loopback_is_refused_unless_allowed() {
        let t = parse("http://127.0.0.1:9/").unwrap();
        assert!(resolve(&t, false)
            .await
            .unwrap_err()
            .contains("--allow-private-webhook-targets"));
        assert_eq!(resolve(&t, true).await.unwrap().port(), 9);
    }

    #[test]
    fn signatures_are_hmac_sha256_of_time_and_body() {
        let s = signature("key", 1700000000, b"{}");
        assert!(
            s.starts_with("t=1700000000,v1=") && s.len() == "t=1700000000,v1=".len() + 64,
            "{s}"
        );
        assert_ne!(s, signature("key", 1700000001, b"{}"));
        assert_ne!(s, signature("other", 1700000000, b"{}"));
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"1700000000.{}");
        assert_eq!(
            s,
            format!(
                "t=1700000000,v1={}",
                hex::encode(mac.finalize().into_bytes())
            )
        );
    }
}
