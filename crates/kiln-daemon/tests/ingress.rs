//! The ingress end to end: a real kilnd, real guests, raw HTTP over real sockets.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const APP_START: &str = "#!/bin/sh\n\
mkdir -p /www2\n\
echo 'app on 8080' > /www/index.html\n\
echo 'second port' > /www2/index.html\n\
httpd -p 8080 -h /www\n\
httpd -p 8081 -h /www2\n\
exec nc -ll -p 9000 -e /srv/hook.sh\n";

const ECHO_CGI: &str = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
echo \"auth=${HTTP_X_AWS_PROXY_AUTH}${HTTP_X_KILN_AUTH}\"\n\
echo \"port=${HTTP_X_AWS_PROXY_PORT}${HTTP_X_KILN_PORT}\"\n\
echo \"len=$CONTENT_LENGTH\"\n\
if [ -n \"$CONTENT_LENGTH\" ]; then head -c \"$CONTENT_LENGTH\" | md5sum; fi\n";

const SLOW_CGI: &str =
    "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nsleep 3\necho slow-done\n";

const SSE_CGI: &str = "#!/bin/sh\nprintf 'Content-Type: text/event-stream\\r\\n\\r\\n'\nfor i in 1 2 3; do echo \"data: event $i\"; echo; sleep 1; done\n";

const BIG_CGI: &str = "#!/bin/sh\nprintf 'Content-Type: application/octet-stream\\r\\n\\r\\n'\nhead -c 52428800 /dev/zero\n";

const DOCKERFILE: &str = "FROM busybox\nCOPY hook.sh app.sh /srv/\nCOPY cgi/ /www/cgi-bin/\nEXPOSE 8080 8081\nCMD [\"/srv/app.sh\"]\n";

fn app_image(d: &TestDaemon) -> String {
    d.build_image(
        "web",
        &[
            ("Dockerfile", DOCKERFILE),
            ("hook.sh", HOOK_SH),
            ("app.sh", APP_START),
            ("cgi/echo.sh", ECHO_CGI),
            ("cgi/slow.sh", SLOW_CGI),
            ("cgi/sse.sh", SSE_CGI),
            ("cgi/big.sh", BIG_CGI),
        ],
        json!({}),
    )
}

struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), body read to EOF.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut reader = BufReader::new(s);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let mut chunked = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        if line.to_ascii_lowercase().starts_with("transfer-encoding:")
            && line.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw).unwrap();
    let body = if chunked { dechunk(&raw) } else { raw };
    Reply { status, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(pos) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..pos]).unwrap().trim(), 16)
            .unwrap_or(0);
        raw = &raw[pos + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn token(d: &TestDaemon, id: &str, ports: &[u16]) -> String {
    let ports: Vec<_> = ports.iter().map(|p| json!({"port": p})).collect();
    let (status, t) = d.post(
        "/v1/auth-tokens",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5, "allowedPorts": ports}),
    );
    assert_eq!(status, 200, "{t}");
    assert_eq!(
        t["authToken"]["X-aws-proxy-auth"],
        t["authToken"]["X-Kiln-Auth"]
    );
    t["authToken"]["X-aws-proxy-auth"]
        .as_str()
        .unwrap()
        .to_string()
}

fn run(d: &TestDaemon, idle: serde_json::Value) -> String {
    let (_, r) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "web", "idlePolicy": idle}),
    );
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    id
}

#[test]
fn ingress_authenticates_forwards_and_resumes() {
    let mut d = TestDaemon::start();
    app_image(&d);
    let id = run(
        &d,
        json!({"maxIdleDurationSeconds": 300, "suspendedDurationSeconds": 1800, "autoResumeEnabled": true}),
    );
    let other = run(
        &d,
        json!({"maxIdleDurationSeconds": 300, "suspendedDurationSeconds": 1800, "autoResumeEnabled": false}),
    );
    let host = format!("{id}.localhost");
    let tok = token(&d, &id, &[8080]);
    let seed = |t: &str| {
        vec![
            ("X-aws-proxy-auth", t.to_string()),
            ("X-aws-proxy-port", "8080".to_string()),
        ]
    };

    // The seed's headers work; the app never sees them.
    let page = request(&d.ingress, "GET", "/index.html", &host, &seed(&tok), b"");
    assert_eq!(
        (page.status, page.text()),
        (200, "app on 8080\n".to_string())
    );
    // An HTTP/2 client (here h2c; browsers and curl over TLS alike) reaches an app that
    // speaks only HTTP/1.1 (busybox httpd): the request is translated, GET and POST.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use http_body_util::{BodyExt, Full};
        let tcp = tokio::net::TcpStream::connect(&d.ingress).await.unwrap();
        let (mut h2, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        for (method, path, body) in [
            ("GET", "/index.html", ""),
            ("POST", "/cgi-bin/echo.sh", "over h2"),
            ("GET", "/index.html", ""),
        ] {
            let req = hyper::Request::builder()
                .method(method)
                .uri(format!("http://{host}{path}"))
                .header("x-kiln-auth", &tok)
                .body(Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let resp = h2.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            let status = resp.status();
            let text = resp.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&text);
            assert_eq!(status, 200, "{method} {path}: {text}");
            if method == "GET" {
                assert_eq!(text, "app on 8080\n");
            } else {
                assert!(text.contains("len=7"), "{text}");
            }
        }
    });
    let echo = request(
        &d.ingress,
        "POST",
        "/cgi-bin/echo.sh",
        &host,
        &[("X-Kiln-Auth", tok.clone())],
        b"hello body",
    );
    assert_eq!(echo.status, 200, "{}", echo.text());
    assert!(
        echo.text().contains("auth=\nport=\nlen=10"),
        "auth headers are stripped: {}",
        echo.text()
    );

    // A 50 MB body streamed in, and 50 MB streamed out.
    let big = vec![b'z'; 50 * 1024 * 1024];
    let started = Instant::now();
    let up = request(
        &d.ingress,
        "POST",
        "/cgi-bin/echo.sh",
        &host,
        &seed(&tok),
        &big,
    );
    assert!(
        up.text().contains(&format!("len={}", big.len())),
        "{}",
        up.text()
    );
    let down = request(
        &d.ingress,
        "GET",
        "/cgi-bin/big.sh",
        &host,
        &seed(&tok),
        b"",
    );
    assert_eq!(down.body.len(), 50 * 1024 * 1024);
    eprintln!(
        "50 MB up and 50 MB down through the ingress in {:?}",
        started.elapsed()
    );

    // SSE: events arrive before the stream ends.
    let mut s = TcpStream::connect(&d.ingress).unwrap();
    write!(s, "GET /cgi-bin/sse.sh HTTP/1.1\r\nHost: {host}\r\nX-Kiln-Auth: {tok}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let started = Instant::now();
    let mut first_event = None;
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if line.contains("data: event 1") && first_event.is_none() {
            first_event = Some(started.elapsed());
        }
        line.clear();
    }
    let total = started.elapsed();
    let first = first_event.expect("the first event arrived");
    assert!(
        total >= first + Duration::from_millis(1500),
        "event 1 at {first:?} came before the end at {total:?}"
    );

    // Bad requests get clear answers.
    assert_eq!(request(&d.ingress, "GET", "/", &host, &[], b"").status, 401);
    let mut forged = tok.clone();
    forged.replace_range(forged.len() - 5.., "AAAAA");
    assert_eq!(
        request(&d.ingress, "GET", "/", &host, &seed(&forged), b"").status,
        401
    );
    assert_eq!(
        request(
            &d.ingress,
            "GET",
            "/",
            &format!("{other}.localhost"),
            &seed(&tok),
            b""
        )
        .status,
        403,
        "another microVM's token"
    );
    let port8081 = vec![
        ("X-Kiln-Auth", tok.clone()),
        ("X-Kiln-Port", "8081".to_string()),
    ];
    assert_eq!(
        request(&d.ingress, "GET", "/", &host, &port8081, b"").status,
        403,
        "port not allowed"
    );
    let hook = vec![
        ("X-Kiln-Auth", tok.clone()),
        ("X-Kiln-Port", "9000".to_string()),
    ];
    assert_eq!(
        request(&d.ingress, "GET", "/ready", &host, &hook, b"").status,
        403,
        "the hook port is never reachable"
    );
    assert_eq!(d.post("/v1/auth-tokens", json!({"microvmIdentifier": id, "expirationInMinutes": 5, "allowedPorts": [{"port": 9000}]})).0, 400);
    assert_eq!(
        d.post(
            "/v1/auth-tokens",
            json!({"microvmIdentifier": id, "expirationInMinutes": 61})
        )
        .0,
        400
    );
    assert_eq!(
        request(&d.ingress, "GET", "/", "not-a-vm-host", &seed(&tok), b"").status,
        400
    );
    let huge = vec![("X-Filler", "f".repeat(64 * 1024))];
    assert_eq!(
        request(&d.ingress, "GET", "/", &host, &huge, b"").status,
        431
    );
    let two = token(&d, &id, &[8080, 8081]);
    let second = request(
        &d.ingress,
        "GET",
        "/index.html",
        &host,
        &[("X-Kiln-Auth", two.clone()), ("X-Kiln-Port", "8081".into())],
        b"",
    );
    assert_eq!(second.text(), "second port\n");

    // A client that never finishes its headers is cut off.
    let mut slow = TcpStream::connect(&d.ingress).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let _ = slow.read(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow client was not cut off"
    );

    // Rotation keeps old tokens valid; revocation is immediate.
    assert_eq!(d.post("/v1/auth-tokens/rotate-key", json!({})).0, 200);
    assert_eq!(
        request(&d.ingress, "GET", "/index.html", &host, &seed(&tok), b"").status,
        200
    );
    let (_, t) = d.post(
        "/v1/auth-tokens",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5}),
    );
    let (fresh, fresh_id) = (
        t["authToken"]["X-Kiln-Auth"].as_str().unwrap().to_string(),
        t["tokenId"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        request(&d.ingress, "GET", "/index.html", &host, &seed(&fresh), b"").status,
        200
    );
    assert_eq!(d.delete(&format!("/v1/auth-tokens/{fresh_id}")).0, 204);
    assert_eq!(
        request(&d.ingress, "GET", "/index.html", &host, &seed(&fresh), b"").status,
        401
    );
    assert_eq!(
        d.post(&format!("/v1/microvms/{id}/revoke-tokens"), json!({}))
            .0,
        204
    );
    assert_eq!(
        request(&d.ingress, "GET", "/index.html", &host, &seed(&tok), b"").status,
        401
    );
    let tok = token(&d, &id, &[8080]);

    // Auto-resume: a request to a SUSPENDED microVM waits for the resume and is served.
    assert_eq!(
        d.post(&format!("/v1/microvms/{id}/suspend"), json!({})).1["state"],
        "SUSPENDED"
    );
    let resumed = request(&d.ingress, "GET", "/index.html", &host, &seed(&tok), b"");
    assert_eq!(
        (resumed.status, resumed.text()),
        (200, "app on 8080\n".to_string())
    );
    assert_eq!(d.get(&format!("/v1/microvms/{id}")).1["state"], "RUNNING");

    // A kill -9 of kilnd: open ingress connections are cut; after the restart the same
    // token reaches the same guest, and the idle timer of a re-adopted microVM still runs.
    let idler = run(
        &d,
        json!({"maxIdleDurationSeconds": 5, "suspendedDurationSeconds": 1800, "autoResumeEnabled": true}),
    );
    let mut open = TcpStream::connect(&d.ingress).unwrap();
    write!(
        open,
        "GET /index.html HTTP/1.1\r\nHost: {host}\r\nX-Kiln-Auth: {tok}\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 12];
    open.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert_eq!(
        d.get(&format!("/v1/microvms/{idler}")).1["state"],
        "RUNNING"
    );
    d.kill9();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    match open.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "the open connection is cut, not left hanging: {e}"
        ),
    }
    d.spawn(&[]);
    let again = request(&d.ingress, "GET", "/index.html", &host, &seed(&tok), b"");
    assert_eq!(
        (again.status, again.text()),
        (200, "app on 8080\n".to_string()),
        "{}",
        d.log()
    );
    let idled = d.wait_state(&idler, "SUSPENDED", Duration::from_secs(60));
    assert!(
        idled["stateReason"].as_str().unwrap().contains("idle"),
        "{idled}"
    );

    // Without auto-resume: 409.
    let other_tok = token(&d, &other, &[8080]);
    d.post(&format!("/v1/microvms/{other}/suspend"), json!({}));
    let refused = request(
        &d.ingress,
        "GET",
        "/",
        &format!("{other}.localhost"),
        &seed(&other_tok),
        b"",
    );
    assert_eq!(refused.status, 409, "{}", refused.text());

    // Terminated: 404.
    d.post(&format!("/v1/microvms/{other}/terminate"), json!({}));
    let other_tok2 = tok.clone();
    let _ = other_tok2;
    let gone = request(
        &d.ingress,
        "GET",
        "/",
        &format!("{other}.localhost"),
        &seed(&other_tok),
        b"",
    );
    assert!(
        gone.status == 404 || gone.status == 401,
        "terminated microVM: {}",
        gone.status
    );
}

#[test]
fn a_microvm_is_not_suspended_while_a_request_is_open() {
    let d = TestDaemon::start();
    app_image(&d);
    let id = run(
        &d,
        json!({"maxIdleDurationSeconds": 1, "suspendedDurationSeconds": 600, "autoResumeEnabled": true}),
    );
    let tok = token(&d, &id, &[8080]);
    let host = format!("{id}.localhost");
    // Wake it if the idle policy already suspended it, then hold a 3 s request open.
    let (addr, host2, tok2) = (d.ingress.clone(), host.clone(), tok.clone());
    let slow = std::thread::spawn(move || {
        request(
            &addr,
            "GET",
            "/cgi-bin/slow.sh",
            &host2,
            &[("X-Kiln-Auth", tok2)],
            b"",
        )
    });
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        d.get(&format!("/v1/microvms/{id}")).1["state"],
        "RUNNING",
        "suspended during an open request"
    );
    let reply = slow.join().unwrap();
    assert_eq!(
        (reply.status, reply.text()),
        (200, "slow-done\n".to_string())
    );
    // Once idle, it is suspended.
    d.wait_state(&id, "SUSPENDED", Duration::from_secs(20));
}
