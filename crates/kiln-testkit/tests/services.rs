//! The agent's other services on a real guest: files, a supervised app, HTTP calls to a
//! guest port, raw byte streams forwarded to a guest port, and the optional network device.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kiln_proto::{ErrorKind, HttpRequest, ProcessSpec};
use kiln_testkit::{machine, TestVm};
use kiln_vmm::agent::AgentError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn get(port: u16, path: &str) -> HttpRequest {
    kiln_image::build::hook_get(port, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_app_http_and_forwarded_streams_work_on_a_real_guest() {
    let mut spec = machine();
    spec.network = true;
    let vm = TestVm::boot_with(spec).await;
    let agent = vm.agent().clone();

    // The optional network device appears only when asked for.
    assert!(vm.ok("ls /sys/class/net").await.contains("eth0"));

    // Files: put creates parents atomically with the mode asked; get returns the bytes.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    agent
        .put_file("/www/data/blob.bin", &payload, 0o640)
        .await
        .unwrap();
    assert_eq!(
        agent.get_file("/www/data/blob.bin", 1 << 20).await.unwrap(),
        payload
    );
    assert_eq!(vm.ok("stat -c %a /www/data/blob.bin").await.trim(), "640");
    match agent.get_file("/www/data/blob.bin", 1000).await {
        Err(AgentError::Guest(e)) => assert_eq!(e.kind, ErrorKind::TooLarge),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match agent.get_file("/nope", 10).await {
        Err(AgentError::Guest(e)) => assert_eq!(e.kind, ErrorKind::NotFound),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(matches!(
        agent.put_file("relative/path", b"x", 0o644).await,
        Err(AgentError::Guest(_))
    ));

    // A supervised app: busybox httpd serving /www on port 8080.
    agent
        .put_file("/www/index.html", b"hello from the guest\n", 0o644)
        .await
        .unwrap();
    let app = ProcessSpec {
        argv: vec![
            "httpd".into(),
            "-f".into(),
            "-vv".into(),
            "-p".into(),
            "127.0.0.1:8080".into(),
            "-h".into(),
            "/www".into(),
        ],
        ..Default::default()
    };
    let state = agent.start_app(app.clone()).await.unwrap();
    assert!(state.running && state.pid.is_some());
    assert!(
        matches!(agent.start_app(app).await, Err(AgentError::Guest(_))),
        "only one app at a time"
    );

    // HTTP call through the agent (what lifecycle hooks use), retried while httpd starts.
    let mut response = None;
    for _ in 0..50 {
        match agent.http(get(8080, "/index.html")).await {
            Ok(r) => {
                response = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let response = response.expect("httpd answers");
    assert_eq!(response.status, 200);
    assert_eq!(response.body.as_slice(), b"hello from the guest\n");
    assert_eq!(agent.http(get(8080, "/missing")).await.unwrap().status, 404);
    let mut small = get(8080, "/data/blob.bin");
    small.max_response_bytes = 1000;
    assert!(
        matches!(agent.http(small).await, Err(AgentError::Guest(e)) if e.kind == ErrorKind::TooLarge)
    );
    assert!(
        matches!(agent.http(get(9, "/")).await, Err(AgentError::Guest(_))),
        "closed port is an error"
    );

    // A raw byte stream forwarded to the guest port.
    let mut stream = agent.connect_port(8080).await.unwrap();
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(
        raw.starts_with("HTTP/1.") && raw.contains("hello from the guest"),
        "{raw}"
    );

    // The app's output is kept; its exit is recorded.
    let logs = String::from_utf8_lossy(&agent.app_logs(64 * 1024).await.unwrap()).into_owned();
    assert!(
        logs.contains("index.html"),
        "httpd's request log is kept: {logs}"
    );
    vm.ok("killall httpd").await;
    let mut status = agent.app_status().await.unwrap();
    for _ in 0..50 {
        if !status.running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = agent.app_status().await.unwrap();
    }
    assert!(!status.running);
    assert_eq!(status.exit.and_then(|e| e.signal), Some(15));

    vm.destroy().await;
}
