//! Egress connectors through the API: what RunMicrovm's connectors let a guest reach, the
//! counters in GetMicrovm and the denial events. Test hosts live in network namespaces this
//! test creates; the canary listens on host loopback.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::TestDaemon;
use kiln_testkit::netns::{Canary, NetnsHost};
use serde_json::{json, Value};

const NAME: &str = "allowed.kiln.test";

fn run(d: &TestDaemon, connectors: Value) -> String {
    let (status, r) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "net", "connectors": connectors}),
    );
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    id
}

/// Runs a shell command in the microVM: (exit code, stdout + stderr).
fn sh(d: &TestDaemon, id: &str, script: &str) -> (i64, String) {
    let (status, out) = d.post(
        &format!("/v1/microvms/{id}/exec"),
        json!({"command": ["sh", "-c", format!("{script} 2>&1")]}),
    );
    assert_eq!(status, 200, "{out}");
    (
        out["exitCode"].as_i64().unwrap_or(-1),
        out["stdout"].as_str().unwrap_or_default().to_string(),
    )
}

fn fetch(d: &TestDaemon, id: &str, url: &str) -> Result<String, String> {
    match sh(d, id, &format!("wget -q -O - '{url}'")) {
        (0, body) => Ok(body),
        (_, err) => Err(err),
    }
}

#[test]
fn connectors_decide_what_a_microvm_reaches() {
    let allowed = NetnsHost::start("allowed", 8080);
    let other = NetnsHost::start("other", 8080);
    let canary = Canary::start();
    let egress_host = format!("{NAME}={}", allowed.addr);
    let mut d = TestDaemon::start_with(&["--egress-host", &egress_host]);
    d.build_image(
        "net",
        &[("Dockerfile", "FROM busybox\nRUN true\n")],
        json!({}),
    );
    let api_port: u16 = d.base.rsplit(':').next().unwrap().parse().unwrap();
    let ingress_port: u16 = d.ingress.rsplit(':').next().unwrap().parse().unwrap();

    // Bad connectors are refused before anything runs, saying what to fix.
    for (bad, says) in [
        (
            json!([{"type": "host-service", "name": "db"}]),
            "--host-service",
        ),
        (json!([{"type": "none"}, {"type": "internet"}]), "none"),
        (
            json!([{"type": "allowlist", "destinations": [{"cidr": "10.0.0.0/99"}]}]),
            "CIDR",
        ),
        (json!([{"type": "vpc"}]), "connectors"),
    ] {
        let (status, body) = d.post(
            "/v1/microvms",
            json!({"imageIdentifier": "net", "connectors": bad}),
        );
        assert_eq!(status, 400, "{body}");
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
    }

    // `none`: no interface at all, nothing reachable.
    let none = run(&d, json!([{"type": "none"}]));
    assert_eq!(sh(&d, &none, "ls /sys/class/net").1.trim(), "lo");
    assert!(fetch(&d, &none, &allowed.url(&allowed.addr.to_string())).is_err());
    // The agent takes the NIC away itself: an image without a shell gets `none` too.
    d.build_image(
        "nosh",
        &[("Dockerfile", "FROM busybox\nRUN rm /bin/sh\n")],
        json!({}),
    );
    let (status, r) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "nosh", "connectors": [{"type": "none"}]}),
    );
    assert_eq!(status, 200, "{r}");
    let nosh = r["microvmId"].as_str().unwrap().to_string();
    let view = d.wait_state(&nosh, "RUNNING", Duration::from_secs(90));
    assert_eq!(view["state"], "RUNNING", "{view}\n{}", d.log());
    let exec = |argv: Value| {
        d.post(
            &format!("/v1/microvms/{nosh}/exec"),
            json!({"command": argv}),
        )
        .1
    };
    assert_ne!(
        exec(json!(["/bin/sh", "-c", "true"]))["exitCode"],
        0,
        "no shell in this image"
    );
    assert_eq!(exec(json!(["/bin/ls", "/sys/class/net"]))["stdout"], "lo\n");

    // `allowlist`: the allowed host by name and by address; nothing else.
    let listed = run(
        &d,
        json!([{"type": "allowlist", "destinations": [
            {"name": NAME, "ports": [8080]},
            {"cidr": format!("{}/32", allowed.addr), "ports": [8080]}
        ]}]),
    );
    for host in [NAME.to_string(), allowed.addr.to_string()] {
        let body = fetch(&d, &listed, &allowed.url(&host));
        assert_eq!(
            body.as_deref().map(str::trim),
            Ok(allowed.token.as_str()),
            "{host}"
        );
    }
    // The default, `internet`: the private test host is not public, so it is refused.
    let public = run(&d, json!(null));
    for (id, url) in [
        (&listed, other.url(&other.addr.to_string())),
        (&listed, "http://169.254.169.254/".to_string()),
        (&public, allowed.url(&allowed.addr.to_string())),
        (&public, allowed.url(NAME)),
        (&public, "http://10.0.0.1/".to_string()),
        (&public, "http://192.168.1.1/".to_string()),
    ] {
        assert!(fetch(&d, id, &url).is_err(), "{url} must be refused");
    }
    // Host loopback, kiln's own ports and every host address are closed under every
    // connector; with them the only way from one microVM to another.
    let mut host_addrs: Vec<String> = kiln_vmm::kiln_net::HostFacts::read()
        .addrs
        .iter()
        .filter(|a| !a.is_loopback()) // the guest's own loopback is not the host's
        .map(|a| a.to_string())
        .collect();
    host_addrs.push("10.0.2.2".into());
    for id in [&none, &listed, &public] {
        for addr in &host_addrs {
            for port in [canary.port, api_port, ingress_port] {
                let url = format!("http://{addr}:{port}/");
                assert!(fetch(&d, id, &url).is_err(), "{url} from {id}");
            }
        }
    }
    assert_eq!(canary.hits(), 0, "the loopback canary was never reached");

    // Counters and denial events.
    // The backend reports every 100 ms (denials at once): wait for it to catch up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let view = loop {
        let view = d.get(&format!("/v1/microvms/{listed}")).1;
        let n = &view["usage"]["network"];
        let caught_up = n["connections"].as_u64() >= Some(2)
            && n["bytesIn"].as_u64() > Some(0)
            && n["denials"].as_u64() >= Some(2);
        if caught_up || std::time::Instant::now() > deadline {
            break view;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let net = &view["usage"]["network"];
    assert!(net["connections"].as_u64().unwrap() >= 2, "{view}");
    assert!(net["bytesIn"].as_u64().unwrap() > 0, "{view}");
    assert!(net["denials"].as_u64().unwrap() >= 2, "{view}");
    assert_eq!(view["connectors"][0]["type"], "allowlist", "{view}");
    let events = d.get("/v1/events?limit=1000").1;
    let denied: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "egress" && e["microvmId"] == listed.as_str())
        .collect();
    assert!(
        denied.iter().any(|e| e["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("{}:8080", other.addr))),
        "{events}"
    );

    // Suspend and resume keep the connectors.
    assert_eq!(
        d.post(&format!("/v1/microvms/{listed}/suspend"), json!({}))
            .1["state"],
        "SUSPENDED"
    );
    assert_eq!(
        d.post(&format!("/v1/microvms/{listed}/resume"), json!({}))
            .1["state"],
        "RUNNING"
    );
    let body = fetch(&d, &listed, &allowed.url(NAME));
    assert_eq!(body.as_deref().map(str::trim), Ok(allowed.token.as_str()));
    assert!(fetch(&d, &listed, &other.url(&other.addr.to_string())).is_err());

    // A kill -9 of kilnd: the guests and their network backends keep running, and the
    // restarted kilnd reads the backends' reports again, counters carried on.
    let connections = |d: &TestDaemon| {
        d.get(&format!("/v1/microvms/{listed}")).1["usage"]["network"]["connections"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = connections(&d);
    d.kill9();
    d.spawn(&["--egress-host", &egress_host]);
    let body = fetch(&d, &listed, &allowed.url(NAME));
    assert_eq!(body.as_deref().map(str::trim), Ok(allowed.token.as_str()));
    assert!(fetch(&d, &listed, &other.url(&other.addr.to_string())).is_err());
    assert!(fetch(&d, &public, "http://10.0.0.1/").is_err());
    assert_eq!(sh(&d, &none, "ls /sys/class/net").1.trim(), "lo");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while connections(&d) <= before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        connections(&d) > before,
        "the counters go on from {before} after the restart"
    );
    let events = d.get("/v1/events?limit=1000").1;
    let after_restart: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .skip_while(|e| !(e["kind"] == "adopted" && e["microvmId"] == listed.as_str()))
        .filter(|e| e["kind"] == "egress" && e["microvmId"] == listed.as_str())
        .collect();
    assert!(
        !after_restart.is_empty(),
        "a denial after the restart is an event: {events}"
    );
    for id in [&none, &listed, &public] {
        assert_eq!(
            d.post(&format!("/v1/microvms/{id}/terminate"), json!({})).0,
            200
        );
    }
}
