//! The processes API against a real guest: output streamed while the process still runs,
//! stdin written and closed, signals, a terminal resized (the guest's `stty size` sees it),
//! listing with filters, a background process that runs on across suspend and resume with
//! its output resumed at the offset where the stream broke, and bad input answered with
//! what to fix.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::steps::{sh, terminate};
use common::TestDaemon;
use serde_json::{json, Value};

struct Sse {
    event: String,
    id: Option<u64>,
    data: String,
}

fn base(id: &str) -> String {
    format!("/v1/microvms/{id}/processes")
}

fn start(d: &TestDaemon, id: &str, body: Value) -> u64 {
    let (status, p) = d.post(&base(id), body);
    assert_eq!(status, 201, "{p}\n{}", d.log());
    assert_eq!(p["running"], true, "{p}");
    p["pid"].as_u64().unwrap()
}

fn post_stdin(d: &TestDaemon, id: &str, pid: u64, query: &str, data: &[u8]) -> u16 {
    let url = format!("{}{}/{pid}/stdin{query}", d.base, base(id));
    match ureq::post(&url)
        .set("Authorization", &format!("Bearer {}", d.key))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(data)
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{e}"),
    }
}

/// The process's output events, read on a thread.
fn output(d: &TestDaemon, id: &str, pid: u64, from: u64) -> mpsc::Receiver<Sse> {
    let url = format!("{}{}/{pid}/output?from={from}", d.base, base(id));
    let resp = ureq::get(&url)
        .set("Authorization", &format!("Bearer {}", d.key))
        .call()
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut event, mut id) = (String::new(), None);
        for line in BufReader::new(resp.into_reader()).lines() {
            let Ok(line) = line else { break };
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(i) = line.strip_prefix("id: ") {
                id = i.parse().ok();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let sse = Sse {
                    event: std::mem::take(&mut event),
                    id: id.take(),
                    data: data.to_string(),
                };
                if tx.send(sse).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn next(rx: &mpsc::Receiver<Sse>) -> Sse {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no event within 60 s")
}

/// An output event's bytes as text, with its stream and offset.
fn text(sse: &Sse) -> (String, String, u64) {
    assert_eq!(sse.event, "output", "{}", sse.data);
    let v: Value = serde_json::from_str(&sse.data).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["data"].as_str().unwrap())
        .unwrap();
    (
        v["stream"].as_str().unwrap().to_string(),
        String::from_utf8_lossy(&bytes).into_owned(),
        v["offset"].as_u64().unwrap(),
    )
}

/// Reads output until `needle` appeared; returns all of it and the last event id.
fn until(rx: &mpsc::Receiver<Sse>, needle: &str) -> (String, u64) {
    let mut all = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no {needle:?} in {all:?}");
        let sse = next(rx);
        let (_, t, _) = text(&sse);
        all.push_str(&t);
        if all.contains(needle) {
            return (all, sse.id.unwrap());
        }
    }
}

fn wait_exit(d: &TestDaemon, id: &str, pid: u64) -> Value {
    let (status, p) = d.get(&format!("{}/{pid}?waitSeconds=60", base(id)));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["running"], false, "{p}");
    p
}

fn busybox_microvm(d: &TestDaemon) -> String {
    let tar = common::tar_of(&[("Dockerfile", "FROM busybox\nCMD [\"sleep\", \"86400\"]\n")]);
    let (status, art) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
    assert_eq!(status, 200, "{art}");
    let (status, img) = d.post(
        "/v1/images",
        json!({"name": "procs", "codeArtifact": {"artifactId": art["artifactId"]},
               "waitForReady": false}),
    );
    assert_eq!(status, 202, "{img}");
    d.wait_image(img["imageIdentifier"].as_str().unwrap());
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "procs"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(120));
    id
}

#[test]
fn processes_stream_take_input_signals_and_resizes_and_survive_suspend() {
    let d = TestDaemon::start();
    let id = busybox_microvm(&d);
    output_arrives_while_it_runs(&d, &id);
    stdin_and_signals(&d, &id);
    terminal_resize(&d, &id);
    listing_and_bad_input(&d, &id);
    detached_streams_are_freed(&d, &id);
    background_across_suspend(&d, &id);
    terminate(&d, &id);
}

fn output_arrives_while_it_runs(d: &TestDaemon, id: &str) {
    let pid = start(
        d,
        id,
        json!({"shell": "echo first; sleep 4; echo second >&2; exit 3", "tag": "t1"}),
    );
    let rx = output(d, id, pid, 0);
    let (stream, t, offset) = text(&next(&rx));
    assert_eq!(
        (stream.as_str(), t.as_str(), offset),
        ("stdout", "first\n", 0)
    );
    // The first line came while the process still runs.
    let (_, p) = d.get(&format!("{}/{pid}", base(id)));
    assert_eq!(p["running"], true, "{p}");
    let (stream, t, offset) = text(&next(&rx));
    assert_eq!(
        (stream.as_str(), t.as_str(), offset),
        ("stderr", "second\n", 6)
    );
    let exit = next(&rx);
    assert_eq!(exit.event, "exit", "{}", exit.data);
    let p: Value = serde_json::from_str(&exit.data).unwrap();
    assert_eq!(
        (p["exitCode"].as_i64(), p["outputEnd"].as_u64()),
        (Some(3), Some(13))
    );
    // Attaching again later replays what the guest kept, from any offset.
    let rx = output(d, id, pid, 6);
    assert_eq!(text(&next(&rx)).1, "second\n");
    assert_eq!(next(&rx).event, "exit");
}

fn stdin_and_signals(d: &TestDaemon, id: &str) {
    let pid = start(
        d,
        id,
        json!({"command": ["sh", "-c", "read a; echo got:$a; cat; echo done:$(id -u)"],
               "stdin": true, "user": "1000:1000", "cwd": "/tmp", "env": {"K": "v"}}),
    );
    assert_eq!(post_stdin(d, id, pid, "", b"hello\n"), 204);
    assert_eq!(post_stdin(d, id, pid, "?eof=true", b"rest\n"), 204);
    let p = wait_exit(d, id, pid);
    assert_eq!(p["exitCode"], 0, "{p}");
    let (all, _) = until(&output(d, id, pid, 0), "done:");
    assert!(all.starts_with("got:hello\nrest\ndone:1000"), "{all:?}");
    // A process that exited takes no more input.
    assert_eq!(post_stdin(d, id, pid, "", b"late"), 409);
    // Closing it is not an error: a process may exit as it reads the bytes written just
    // before the close (a race the clients' write-then-close would otherwise lose).
    assert_eq!(post_stdin(d, id, pid, "?eof=true", b""), 204);

    let pid = start(d, id, json!({"command": ["sleep", "300"]}));
    assert_eq!(
        post_stdin(d, id, pid, "", b"x"),
        409,
        "stdin was not asked for"
    );
    let url = format!("{}/{pid}/signal", base(id));
    let (status, e) = d.post(&url, json!({"signal": "BOGUS"}));
    assert_eq!(status, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("TERM"), "{e}");
    let (status, e) = d.post(&url, json!({"signal": "SIGTERM"}));
    assert_eq!(status, 204, "{e}");
    let p = wait_exit(d, id, pid);
    assert_eq!(
        (p["signal"].as_i64(), p["exitCode"].as_i64()),
        (Some(15), None),
        "{p}"
    );
    let (status, _) = d.post(&url, json!({"signal": "KILL"}));
    assert_eq!(status, 409, "a signal for an exited process");
}

fn terminal_resize(d: &TestDaemon, id: &str) {
    let pid = start(
        d,
        id,
        json!({"shell": "stty size; read x; stty size; read y; tty",
               "pty": {"cols": 80, "rows": 24}}),
    );
    let rx = output(d, id, pid, 0);
    until(&rx, "24 80");
    let resize = format!("{}/{pid}/resize", base(id));
    let (status, e) = d.post(&resize, json!({"cols": 132, "rows": 40}));
    assert_eq!(status, 204, "{e}");
    assert_eq!(post_stdin(d, id, pid, "", b"\n"), 204);
    until(&rx, "40 132");
    assert_eq!(post_stdin(d, id, pid, "", b"\n"), 204);
    let (all, _) = until(&rx, "/dev/pts/");
    assert!(!all.contains("not a tty"), "{all:?}");
    let p = wait_exit(d, id, pid);
    assert_eq!(
        (p["exitCode"].as_i64(), &p["pty"]),
        (Some(0), &json!({"cols": 132, "rows": 40}))
    );
    let (status, e) = d.post(&resize, json!({"cols": 0, "rows": 40}));
    assert_eq!(status, 400, "{e}");
}

fn listing_and_bad_input(d: &TestDaemon, id: &str) {
    let (status, list) = d.get(&format!("{}?tag=t1", base(id)));
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["processes"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["processes"][0]["exitCode"], 3);
    let (_, all) = d.get(&format!("{}?limit=2", base(id)));
    assert_eq!(all["processes"].as_array().unwrap().len(), 2, "{all}");
    let cursor = all["nextCursor"].as_str().unwrap();
    let (_, rest) = d.get(&format!(
        "{}?limit=10&running=false&cursor={cursor}",
        base(id)
    ));
    assert_eq!(rest["processes"].as_array().unwrap().len(), 2, "{rest}");
    assert!(rest["processes"][0]["pid"].as_u64() > all["processes"][1]["pid"].as_u64());

    for (body, want) in [
        (json!({}), "command"),
        (json!({"command": ["a"], "shell": "b"}), "not both"),
        (json!({"shell": "x", "cwd": "tmp"}), "absolute"),
        (
            json!({"shell": "x", "pty": {"cols": 5000, "rows": 2}}),
            "1 to 1000",
        ),
    ] {
        let (status, e) = d.post(&base(id), body.clone());
        assert_eq!(status, 400, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(want), "{body}: {e}");
    }
    let (status, e) = d.post(&base(id), json!({"command": ["no-such-program"]}));
    assert_eq!(status, 404, "{e}");
    assert!(e["message"].as_str().unwrap().contains("not found"), "{e}");
    let (status, _) = d.get(&format!("{}/999999", base(id)));
    assert_eq!(status, 404);
    let (status, _) = d.get(&format!("{}/1?waitSeconds=301", base(id)));
    assert_eq!(status, 400);

    // Output streams per microVM are bounded; they free their slots when they end.
    let pid = start(d, id, json!({"command": ["sleep", "300"]}));
    let open: Vec<_> = (0..32).map(|_| output(d, id, pid, 0)).collect();
    let url = format!("{}{}/{pid}/output", d.base, base(id));
    let refused = ureq::get(&url)
        .set("Authorization", &format!("Bearer {}", d.key))
        .call();
    assert!(
        matches!(refused, Err(ureq::Error::Status(429, _))),
        "a 33rd stream: {refused:?}"
    );
    let (status, _) = d.post(
        &format!("{}/{pid}/signal", base(id)),
        json!({"signal": "KILL"}),
    );
    assert_eq!(status, 204);
    for rx in &open {
        assert_eq!(next(rx).event, "exit");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while output_status(d, id, pid) == 429 {
        assert!(
            Instant::now() < deadline,
            "the ended streams kept their slots"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Streams opened and dropped over and over on a process that prints nothing: each one's
/// agent stream ends with it (a leak would exhaust the session's 256 streams).
fn detached_streams_are_freed(d: &TestDaemon, id: &str) {
    let pid = start(d, id, json!({"command": ["sleep", "300"]}));
    for _ in 0..300 {
        while output_status(d, id, pid) == 429 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(sh(d, id, "echo still"), "still\n");
    // As many waits at once as the agent session has streams, and more: the excess gets a
    // 429, the session stays up, and a suspend still gets through afterwards.
    let url = format!("{}{}/{pid}?waitSeconds=4", d.base, base(id));
    let key = format!("Bearer {}", d.key);
    let waits: Vec<_> = (0..300)
        .map(|_| {
            let (url, key) = (url.clone(), key.clone());
            std::thread::spawn(
                move || match ureq::get(&url).set("Authorization", &key).call() {
                    Ok(r) => r.status(),
                    Err(ureq::Error::Status(s, _)) => s,
                    Err(e) => panic!("{e}"),
                },
            )
        })
        .collect();
    let statuses: Vec<u16> = waits.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&429) && statuses.contains(&200),
        "{statuses:?}"
    );
    let (status, p) = d.get(&format!("{}/{pid}", base(id)));
    assert_eq!((status, p["running"].as_bool()), (200, Some(true)), "{p}");
    let (status, _) = d.post(
        &format!("{}/{pid}/signal", base(id)),
        json!({"signal": "KILL"}),
    );
    assert_eq!(status, 204);
}

fn output_status(d: &TestDaemon, id: &str, pid: u64) -> u16 {
    let url = format!("{}{}/{pid}/output", d.base, base(id));
    match ureq::get(&url)
        .set("Authorization", &format!("Bearer {}", d.key))
        .call()
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{e}"),
    }
}

fn background_across_suspend(d: &TestDaemon, id: &str) {
    let pid = start(
        d,
        id,
        json!({"shell": "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.3; done",
               "tag": "bg"}),
    );
    let rx = output(d, id, pid, 0);
    let (_, mut last) = until(&rx, "tick 2\n");
    let (status, s) = d.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    assert_eq!(status, 200, "{s}");
    d.wait_state(id, "SUSPENDED", Duration::from_secs(120));
    // The stream ends with why; the last id it gave is where to resume.
    loop {
        let sse = next(&rx);
        if sse.event == "error" {
            assert!(sse.data.contains("resume"), "{}", sse.data);
            break;
        }
        last = sse.id.unwrap();
    }
    let (status, e) = d.get(&format!("{}/{pid}", base(id)));
    assert_eq!(status, 409, "{e}");
    let (status, r) = d.post(&format!("/v1/microvms/{id}/resume"), json!({}));
    assert_eq!(status, 200, "{r}");
    d.wait_state(id, "RUNNING", Duration::from_secs(120));
    let (_, p) = d.get(&format!("{}/{pid}", base(id)));
    assert_eq!(
        (p["running"].as_bool(), p["pid"].as_u64()),
        (Some(true), Some(pid)),
        "{p}"
    );
    // From the last offset on: nothing lost, nothing repeated, and the count goes on.
    let rx = output(d, id, pid, last);
    let first = next(&rx);
    assert_eq!(text(&first).2, last, "output resumed elsewhere than asked");
    let (more, _) = until(&rx, "tick 8\n");
    let after: Vec<u64> = more
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{more:?}");
    let (status, _) = d.post(
        &format!("{}/{pid}/signal", base(id)),
        json!({"signal": 9.to_string()}),
    );
    assert_eq!(status, 204);
    assert_eq!(wait_exit(d, id, pid)["signal"], 9);
}
