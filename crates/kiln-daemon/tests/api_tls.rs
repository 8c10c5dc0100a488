//! The API leaves loopback only when the operator says so, and then only over TLS unless
//! they also accept plain HTTP in so many words; over TLS, clients that trust the
//! certificate's CA talk to it, and plain HTTP gets nowhere.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn kilnd(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kilnd"));
    c.arg("--home")
        .arg(home)
        .args([
            "--ingress-listen",
            "127.0.0.1:0",
            "--on-shutdown",
            "terminate",
        ])
        .args(args);
    c
}

/// Starts kilnd and waits for its address file; its log goes to `home/kilnd.log`.
fn start(home: &Path, args: &[&str]) -> (Child, String) {
    std::fs::create_dir_all(home).unwrap();
    let log = std::fs::File::create(home.join("kilnd.log")).unwrap();
    let child = kilnd(home, args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = home.join("kilnd.addr");
    while !addr.exists() {
        assert!(
            Instant::now() < deadline,
            "kilnd did not start: {}",
            std::fs::read_to_string(home.join("kilnd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, std::fs::read_to_string(addr).unwrap())
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// A client that trusts only `ca_pem` and resolves every name to `addr`.
fn tls_agent(ca_pem: &str, addr: std::net::SocketAddr) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(common::trusting(ca_pem))
        .resolver(move |_: &str| Ok(vec![addr]))
        .timeout(Duration::from_secs(20))
        .build()
}

#[test]
fn the_api_leaves_loopback_only_over_tls_or_when_told_plain_http_is_fine() {
    let scratch = tempfile::tempdir().unwrap();

    // Off loopback without TLS: refused, saying what to do.
    let out = kilnd(
        &scratch.path().join("refused"),
        &["--listen", "0.0.0.0:0", "--allow-remote"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--api-tls-cert") && err.contains("--insecure-http"),
        "{err}"
    );

    // Over TLS (a certificate from kilnd's own CA machinery, for *.kiln.localhost).
    let home = scratch.path().join("tls");
    let (cert, key) = kiln_daemon::tls::ensure(&home, "kiln.localhost", &[]).unwrap();
    let ca = std::fs::read_to_string(home.join("tls").join("ca.pem")).unwrap();
    let (child, addr) = start(
        &home,
        &[
            "--listen",
            "127.0.0.1:0",
            "--api-tls-cert",
            cert.to_str().unwrap(),
            "--api-tls-key",
            key.to_str().unwrap(),
        ],
    );
    let socket: std::net::SocketAddr = addr
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("the address file names the scheme: {addr}"))
        .parse()
        .unwrap();
    let api_key = std::fs::read_to_string(home.join("api-key")).unwrap();
    let agent = tls_agent(&ca, socket);
    let url = |path: &str| format!("https://api.kiln.localhost:{}{path}", socket.port());
    let health: serde_json::Value = agent
        .get(&url("/health"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    let images: serde_json::Value = agent
        .get(&url("/v1/images"))
        .set("Authorization", &format!("Bearer {}", api_key.trim()))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert!(images["images"].is_array(), "{images}");
    assert!(matches!(
        agent.get(&url("/v1/images")).call(),
        Err(ureq::Error::Status(401, _))
    ));
    // Plain HTTP to the TLS port gets no API answer.
    let plain = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
        .get(&format!("http://{socket}/health"))
        .call();
    assert!(
        !matches!(&plain, Ok(r) if r.status() == 200),
        "plain HTTP must not reach the API"
    );
    // A client that does not trust the CA is refused by its own TLS.
    let untrusting = ureq::AgentBuilder::new()
        .resolver(move |_: &str| Ok(vec![socket]))
        .build()
        .get(&url("/health"))
        .call();
    assert!(untrusting.is_err());
    stop(child);

    // Plain HTTP off loopback when the operator says so, loudly.
    let home = scratch.path().join("insecure");
    let (child, addr) = start(
        &home,
        &["--listen", "0.0.0.0:0", "--allow-remote", "--insecure-http"],
    );
    assert!(!addr.contains("://"), "{addr}");
    let log = std::fs::read_to_string(home.join("kilnd.log")).unwrap();
    assert!(
        log.contains("--insecure-http: the API is served over plain HTTP"),
        "{log}"
    );
    stop(child);
}
