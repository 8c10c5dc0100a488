//! Webhooks through the real API and real sockets: receivers on loopback get the lifecycle
//! events they asked for, in order, signed (HMAC-SHA256 over the timestamp and the body,
//! checked here independently); a failing receiver is retried with backoff until it
//! answers 2xx, and the delivery log says so; a receiver that never answers slows neither
//! kilnd nor the other webhooks; a deleted webhook gets nothing more; loopback targets are
//! refused without `--allow-private-webhook-targets`, and so are other schemes and unknown
//! event kinds.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestDaemon;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// One request a receiver got: its headers (lowercase names) and body.
#[derive(Clone, Debug)]
struct Got {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A loopback receiver: answers `fail_first` requests with 500, then 200; with `hang`,
/// never answers at all.
fn receiver(fail_first: usize, hang: bool) -> (String, Arc<Mutex<Vec<Got>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook?x=1", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap_or(0);
            assert!(line.starts_with("POST /hook?x=1 HTTP/1.1"), "{line}");
            let mut headers = Vec::new();
            let mut len = 0;
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap();
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                if k == "content-length" {
                    len = v.parse().unwrap();
                }
                headers.push((k, v));
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let n = {
                let mut g = seen.lock().unwrap();
                g.push(Got { headers, body });
                g.len()
            };
            if hang {
                std::thread::sleep(Duration::from_secs(3600));
            }
            let status = if n <= fail_first {
                "500 Oops"
            } else {
                "200 OK"
            };
            let mut w = s;
            let _ = write!(
                w,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, got)
}

fn create(d: &TestDaemon, body: Value) -> Value {
    let (status, w) = d.post("/v1/webhooks", body);
    assert_eq!(status, 201, "{w}");
    w
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn verify(secret: &str, got: &Got) {
    let sig = got.header("kiln-signature");
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .unwrap_or_else(|| panic!("signature {sig:?}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - t.parse::<i64>().unwrap()).abs() < 300,
        "an old timestamp: {sig}"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&got.body);
    mac.verify_slice(&hex::decode(v1).unwrap())
        .unwrap_or_else(|_| panic!("a bad signature {sig}"));
}

#[test]
fn signed_deliveries_retries_and_a_slow_receiver_that_slows_nothing() {
    let d = TestDaemon::start_with(&["--allow-private-webhook-targets"]);
    let (all_url, all) = receiver(0, false);
    let (flaky_url, flaky) = receiver(2, false);
    let (hang_url, hung) = receiver(0, true);
    let w_all = create(&d, json!({"url": all_url, "description": "everything"}));
    let w_flaky = create(&d, json!({"url": flaky_url, "events": ["microvm"]}));
    create(&d, json!({"url": hang_url}));
    let secret = w_all["secret"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 64);
    let (_, list) = d.get("/v1/webhooks");
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 3);
    assert!(
        !list.to_string().contains(&secret),
        "a list never shows secrets"
    );

    // A build and a microVM: image and microVM events.
    let tar = common::tar_of(&[("Dockerfile", "FROM busybox\nCMD [\"sleep\", \"86400\"]\n")]);
    let (_, art) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
    let (_, img) = d.post(
        "/v1/images",
        json!({"name": "hooked", "codeArtifact": {"artifactId": art["artifactId"]}, "waitForReady": false}),
    );
    d.wait_image(img["imageIdentifier"].as_str().unwrap());
    let (_, run) = d.post("/v1/microvms", json!({"imageIdentifier": "hooked"}));
    let id = run["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));

    // Everything, in order, signed.
    wait_for(
        "the RUNNING event reached the receiver",
        Duration::from_secs(30),
        || {
            all.lock().unwrap().iter().any(|g| {
                let e = &g.json()["event"];
                e["microvmId"] == id.as_str() && e["toState"] == "RUNNING"
            })
        },
    );
    let got = all.lock().unwrap().clone();
    let kinds: Vec<String> = got
        .iter()
        .map(|g| g.json()["event"]["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(
        kinds.contains(&"image".to_string()) && kinds.contains(&"microvm".to_string()),
        "{kinds:?}"
    );
    assert!(
        got.iter()
            .any(|g| g.json()["event"]["toState"] == "SUCCESSFUL"),
        "the build's end"
    );
    let seqs: Vec<i64> = got
        .iter()
        .map(|g| g.json()["event"]["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    for g in &got {
        verify(&secret, g);
        assert_eq!(
            g.header("kiln-webhook-id"),
            w_all["webhookId"].as_str().unwrap()
        );
        assert_eq!(g.header("content-type"), "application/json");
        assert_eq!(
            g.json()["deliveryId"].as_str().unwrap(),
            g.header("kiln-delivery-id")
        );
    }
    // A tampered body does not verify.
    let mut forged = got[0].clone();
    forged.body.push(b' ');
    assert!(std::panic::catch_unwind(|| verify(&secret, &forged)).is_err());

    // The flaky receiver: only microVM events, the first retried until it answered 200
    // (two 500s, then after 1 s and 2 s of backoff a 200), and the log says so.
    wait_for(
        "the flaky receiver's retries",
        Duration::from_secs(30),
        || {
            let log = d
                .get(&format!(
                    "/v1/webhooks/{}/deliveries",
                    w_flaky["webhookId"].as_str().unwrap()
                ))
                .1;
            log["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["status"] == "delivered" && x["attempts"] == 3)
        },
    );
    let flaky_got = flaky.lock().unwrap().clone();
    assert!(
        flaky_got
            .iter()
            .all(|g| g.json()["event"]["kind"] == "microvm"),
        "only what it asked for"
    );
    assert_eq!(
        flaky_got[0].header("kiln-delivery-id"),
        flaky_got[1].header("kiln-delivery-id")
    );
    assert_eq!(
        flaky_got[1].header("kiln-delivery-id"),
        flaky_got[2].header("kiln-delivery-id")
    );

    // The receiver that never answers has one request and holds only its own worker: the
    // API answers at once and the others got everything above.
    assert_eq!(hung.lock().unwrap().len(), 1);
    let t = Instant::now();
    assert_eq!(d.get("/v1/webhooks").0, 200);
    assert!(t.elapsed() < Duration::from_secs(2));

    // Deleted: nothing more. (A terminate makes new events.)
    let (status, _) = d.delete(&format!(
        "/v1/webhooks/{}",
        w_all["webhookId"].as_str().unwrap()
    ));
    assert_eq!(status, 204);
    let before = all.lock().unwrap().len();
    d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    d.wait_state(&id, "TERMINATED", Duration::from_secs(60));
    wait_for(
        "the flaky receiver saw the termination",
        Duration::from_secs(30),
        || {
            flaky
                .lock()
                .unwrap()
                .iter()
                .any(|g| g.json()["event"]["toState"] == "TERMINATED")
        },
    );
    assert_eq!(
        all.lock().unwrap().len(),
        before,
        "a deleted webhook got more"
    );
    assert_eq!(
        d.get(&format!(
            "/v1/webhooks/{}/deliveries",
            w_all["webhookId"].as_str().unwrap()
        ))
        .0,
        404
    );
}

#[test]
fn private_targets_other_schemes_and_unknown_kinds_are_refused() {
    let d = TestDaemon::start();
    for (body, needle) in [
        (
            json!({"url": "http://127.0.0.1:9/x"}),
            "--allow-private-webhook-targets",
        ),
        (json!({"url": "http://169.254.169.254/latest"}), "private"),
        (json!({"url": "http://[::1]:9/"}), "private"),
        (json!({"url": "ftp://example.com/"}), "http or https"),
        (json!({"url": "not a url"}), "not a URL"),
        (
            json!({"url": "http://example.com/", "events": ["everything"]}),
            "not an event kind",
        ),
    ] {
        let (status, e) = d.post("/v1/webhooks", body.clone());
        assert_eq!(status, 400, "{body}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
    }
    assert_eq!(d.get("/v1/webhooks").1["webhooks"], json!([]));
    assert_eq!(d.delete("/v1/webhooks/wh-0000000000000000").0, 404);
}

#[test]
fn an_event_not_yet_delivered_when_kilnd_dies_is_delivered_after_the_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // A receiver that answers 503 until it is opened, and records what it accepted.
    let open = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<Value>::new()));
    let tried = Arc::new(Mutex::new(0usize));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook?x=1", l.local_addr().unwrap());
    let (o, a, t) = (open.clone(), accepted.clone(), tried.clone());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let (mut line, mut len) = (String::new(), 0);
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            *t.lock().unwrap() += 1;
            let status = if o.load(Ordering::SeqCst) {
                a.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                "200 OK"
            } else {
                "503 Not yet"
            };
            let mut w = s;
            let _ = write!(
                w,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    let mut d = TestDaemon::start_with(&["--allow-private-webhook-targets"]);
    create(&d, json!({"url": url, "events": ["image"]}));
    let tar = common::tar_of(&[("Dockerfile", "FROM busybox\nCMD [\"sleep\", \"86400\"]\n")]);
    let (_, art) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
    let (_, img) = d.post(
        "/v1/images",
        json!({"name": "crashy", "codeArtifact": {"artifactId": art["artifactId"]}, "waitForReady": false}),
    );
    d.wait_image(img["imageIdentifier"].as_str().unwrap());
    wait_for("a failed attempt", Duration::from_secs(30), || {
        *tried.lock().unwrap() >= 1
    });
    // kilnd dies while the build's events are still undelivered; the next one delivers them.
    d.kill9();
    d.spawn(&["--allow-private-webhook-targets"]);
    open.store(true, Ordering::SeqCst);
    wait_for(
        "the build's end delivered after the restart",
        Duration::from_secs(60),
        || {
            accepted
                .lock()
                .unwrap()
                .iter()
                .any(|p| p["event"]["toState"] == "SUCCESSFUL")
        },
    );
    let got = accepted.lock().unwrap().clone();
    assert!(got.iter().all(|p| p["event"]["kind"] == "image"), "{got:?}");
    assert!(
        got.iter().any(|p| p["event"]["toState"] == "CREATING"),
        "the first event too: {got:?}"
    );
}
