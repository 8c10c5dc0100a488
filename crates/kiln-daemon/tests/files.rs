//! The files API against a real guest: a 200 MB file written and read back by hash as a
//! guest user (who then owns it), the guest's own permissions deciding (a 0600 root file is
//! closed to that user, with the guest's words), list with a limit, stat, mkdir -p, move,
//! remove (an unempty directory only recursively), a directory round-tripping as a tar, a
//! tar entry that would escape refused, a watch seeing create, modify and delete, the watch
//! quota, bad input answered with what to fix, and a suspend ending watches and refusing
//! file calls.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc;
use std::time::Duration;

use common::steps::{sh, terminate};
use common::TestDaemon;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const BIG: u64 = 200 << 20;

/// `BIG` deterministic bytes (xorshift), hashed as they are read.
struct Pattern {
    left: u64,
    state: u64,
    hash: Sha256,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left as usize) & !7;
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes());
        }
        self.hash.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

fn url(d: &TestDaemon, id: &str, rest: &str) -> String {
    format!("{}/v1/microvms/{id}/files{rest}", d.base)
}

fn auth(d: &TestDaemon, req: ureq::Request) -> ureq::Request {
    req.set("Authorization", &format!("Bearer {}", d.key))
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(resp) => {
            let status = resp.status();
            let text = resp.into_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
        Err(ureq::Error::Status(status, resp)) => (status, resp.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("request failed: {e}"),
    }
}

fn read_bytes(d: &TestDaemon, id: &str, query: &str) -> Vec<u8> {
    let resp = auth(d, ureq::get(&url(d, id, &format!("/content?{query}"))))
        .call()
        .unwrap();
    let mut out = Vec::new();
    resp.into_reader().read_to_end(&mut out).unwrap();
    out
}

fn put(d: &TestDaemon, id: &str, rest: &str, body: &[u8]) -> (u16, Value) {
    answer(auth(d, ureq::put(&url(d, id, rest))).send_bytes(body))
}

fn image_with_a_user(d: &TestDaemon) -> String {
    let tar = common::tar_of(&[(
        "Dockerfile",
        "FROM busybox\n\
         RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd \
         && echo 'app:x:1000:' >> /etc/group && mkdir -p /data/w && chown -R 1000:1000 /data \
         && echo secret > /root/secret && chmod 600 /root/secret\n\
         CMD [\"sleep\", \"86400\"]\n",
    )]);
    let (status, art) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
    assert_eq!(status, 200, "{art}");
    let (status, img) = d.post(
        "/v1/images",
        json!({"name": "files", "codeArtifact": {"artifactId": art["artifactId"]},
               "diskSizeMib": 1024, "waitForReady": false}),
    );
    assert_eq!(status, 202, "{img}");
    d.wait_image(img["imageIdentifier"].as_str().unwrap());
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "files"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(120));
    id
}

#[test]
fn files_api_as_guest_users() {
    let d = TestDaemon::start();
    let id = image_with_a_user(&d);

    // 200 MB up as `app` and back down, compared by hash; `app` owns it.
    let mut up = Pattern {
        left: BIG,
        state: 0x9e37_79b9_7f4a_7c15,
        hash: Sha256::new(),
    };
    let (status, written) = answer(
        auth(
            &d,
            ureq::put(&url(
                &d,
                &id,
                "/content?path=/data/big.bin&user=app&mode=0640",
            )),
        )
        .set("Content-Length", &BIG.to_string())
        .send(&mut up),
    );
    assert_eq!(status, 200, "{written}\n{}", d.log());
    assert_eq!(written["size"], BIG, "{written}");
    assert_eq!(
        (written["uid"].as_u64(), written["mode"].as_str()),
        (Some(1000), Some("0640"))
    );
    let sent = hex::encode(up.hash.finalize());
    let resp = auth(
        &d,
        ureq::get(&url(&d, &id, "/content?path=/data/big.bin&user=app")),
    )
    .call()
    .unwrap();
    assert_eq!(
        resp.header("content-length"),
        Some(BIG.to_string().as_str())
    );
    let mut hash = Sha256::new();
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
        hash.update(&buf[..n]);
    }
    assert_eq!(got, BIG);
    assert_eq!(
        hex::encode(hash.finalize()),
        sent,
        "the file came back different"
    );

    // The guest's permissions decide, and its words come back.
    let (status, e) = answer(
        auth(
            &d,
            ureq::get(&url(&d, &id, "/content?path=/root/secret&user=app")),
        )
        .call(),
    );
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("AccessDenied")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("Permission denied"),
        "{e}"
    );
    assert_eq!(read_bytes(&d, &id, "path=/root/secret"), b"secret\n");
    let (status, e) = put(&d, &id, "/content?path=/etc/passwd&user=app", b"x");
    assert_eq!(status, 403, "{e}");
    assert!(
        sh(&d, &id, "cat /etc/passwd").contains("app:x:1000"),
        "passwd was changed"
    );

    // mkdir -p, list with a limit, stat, move, remove.
    let (status, dir) = d.post(
        &format!("/v1/microvms/{id}/files/mkdir"),
        json!({"path": "/data/a/b", "user": "app"}),
    );
    assert_eq!(status, 200, "{dir}");
    assert_eq!(
        (dir["kind"].as_str(), dir["uid"].as_u64()),
        (Some("directory"), Some(1000))
    );
    let (status, list) = d.get(&format!("/v1/microvms/{id}/files?path=/data"));
    assert_eq!(status, 200, "{list}");
    let names: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "big.bin", "w"], "{list}");
    assert_eq!(list["truncated"], false);
    let (_, one) = d.get(&format!("/v1/microvms/{id}/files?path=/data&limit=1"));
    assert_eq!(
        (one["entries"].as_array().unwrap().len(), &one["truncated"]),
        (1, &json!(true))
    );
    let (status, moved) = d.post(
        &format!("/v1/microvms/{id}/files/move"),
        json!({"from": "/data/big.bin", "to": "/data/a/big.bin", "user": "app"}),
    );
    assert_eq!(
        (status, moved["path"].as_str()),
        (200, Some("/data/a/big.bin")),
        "{moved}"
    );
    let (status, gone) = d.get(&format!("/v1/microvms/{id}/files/stat?path=/data/big.bin"));
    assert_eq!(
        (status, gone["code"].as_str()),
        (404, Some("ResourceNotFoundException"))
    );
    let (status, e) = d.delete(&format!("/v1/microvms/{id}/files?path=/data/a&user=app"));
    assert_eq!(
        status, 409,
        "an unempty directory went without recursive: {e}"
    );
    let (status, _) = d.delete(&format!(
        "/v1/microvms/{id}/files?path=/data/a&recursive=true"
    ));
    assert_eq!(status, 204);
    let (status, _) = d.get(&format!("/v1/microvms/{id}/files/stat?path=/data/a"));
    assert_eq!(status, 404);

    archives_round_trip(&d, &id);
    watch_and_bad_input(&d, &id);
    terminate(&d, &id);
}

/// A directory up as a tar and back down: same names and contents, owned by the user.
fn archives_round_trip(d: &TestDaemon, id: &str) {
    let tar = common::tar_of_bytes(&[
        ("x.txt", b"one"),
        ("sub/y.txt", b"two"),
        ("sub/deeper/z.txt", b"three"),
    ]);
    let (status, dir) = put(d, id, "/archive?path=/data/tree&user=app", &tar);
    assert_eq!(status, 200, "{dir}\n{}", d.log());
    assert_eq!(dir["uid"], 1000, "{dir}");
    assert_eq!(sh(d, id, "stat -c %u /data/tree/sub/y.txt").trim(), "1000");
    let resp = auth(d, ureq::get(&url(d, id, "/archive?path=/data/tree")))
        .call()
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("application/x-tar"));
    let mut files = std::collections::BTreeMap::new();
    let mut archive = tar::Archive::new(resp.into_reader());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let path = entry.path().unwrap().display().to_string();
            assert_eq!(entry.header().uid().unwrap(), 1000, "{path}");
            let mut data = String::new();
            entry.read_to_string(&mut data).unwrap();
            files.insert(path.trim_start_matches("./").to_string(), data);
        }
    }
    let expected: std::collections::BTreeMap<String, String> = [
        ("sub/deeper/z.txt", "three"),
        ("sub/y.txt", "two"),
        ("x.txt", "one"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(files, expected);

    // An archive of `/` stays on the root disk (as `tar --one-file-system`): /proc is an
    // empty directory, not the guest's kernel memory.
    let resp = auth(d, ureq::get(&url(d, id, "/archive?path=/")))
        .call()
        .unwrap();
    let mut names = Vec::new();
    for entry in tar::Archive::new(resp.into_reader()).entries().unwrap() {
        names.push(entry.unwrap().path().unwrap().display().to_string());
    }
    assert!(
        names.iter().any(|n| n == "proc") && names.iter().any(|n| n == "bin/busybox"),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("proc/") || n.starts_with("sys/")),
        "{names:?}"
    );

    let (status, e) = put(d, id, "/archive?path=/data/empty", b"");
    assert_eq!(status, 400, "an empty body is no archive: {e}");
    assert!(e["message"].as_str().unwrap().contains("no body"), "{e}");

    // An entry that would climb out is refused, and nothing lands outside.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../escape.txt");
    h.set_cksum();
    b.append(&h, &b"evil"[..]).unwrap();
    let (status, e) = put(d, id, "/archive?path=/data/tree", &b.into_inner().unwrap());
    assert_eq!(status, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("escape"), "{e}");
    let listing = sh(d, id, "ls /data/escape.txt 2>&1 || true");
    assert!(listing.contains("No such"), "{listing}");
}

/// Lines of `event:`/`data:` from a watch, read on a thread.
fn open_watch(d: &TestDaemon, id: &str, path: &str) -> mpsc::Receiver<(String, String)> {
    let resp = auth(d, ureq::get(&url(d, id, &format!("/watch?path={path}"))))
        .call()
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        for line in BufReader::new(resp.into_reader()).lines() {
            let Ok(line) = line else { break };
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                if tx.send((event.clone(), data.to_string())).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn next_file_event(rx: &mpsc::Receiver<(String, String)>) -> Value {
    let (event, data) = rx.recv_timeout(Duration::from_secs(30)).expect("no event");
    assert_eq!(event, "file", "{data}");
    serde_json::from_str(&data).unwrap()
}

fn watch_and_bad_input(d: &TestDaemon, id: &str) {
    let rx = open_watch(d, id, "/data/w");
    sh(
        d,
        id,
        "echo a > /data/w/f && echo b >> /data/w/f && rm /data/w/f && mkdir /data/w/d",
    );
    let mut seen = Vec::new();
    while seen
        .last()
        .map(|(k, p): &(String, String)| (k.as_str(), p.as_str()))
        != Some(("create", "/data/w/d"))
    {
        let e = next_file_event(&rx);
        seen.push((
            e["kind"].as_str().unwrap().to_string(),
            e["path"].as_str().unwrap().to_string(),
        ));
    }
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    let create = kinds.iter().position(|k| *k == "create").unwrap();
    let modify = kinds.iter().position(|k| *k == "modify").unwrap();
    let delete = kinds.iter().position(|k| *k == "delete").unwrap();
    assert!(create < modify && modify < delete, "{seen:?}");
    assert!(
        seen[..seen.len() - 1].iter().all(|(_, p)| p == "/data/w/f"),
        "{seen:?}"
    );

    // Bad input gets a 4xx that says what to fix.
    for (rest, status, says) in [
        ("/content?path=data/x", 400, "absolute"),
        ("/content?path=/data/x&mode=999", 400, "octal"),
        ("/content?path=/data/x&user=a%20b", 400, "user"),
        ("/content?path=/data", 400, "directory"),
    ] {
        let (got, e) = put(d, id, rest, b"x");
        assert_eq!(got, status, "{rest}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{rest}: {e}");
    }
    let chunked = auth(d, ureq::put(&url(d, id, "/content?path=/data/x"))).send(&b"abc"[..]);
    let (status, e) = answer(chunked);
    assert_eq!(
        (status, e["code"].as_str()),
        (411, Some("LengthRequired")),
        "{e}"
    );
    let (status, e) = d.get(&format!("/v1/microvms/{id}/files?path=/data&limit=0"));
    assert_eq!(status, 400, "{e}");
    let (status, e) = d.get("/v1/microvms/mvm-nope/files?path=/");
    assert_eq!(status, 404, "{e}");

    // Eight watches at once (one is open above), then 429.
    let more: Vec<_> = (0..7).map(|_| open_watch(d, id, "/data")).collect();
    let (status, e) = answer(auth(d, ureq::get(&url(d, id, "/watch?path=/data"))).call());
    assert_eq!(status, 429, "{e}");

    // A suspend ends the watches (with why) and file calls wait for RUNNING.
    let (status, s) = d.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    assert_eq!(status, 200, "{s}");
    let (event, why) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the watch did not end");
    assert_eq!(event, "error", "{why}");
    drop(more);
    let (status, e) = d.get(&format!("/v1/microvms/{id}/files/stat?path=/data"));
    assert_eq!(status, 409, "{e}");
    assert!(e["message"].as_str().unwrap().contains("RUNNING"), "{e}");
}
