//! Nothing a client sends can exhaust kilnd: a barrage of hostile requests (deep nesting,
//! bodies over the limit, an upload over its limit, a Dockerfile whose variables double on
//! every line, oversized query strings) leaves kilnd answering, serving a microVM all the
//! while, its resident memory within a bound of where it started, and no file written outside
//! KILN_HOME (its temporary directory stays empty).

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{tar_of, TestDaemon};
use serde_json::json;

/// kilnd's resident memory (kB).
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// A body of `n` bytes that never ends (for an upload over its limit).
struct Endless(u64);

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.0 as usize);
        buf[..n].fill(b'k');
        self.0 -= n as u64;
        Ok(n)
    }
}

#[test]
fn a_barrage_of_hostile_requests_leaves_kilnd_answering_within_its_memory() {
    let mut d = TestDaemon::start();
    let image = d.build_image("bystander", &[("Dockerfile", "FROM busybox\n")], json!({}));
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": image}));
    assert_eq!(status, 200, "{r}");
    let vm = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&vm, "RUNNING", Duration::from_secs(90));
    // Anything kilnd would write outside KILN_HOME lands in its temporary directory.
    let tmp = tempfile::tempdir().unwrap();
    d.sigterm();
    d.spawn_env(
        &["--max-artifact-mib", "8"],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
    );
    // Warm up the paths the barrage takes, then measure where kilnd starts from.
    for _ in 0..3 {
        d.post("/v1/microvms", json!({"imageIdentifier": "none"}));
        d.get("/v1/microvms");
    }
    let before = rss_kb(d.pid());
    let started = Instant::now();

    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                // JSON nested past any parser's patience, within the body limit.
                let deep = format!("{}{}", "[".repeat(60_000), "]".repeat(4_000));
                for _ in 0..25 {
                    let (status, _) =
                        d.post_raw("/v1/microvms", "application/json", deep.as_bytes(), true);
                    assert_eq!(status, 400);
                }
                // Bodies over the 64 KiB limit: a 413, or the connection closed once kilnd
                // has answered without reading the rest.
                let big = vec![b' '; 1 << 20];
                for _ in 0..10 {
                    let sent = ureq::post(&format!("{}/v1/images", d.base))
                        .set("Authorization", &format!("Bearer {}", d.key))
                        .set("Content-Type", "application/json")
                        .send_bytes(&big);
                    match sent {
                        Err(ureq::Error::Status(413, _)) | Err(ureq::Error::Transport(_)) => {}
                        other => panic!("a body over the limit: {other:?}"),
                    }
                }
                // Query strings of 8 KiB.
                let q = "x".repeat(8 << 10);
                for _ in 0..25 {
                    let (status, _) = d.get(&format!("/v1/events?since={q}"));
                    assert_eq!(status, 400);
                }
            });
        }
        // The microVM is served all the while.
        s.spawn(|| {
            for _ in 0..10 {
                let (status, out) = d.post(
                    &format!("/v1/microvms/{vm}/exec"),
                    json!({"command": ["echo", "served"]}),
                );
                assert_eq!(
                    (status, out["stdout"].as_str()),
                    (200, Some("served\n")),
                    "{out}"
                );
            }
        });
        // An upload that would never end: cut at its limit, never held in memory.
        s.spawn(|| {
            let resp = ureq::post(&format!("{}/v1/artifacts", d.base))
                .set("Authorization", &format!("Bearer {}", d.key))
                .set("Content-Type", "application/octet-stream")
                .send(Endless(256 << 20));
            match resp {
                Err(ureq::Error::Status(413, _)) => {}
                // kilnd may close the connection once it has answered.
                Err(ureq::Error::Transport(_)) => {}
                other => panic!("an upload over the limit: {other:?}"),
            }
        });
    });

    // The Dockerfile whose variable doubles on every line: refused while planning, before it
    // costs memory (it once asked for gigabytes).
    let mut dockerfile = String::from("FROM busybox\nENV A=aaaaaaaaaaaaaaaa\n");
    for _ in 0..40 {
        dockerfile.push_str("ENV A=$A$A\n");
    }
    let tar = tar_of(&[("Dockerfile", &dockerfile)]);
    let (status, art) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
    assert_eq!(status, 200, "{art}");
    let (status, img) = d.post(
        "/v1/images",
        json!({"name": "doubling", "codeArtifact": {"artifactId": art["artifactId"]}}),
    );
    assert_eq!(status, 202, "{img}");
    let id = img["imageIdentifier"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let (_, v) = d.get(&format!("/v1/images/{id}"));
        if v["status"] != "CREATING" {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["status"], "FAILED", "{v}");

    let after = rss_kb(d.pid());
    eprintln!("kilnd resident memory: {before} kB before, {after} kB after");
    assert_eq!(d.get("/health").0, 200, "kilnd still answers");
    let written: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(
        written.is_empty(),
        "kilnd wrote outside KILN_HOME: {written:?}"
    );
    assert_eq!(d.get(&format!("/v1/microvms/{vm}")).1["state"], "RUNNING");
    // Allocators keep some of what was freed: the bound is generous, the point is that no
    // input's size is what kilnd holds.
    assert!(
        after < before + 96 * 1024,
        "kilnd grew from {before} kB to {after} kB in {:?}",
        started.elapsed()
    );
}

/// Sends `request` on `conn` and reads the response's head (status line and headers),
/// lower-cased, and its body by Content-Length.
fn exchange(conn: &mut std::net::TcpStream, request: &[u8]) -> String {
    use std::io::Write;
    conn.write_all(request).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            conn.read(&mut byte).unwrap(),
            1,
            "closed mid-head: {head:?}"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).unwrap();
    head
}

/// A refusal sent before the request's body was read says `Connection: close`, and the
/// connection then closes, so no client reuses it; a request whose body was read keeps
/// its connection.
#[test]
fn a_refusal_before_the_body_is_read_closes_the_connection() {
    let d = TestDaemon::start();
    let addr = d.base.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // No key: refused before a byte of the (large, unfinished) upload is read.
    let mut upload = b"POST /v1/artifacts HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/x-tar\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    upload.extend(std::iter::repeat_n(b'x', 4096));
    let head = exchange(&mut conn, &upload);
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    let mut rest = [0u8; 1];
    assert_eq!(
        conn.read(&mut rest).unwrap_or(0),
        0,
        "the connection is closed"
    );

    // A JSON body read whole (and refused for what it says): the connection stays open.
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let body = r#"{"imageIdentifier": 7}"#;
    let run = format!(
        "POST /v1/microvms HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        d.key,
        body.len()
    );
    for _ in 0..2 {
        let head = exchange(&mut conn, run.as_bytes());
        assert!(head.starts_with("http/1.1 4"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
}
