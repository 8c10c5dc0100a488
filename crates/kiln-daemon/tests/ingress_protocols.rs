//! Protocols through the ingress against a real guest app (kiln-testapp, built static by
//! scripts/setup.sh): WebSocket echo with browser-style subprotocol credentials, HTTP/2
//! (h2c), gRPC-style unary and server-streaming calls with trailers, and a 502 when the guest
//! app drops the connection.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use sha1::Digest;

fn testapp() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/x86_64-unknown-linux-gnu/release/kiln-testapp"
    );
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e} (scripts/setup.sh builds it)"))
}

fn setup() -> (TestDaemon, String, String) {
    setup_with(&[])
}

fn setup_with(extra: &[&str]) -> (TestDaemon, String, String) {
    let d = TestDaemon::start_with(extra);
    let app = testapp();
    let dockerfile = b"FROM busybox\nCOPY kiln-testapp /srv/\nCMD [\"/srv/kiln-testapp\"]\n";
    d.build_image_tar(
        "protos",
        tar_of_bytes(&[
            ("Dockerfile", dockerfile.as_slice()),
            ("kiln-testapp", app.as_slice()),
        ]),
        json!({}),
    );
    let (_, run) = d.post("/v1/microvms", json!({"imageIdentifier": "protos"}));
    let id = run["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    let (_, t) = d.post(
        "/v1/auth-tokens",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5}),
    );
    let token = t["authToken"]["X-Kiln-Auth"].as_str().unwrap().to_string();
    (d, id, token)
}

fn ws_frame(text: &str) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn websocket_h2_grpc_and_resets_pass_through_the_ingress() {
    let (d, id, token) = setup();

    // WebSocket with token and port in the subprotocol list, as a browser would send them.
    let mut s = TcpStream::connect(&d.ingress).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode(b"kiln-ws-test-key");
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {id}.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: kiln-auth.{token}, kiln-port.8080\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.contains("101"), "{status}");
    let mut accept = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line
            .to_ascii_lowercase()
            .strip_prefix("sec-websocket-accept:")
        {
            accept = Some(v.trim().to_string());
        }
    }
    let expected = base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    assert_eq!(
        accept.as_deref(),
        Some(expected.to_ascii_lowercase().as_str())
    );
    for msg in ["hello", "through the agent channel"] {
        s.write_all(&ws_frame(msg)).unwrap();
        let mut head = [0u8; 2];
        reader.read_exact(&mut head).unwrap();
        let mut payload = vec![0u8; (head[1] & 0x7f) as usize];
        reader.read_exact(&mut payload).unwrap();
        assert_eq!(
            (head[0], String::from_utf8(payload).unwrap()),
            (0x81, msg.to_string())
        );
    }
    drop(s);

    // HTTP/2 (prior knowledge, h2c) end to end, and gRPC-style calls with trailers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&d.ingress).await.unwrap();
        let (mut h2, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let get = hyper::Request::get(format!("http://{id}.localhost/proto"))
            .header("x-kiln-auth", &token)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2.send_request(get).await.unwrap();
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"HTTP/2.0", "the guest app saw HTTP/2 too");

        let message = [0u8, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o'];
        for (path, copies) in [("/grpc.Echo/Say", 1), ("/grpc.Echo/Stream", 3)] {
            let call = hyper::Request::post(format!("http://{id}.localhost{path}"))
                .header("x-kiln-auth", &token)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::copy_from_slice(&message)))
                .unwrap();
            let resp = h2.send_request(call).await.unwrap();
            assert_eq!(resp.status(), 200);
            let collected = resp.into_body().collect().await.unwrap();
            let trailers = collected
                .trailers()
                .cloned()
                .expect("gRPC trailers pass through");
            assert_eq!(trailers.get("grpc-status").unwrap(), "0");
            assert_eq!(collected.to_bytes().len(), message.len() * copies, "{path}");
        }
    });

    // A guest app that drops the connection: 502 with a short reason.
    let mut s = TcpStream::connect(&d.ingress).unwrap();
    write!(s, "GET /reset HTTP/1.1\r\nHost: {id}.localhost\r\nX-Kiln-Auth: {token}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    assert!(reply.contains("GuestUnavailable"), "{reply}");
}

#[test]
fn the_ingress_speaks_tls_with_a_configured_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["*.sandbox.localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let (d, id, token) = setup_with(&[
        "--ingress-domain",
        "sandbox.localhost",
        "--ingress-tls-cert",
        cert_path.to_str().unwrap(),
        "--ingress-tls-key",
        key_path.to_str().unwrap(),
    ]);
    let host = format!("{id}.sandbox.localhost");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for (alpn, expected) in [
            (b"http/1.1".to_vec(), "HTTP/1.1"),
            (b"h2".to_vec(), "HTTP/2.0"),
        ] {
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = vec![alpn.clone()];
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let tcp = tokio::net::TcpStream::connect(&d.ingress).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
            let tls = connector
                .connect(name, tcp)
                .await
                .expect("TLS handshake with the configured certificate");
            let io = hyper_util::rt::TokioIo::new(tls);
            let uri = format!("https://{host}/proto");
            let body = if alpn == b"h2" {
                let (mut h2, conn) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let req = hyper::Request::get(&uri)
                    .header("x-aws-proxy-auth", &token)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                h2.send_request(req)
                    .await
                    .unwrap()
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
            } else {
                let (mut h1, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                let req = hyper::Request::get("/proto")
                    .header("host", &host)
                    .header("x-aws-proxy-auth", &token)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                h1.send_request(req)
                    .await
                    .unwrap()
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
            };
            assert_eq!(String::from_utf8_lossy(&body), expected);
        }
    });
}

fn ws_send(s: &mut TcpStream, opcode: u8, data: &[u8]) {
    let mask = [9u8, 8, 7, 6];
    let mut f = vec![0x80 | opcode, 0x80 | data.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f).unwrap();
}

fn ws_read(r: &mut impl Read) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).unwrap();
    let mut len = (head[1] & 0x7f) as usize;
    if len == 126 {
        let mut b = [0u8; 2];
        r.read_exact(&mut b).unwrap();
        len = u16::from_be_bytes(b) as usize;
    } else if len == 127 {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).unwrap();
        len = u64::from_be_bytes(b) as usize;
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).unwrap();
    (head[0] & 0x0f, payload)
}

/// Reads terminal output until `needle` shows up; returns everything read.
fn read_until(r: &mut impl Read, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let (op, payload) = ws_read(r);
        assert_eq!(
            op,
            2,
            "terminal output comes in binary frames, got {op}: {}",
            String::from_utf8_lossy(&payload)
        );
        seen.push_str(&String::from_utf8_lossy(&payload));
    }
    seen
}

#[test]
fn a_shell_token_opens_an_interactive_terminal() {
    let (d, id, ingress_token) = setup();
    let (_, t) = d.post(
        "/v1/auth-tokens",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5, "kind": "shell"}),
    );
    let shell_token = t["authToken"]["X-Kiln-Auth"].as_str().unwrap().to_string();
    let host = format!("{id}.localhost");

    // Tokens are kind-scoped both ways.
    let status_of = |token: &str, path: &str| {
        let mut s = TcpStream::connect(&d.ingress).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Kiln-Auth: {token}\r\nConnection: close\r\n\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply.split_whitespace().nth(1).unwrap_or("").to_string()
    };
    assert_eq!(status_of(&ingress_token, "/.kiln/shell"), "403");
    assert_eq!(status_of(&shell_token, "/proto"), "403");

    let mut s = TcpStream::connect(&d.ingress).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /.kiln/shell?cols=80&rows=24 HTTP/1.1\r\nHost: {host}\r\nX-Kiln-Auth: {shell_token}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.contains("101"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line
            .to_ascii_lowercase()
            .strip_prefix("sec-websocket-accept:")
        {
            assert_eq!(v.trim(), "s3pplmbitxaq9kygzzhzrbk+xoo=");
        }
    }
    ws_send(&mut s, 2, b"stty size; echo hello-$((6*7))\n");
    let out = read_until(&mut reader, "hello-42");
    assert!(
        out.contains("24 80"),
        "the terminal has the size asked for: {out:?}"
    );
    ws_send(&mut s, 1, br#"{"type":"resize","cols":100,"rows":30}"#);
    ws_send(&mut s, 2, b"stty size; tty\n");
    let out = read_until(&mut reader, "/dev/pts/");
    assert!(
        out.contains("30 100"),
        "resize reached the terminal: {out:?}"
    );
    ws_send(&mut s, 2, b"exit 3\n");
    loop {
        let (op, payload) = ws_read(&mut reader);
        if op == 1 {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(
                (v["type"].as_str(), v["code"].as_i64()),
                (Some("exit"), Some(3))
            );
            break;
        }
        assert_eq!(op, 2);
    }
    assert_eq!(ws_read(&mut reader).0, 8, "then the server closes");
}

/// One GET over plain HTTP to `authority` (the ingress), its status line and body.
fn get_via(authority: &str, host: &str, target: &str, token: &str) -> (String, String) {
    let mut s = TcpStream::connect(authority).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nX-Kiln-Auth: {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[test]
fn path_style_endpoints_work_as_returned_and_host_style_still_routes() {
    let (d, id, token) = setup_with(&["--endpoint-style", "path"]);
    let (_, info) = d.get("/v1/ingress");
    assert_eq!(info["endpointStyle"], "path", "{info}");
    let (_, vm) = d.get(&format!("/v1/microvms/{id}"));
    let endpoint = vm["endpoint"].as_str().unwrap().to_string();
    let port = d.ingress.rsplit_once(':').unwrap().1;
    assert_eq!(endpoint, format!("127.0.0.1:{port}/m/{id}"));

    // `http://{endpoint}/headers?q=1` as a client would send it: Host is the ingress address.
    let (authority, prefix) = endpoint.split_once('/').unwrap();
    let (status, body) = get_via(
        authority,
        authority,
        &format!("/{prefix}/headers?q=1"),
        &token,
    );
    assert!(status.contains(" 200 "), "{status} {body}");
    assert!(
        body.contains("target=/headers?q=1\n"),
        "the prefix is stripped: {body}"
    );
    assert!(body.contains(&format!("prefix=/m/{id}\n")), "{body}");
    // `/m/<id>` alone is the app's `/` (kiln-testapp answers 404 there: the app's own answer).
    let (status, body) = get_via(authority, authority, &format!("/m/{id}"), &token);
    assert!(
        status.contains(" 404 ") && body == "not found",
        "{status} {body}"
    );

    // Host style is accepted whatever the style: a Host naming the microVM wins, and the
    // path (even one that looks path-style) reaches the app unchanged.
    let host = format!("{id}.localhost");
    let (status, body) = get_via(&d.ingress, &host, "/m/other/headers", &token);
    assert!(status.contains(" 404 "), "{status} {body}");
    let (status, body) = get_via(&d.ingress, &host, "/headers", &token);
    assert!(
        status.contains(" 200 ") && body.contains("target=/headers\nprefix=\n"),
        "{body}"
    );

    // Neither a Host nor a path naming a microVM: a 400 that says how to name one.
    let (status, body) = get_via(&d.ingress, "127.0.0.1", "/headers", &token);
    assert!(
        status.contains(" 400 ") && body.contains("/m/<microvmId>/"),
        "{status} {body}"
    );
    // A path-style request for another microVM is refused by the token's scope.
    let (status, _) = get_via(&d.ingress, "127.0.0.1", "/m/mvm-other/headers", &token);
    assert!(status.contains(" 403 "), "{status}");
}
