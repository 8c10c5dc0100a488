//! kilnd end to end: a real daemon process, real guests, real HTTP.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn bad_requests_get_clear_json_errors() {
    let d = TestDaemon::start();
    // Health is open and states the accelerator.
    let (status, health) = TestDaemon::respond_public(&d, "/health");
    assert_eq!(status, 200);
    assert!(health["accelerator"] == "tcg" || health["accelerator"] == "kvm");
    if health["accelerator"] == "tcg" {
        assert_eq!(health["devMode"], true);
        assert!(health["warning"]
            .as_str()
            .unwrap()
            .contains("not a security boundary"));
    }
    // 401 without or with a wrong key.
    let (status, body) = d.post_raw("/v1/microvms", "application/json", b"{}", false);
    assert_eq!(status, 401);
    assert_eq!(body["code"], "UnauthorizedException");
    assert!(body["message"].as_str().unwrap().contains("api-key"));
    let wrong = d.clone_with_key("0".repeat(64));
    assert_eq!(wrong.get("/v1/microvms").0, 401);
    // 400: malformed JSON, unknown fields, oversized payload, bad idle policy.
    let (status, body) = d.post_raw("/v1/microvms", "application/json", b"{not json", true);
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("ValidationException"))
    );
    let (status, body) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "x", "surprise": 1}),
    );
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("surprise"),
        "{body}"
    );
    let (status, body) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "x", "runHookPayload": "p".repeat(16 * 1024 + 1)}),
    );
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("16384"),
        "{body}"
    );
    let (status, _) = d.post("/v1/microvms", json!({"imageIdentifier": "x", "idlePolicy": {"maxIdleDurationSeconds": 0, "suspendedDurationSeconds": 1, "autoResumeEnabled": true}}));
    assert_eq!(status, 400);
    let (status, _) = d.get("/v1/microvms?state=SLEEPING");
    assert_eq!(status, 400);
    // Every size and timeout of an image is range-checked before anything starts.
    for (field, value, named) in [
        (
            "readyTimeoutSeconds",
            json!(u64::MAX),
            "readyTimeoutSeconds",
        ),
        ("diskSizeMib", json!(u32::MAX), "diskSizeMib"),
        ("cpuBaseline", json!(5.0), "cpuBaseline"),
        ("vcpus", json!(0), "vcpus"),
    ] {
        let mut body = json!({"name": "x", "codeArtifact": {"artifactId": "art-00"}});
        body[field] = value;
        let (status, body) = d.post("/v1/images", body);
        assert_eq!(status, 400, "{field}: {body}");
        assert!(body["message"].as_str().unwrap().contains(named), "{body}");
    }
    // Path parameters are checked like the rest: a pid that is not a number is a JSON 400.
    let (status, body) = d.get("/v1/microvms/mvm-0000000000000000/processes/-1");
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("ValidationException")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("-1"), "{body}");
    let long_tag = format!("/v1/microvms/x/processes?tag={}", "t".repeat(257));
    let (status, body) = d.get(&long_tag);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("257"), "{body}");
    // The event stream checks its cursor before it opens.
    let (status, body) = d.get("/v1/events/stream?since=-1");
    assert_eq!(status, 400, "{body}");
    let refused = ureq::get(&format!("{}/v1/events/stream", d.base))
        .set("Authorization", &format!("Bearer {}", d.key))
        .set("Last-Event-ID", "yesterday")
        .call();
    assert!(
        matches!(refused, Err(ureq::Error::Status(400, _))),
        "{refused:?}"
    );
    // StartProcess takes bodies past the 64 KiB of other JSON bodies (a shell line may be 64
    // KiB): such a body reaches validation (then the unknown microVM's 404); over 1 MiB is 413.
    let start = "/v1/microvms/mvm-0000000000000000/processes";
    let (status, body) = d.post(start, json!({"shell": "a".repeat(64 * 1024)}));
    assert_eq!(status, 404, "{body}");
    let (status, body) = d.post(start, json!({"shell": "a".repeat(64 * 1024 + 1)}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = d.post(start, json!({"shell": "a".repeat(1 << 20)}));
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("PayloadTooLarge")),
        "{body}"
    );
    // 404 on unknown ids and routes.
    let (status, body) = d.post("/v1/microvms", json!({"imageIdentifier": "no-such-image"}));
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("ResourceNotFoundException"))
    );
    for path in ["/v1/microvms/mvm-0000000000000000", "/v1/images/nope"] {
        assert_eq!(d.get(path).0, 404, "{path}");
    }
    assert_eq!(
        d.post("/v1/microvms/mvm-0000000000000000/suspend", json!({}))
            .0,
        404
    );
    assert_eq!(d.get("/v1/nothing-here").0, 404);
    // The router and the spec agree both ways: every documented operation is served (no
    // fallback answer, no 405), and every other method on a documented path is a 405.
    let documented = kiln_daemon::api::operations();
    let call = |method: &str, path: &str| {
        let url = format!("{}{}", d.base, path.replace("{id}", "x"));
        let req = ureq::request(&method.to_uppercase(), &url)
            .set("Authorization", &format!("Bearer {}", d.key));
        match if method == "get" || method == "delete" {
            req.call()
        } else {
            req.send_json(json!({}))
        } {
            // An event stream never ends: its status is the answer.
            Ok(r) if r.content_type() == "text/event-stream" => (r.status(), String::new()),
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    };
    for (method, path) in &documented {
        let (status, body) = call(method, path);
        assert!(
            status != 405 && !body.contains("UnknownOperation"),
            "{method} {path} is not routed: {status} {body}"
        );
    }
    for (_, path) in &documented {
        for method in ["get", "post", "put", "delete", "patch"] {
            if documented.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            let (status, body) = call(method, path);
            assert_eq!(
                status, 405,
                "{method} {path} is served but not documented: {body}"
            );
        }
    }
    // Loopback only unless the operator says otherwise.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args(["--home"])
        .arg(d.home.join("other"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
    // The API key is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.home.join("api-key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn lifecycle_hooks_run_in_order_with_the_payload_and_terminate_leaves_nothing() {
    let report = ReportServer::start();
    // The hooks report to a server on host loopback: an operator-defined host service,
    // the only way a guest reaches a host port.
    let d = TestDaemon::start_with(&[
        "--host-service",
        &format!("report=127.0.0.1:{}", report.port),
    ]);
    let image = hook_image(&d, &report);

    let (status, run) = d.post(
        "/v1/microvms",
        json!({
            "imageIdentifier": "hooks",
            "executionRoleArn": "arn:aws:iam::123456789:role/ignored",
            "idlePolicy": {"maxIdleDurationSeconds": 300, "suspendedDurationSeconds": 1800, "autoResumeEnabled": true},
            "runHookPayload": "hello-payload",
            "connectors": [{"type": "host-service", "name": "report"}]
        }),
    );
    assert_eq!(status, 200, "{run}");
    let id = run["microvmId"].as_str().unwrap().to_string();
    // With the default `--endpoint-style auto`: host style only where the system resolver
    // maps names under the ingress domain to the ingress (stock Debian does not).
    let (_, ingress) = d.get("/v1/ingress");
    let resolves = std::net::ToSocketAddrs::to_socket_addrs("kiln-endpoint-probe.localhost:1")
        .map(|mut a| a.any(|a| a.ip() == std::net::Ipv4Addr::LOCALHOST))
        .unwrap_or(false);
    let port = d.ingress.rsplit_once(':').unwrap().1;
    let endpoint = run["endpoint"].as_str().unwrap();
    if resolves {
        assert_eq!(ingress["endpointStyle"], "host");
        assert_eq!(endpoint, format!("{id}.localhost:{port}"));
    } else {
        assert_eq!(ingress["endpointStyle"], "path");
        assert_eq!(endpoint, format!("127.0.0.1:{port}/m/{id}"));
    }
    assert_eq!(run["state"], "PENDING");
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));

    // Illegal transitions are 409.
    let (status, body) = d.post(&format!("/v1/microvms/{id}/resume"), json!({}));
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("ConflictException"))
    );
    // The image cannot be deleted while a microVM uses it.
    let (status, body) = d.delete(&format!("/v1/images/{image}"));
    assert_eq!(status, 409, "{body}");

    // Exec works and counts as activity.
    let (status, out) = d.post(
        &format!("/v1/microvms/{id}/exec"),
        json!({"command": ["cat", "/etc/os-release"]}),
    );
    assert_eq!(status, 200, "{out}");
    assert!(out["stdout"].as_str().unwrap().contains("kiln busybox"));
    // A program that cannot start is answered as a shell would (127), not as kilnd's failure.
    let (status, out) = d.post(
        &format!("/v1/microvms/{id}/exec"),
        json!({"command": ["/no/such/program"], "timeoutSeconds": 5.0}),
    );
    assert_eq!(
        (status, out["exitCode"].as_i64()),
        (200, Some(127)),
        "{out}"
    );
    assert!(
        out["stderr"].as_str().unwrap().contains("not found"),
        "{out}"
    );

    assert_eq!(
        d.post(&format!("/v1/microvms/{id}/suspend"), json!({})).1["state"],
        "SUSPENDED"
    );
    assert_eq!(
        d.post(&format!("/v1/microvms/{id}/suspend"), json!({})).0,
        409
    );
    assert_eq!(
        d.post(&format!("/v1/microvms/{id}/resume"), json!({})).1["state"],
        "RUNNING"
    );
    let dir = d.home.join("microvms").join(&id);
    assert!(dir.is_dir());
    let (status, done) = d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    assert_eq!((status, done["state"].as_str()), (200, Some("TERMINATED")));
    assert_eq!(
        d.post(&format!("/v1/microvms/{id}/terminate"), json!({})).0,
        409
    );

    let calls = report.calls();
    assert_eq!(
        calls,
        vec![
            "/hook/run?body=hello-payload",
            "/hook/suspend?body=",
            "/hook/resume?body=",
            "/hook/terminate?body="
        ],
        "hook order and payload"
    );
    // Every process and file of the microVM is gone.
    assert!(!dir.exists(), "microVM directory removed");
    assert!(d.qemu_processes().is_empty(), "no QEMU left");
    let view = d.get(&format!("/v1/microvms/{id}")).1;
    assert!(
        view["usage"]["runningSeconds"].as_f64().unwrap() > 0.0,
        "{view}"
    );
    // Every transition is in the event list, with a cursor.
    let (_, ev) = d.get("/v1/events?since=0&limit=1000");
    let mine: Vec<String> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["microvmId"] == id.as_str())
        .map(|e| e["toState"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        mine,
        [
            "PENDING",
            "RUNNING",
            "SUSPENDED",
            "RESUMING",
            "RUNNING",
            "TERMINATED"
        ]
    );
    let cursor = ev["nextCursor"].as_i64().unwrap();
    assert!(d.get(&format!("/v1/events?since={cursor}")).1["events"]
        .as_array()
        .unwrap()
        .is_empty());
    // Now the image can go.
    assert_eq!(d.delete(&format!("/v1/images/{image}")).0, 204);
    let metrics = TestDaemon::respond_public(&d, "/metrics").1;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("kiln_microvms{state=\"TERMINATED\"} 1"),
        "{metrics}"
    );
}

#[test]
fn failing_run_hook_idle_policy_and_concurrent_runs() {
    let report = ReportServer::start();
    let d = TestDaemon::start();
    hook_image(&d, &report);

    // A failing /run terminates the microVM with the reason.
    let (_, run) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "hooks", "runHookPayload": "please-fail"}),
    );
    let id = run["microvmId"].as_str().unwrap();
    let dead = d.wait_state(id, "TERMINATED", Duration::from_secs(60));
    assert!(
        dead["stateReason"]
            .as_str()
            .unwrap()
            .contains("run hook failed"),
        "{dead}"
    );
    assert!(!d.home.join("microvms").join(id).exists());

    // Idle: suspended after 1 s without activity, terminated after 2 s suspended.
    let (_, run) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "hooks", "idlePolicy": {"maxIdleDurationSeconds": 1, "suspendedDurationSeconds": 2, "autoResumeEnabled": true}}),
    );
    let idle = run["microvmId"].as_str().unwrap().to_string();
    let suspended = d.wait_state(&idle, "SUSPENDED", Duration::from_secs(30));
    assert!(
        suspended["stateReason"].as_str().unwrap().contains("idle"),
        "{suspended}"
    );
    let gone = d.wait_state(&idle, "TERMINATED", Duration::from_secs(30));
    assert!(
        gone["stateReason"]
            .as_str()
            .unwrap()
            .contains("suspended for over 2"),
        "{gone}"
    );
    let usage = &gone["usage"];
    assert!(
        usage["suspendedSnapshotByteSeconds"].as_f64().unwrap() > 0.0,
        "{usage}"
    );

    // Max duration ends a microVM whatever its activity.
    let (_, run) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "hooks", "maxDurationSeconds": 3}),
    );
    let short = run["microvmId"].as_str().unwrap().to_string();
    let ended = d.wait_state(&short, "TERMINATED", Duration::from_secs(30));
    assert!(
        ended["stateReason"]
            .as_str()
            .unwrap()
            .contains("maxDurationSeconds"),
        "{ended}"
    );

    // Ten concurrent RunMicrovm calls all reach RUNNING.
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| {
                    d.post("/v1/microvms", json!({"imageIdentifier": "hooks"}))
                        .1["microvmId"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for id in &ids {
        d.wait_state(id, "RUNNING", Duration::from_secs(120));
    }
    let (_, list) = d.get("/v1/microvms?state=RUNNING&imageIdentifier=hooks");
    assert_eq!(list["microvms"].as_array().unwrap().len(), 10);
    for id in &ids {
        assert_eq!(
            d.post(&format!("/v1/microvms/{id}/terminate"), json!({})).0,
            200
        );
    }
    assert!(d.qemu_processes().is_empty());
}

#[test]
fn restart_after_kill_and_graceful_shutdown_leave_a_consistent_state() {
    let report = ReportServer::start();
    let mut d = TestDaemon::start();
    hook_image(&d, &report);
    let run = |d: &TestDaemon| {
        d.post("/v1/microvms", json!({"imageIdentifier": "hooks"}))
            .1["microvmId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let running = run(&d);
    let suspended = run(&d);
    d.wait_state(&running, "RUNNING", Duration::from_secs(90));
    d.wait_state(&suspended, "RUNNING", Duration::from_secs(90));
    d.post(&format!("/v1/microvms/{suspended}/suspend"), json!({}));

    // A bake in progress, its log followed while it runs.
    let tar = tar_of(&[(
        "Dockerfile",
        "FROM busybox\nRUN echo step-one-done && sleep 600\n",
    )]);
    let art = d
        .post_raw("/v1/artifacts", "application/x-tar", &tar, true)
        .1;
    let (_, img) = d.post(
        "/v1/images",
        json!({"name": "slow", "codeArtifact": {"artifactId": art["artifactId"]}}),
    );
    let slow = img["imageIdentifier"].as_str().unwrap().to_string();
    let follow = ureq::get(&format!("{}/v1/images/{slow}/logs?follow=true", d.base))
        .set("Authorization", &format!("Bearer {}", d.key))
        .call()
        .unwrap();
    let mut reader = std::io::BufReader::new(follow.into_reader());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0,
            "log stream ended early: {}",
            d.get(&format!("/v1/images/{slow}")).1
        );
        if line.contains("step-one-done") {
            break;
        }
    }

    // A counter in the running guest: its memory must outlive kilnd.
    let sh = |d: &TestDaemon, id: &str, script: &str| {
        let (status, out) = d.post(
            &format!("/v1/microvms/{id}/exec"),
            json!({"command": ["sh", "-c", script]}),
        );
        assert_eq!(status, 200, "{out}\n{}", d.log());
        out["stdout"].as_str().unwrap().to_string()
    };
    sh(&d, &running, common::steps::COUNTER);
    std::thread::sleep(Duration::from_millis(500));
    let count =
        |d: &TestDaemon, id: &str| -> u64 { sh(d, id, "cat /tmp/count").trim().parse().unwrap() };
    let before = count(&d, &running);
    assert!(before > 0);

    // kill -9: the running guest outlives kilnd (the bake's build VM does not) and the
    // restart takes it back with its memory; the suspended one resumes.
    d.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        d.qemu_processes().len(),
        1,
        "the running guest outlives kilnd"
    );
    std::thread::sleep(Duration::from_millis(500));
    d.spawn(&[]);
    assert_eq!(
        d.get(&format!("/v1/microvms/{running}")).1["state"],
        "RUNNING",
        "{}",
        d.log()
    );
    let after = count(&d, &running);
    assert!(
        after > before + 3,
        "the counter kept counting while kilnd was down: {before} then {after}"
    );
    assert_eq!(
        d.get(&format!("/v1/images/{slow}")).1["status"],
        "FAILED",
        "the interrupted bake"
    );
    assert_eq!(
        d.get(&format!("/v1/microvms/{suspended}")).1["state"],
        "SUSPENDED"
    );
    let (status, resumed) = d.post(&format!("/v1/microvms/{suspended}/resume"), json!({}));
    assert_eq!(
        (status, resumed["state"].as_str()),
        (200, Some("RUNNING")),
        "{resumed}"
    );

    // SIGTERM with the default policy leaves both running for the next kilnd, here another
    // build of it (the upgrade path: a binary that is not the one that started them).
    d.sigterm();
    assert_eq!(d.qemu_processes().len(), 2, "{}", d.log());
    // Beside the first build: kilnd finds its helpers (jailer, network backend) there.
    let next = std::path::Path::new(env!("CARGO_BIN_EXE_kilnd"))
        .with_file_name(format!("kilnd-upgrade-test-{}", std::process::id()));
    let mut binary = std::fs::read(env!("CARGO_BIN_EXE_kilnd")).unwrap();
    binary.extend_from_slice(b"\0kiln-upgrade-test: another build of kilnd\0");
    std::fs::write(&next, &binary).unwrap();
    std::fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    d.program = Some(next);
    d.spawn(&[]);
    assert!(
        d.log().contains("running microVM re-adopted"),
        "{}",
        d.log()
    );
    for id in [&running, &suspended] {
        assert_eq!(d.get(&format!("/v1/microvms/{id}")).1["state"], "RUNNING");
        assert_eq!(sh(&d, id, "echo alive"), "alive\n");
    }
    assert!(count(&d, &running) > after);

    let _ = std::fs::remove_file(d.program.take().unwrap());

    // A guest whose QEMU ends while kilnd is down is TERMINATED with the reason.
    d.kill9();
    let pid: i32 = std::fs::read_to_string(d.home.join("microvms").join(&running).join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    d.spawn(&[]);
    let lost = d.get(&format!("/v1/microvms/{running}")).1;
    assert_eq!(lost["state"], "TERMINATED", "{lost}");
    let reason = lost["stateReason"].as_str().unwrap();
    assert!(
        reason.contains("kilnd restarted") && reason.contains("QEMU ended while kilnd was down"),
        "{reason}"
    );
    assert!(reason.contains("console tail"), "{reason}");
    assert!(!d.home.join("microvms").join(&running).exists());
    assert_eq!(sh(&d, &suspended, "echo still"), "still\n");

    // SIGTERM with --on-shutdown suspend suspends running microVMs; they resume after.
    d.sigterm();
    d.spawn(&["--on-shutdown", "suspend"]);
    d.sigterm();
    assert!(
        d.qemu_processes().is_empty(),
        "QEMUs left after a suspending shutdown: {:?}\n{}",
        d.qemu_processes(),
        d.log()
    );
    d.spawn(&[]);
    assert_eq!(
        d.get(&format!("/v1/microvms/{suspended}")).1["state"],
        "SUSPENDED"
    );
    let (status, again) = d.post(&format!("/v1/microvms/{suspended}/resume"), json!({}));
    assert_eq!((status, again["state"].as_str()), (200, Some("RUNNING")));
    assert_eq!(sh(&d, &suspended, "echo alive"), "alive\n");
}

#[test]
fn waiting_for_a_state_answers_when_it_is_reached_without_polling() {
    let report = ReportServer::start();
    let d = TestDaemon::start();
    hook_image(&d, &report);
    let (_, run) = d.post("/v1/microvms", json!({"imageIdentifier": "hooks"}));
    let id = run["microvmId"].as_str().unwrap().to_string();
    // One request, answered once the launch is done.
    let (status, v) = d.get(&format!(
        "/v1/microvms/{id}?waitFor=RUNNING&timeoutSeconds=120"
    ));
    assert_eq!((status, v["state"].as_str()), (200, Some("RUNNING")), "{v}");

    // A wait that times out answers with the state as it is.
    let started = Instant::now();
    let (status, v) = d.get(&format!(
        "/v1/microvms/{id}?waitFor=SUSPENDED&timeoutSeconds=1"
    ));
    assert_eq!((status, v["state"].as_str()), (200, Some("RUNNING")));
    assert!(started.elapsed() >= Duration::from_secs(1));

    // A wait answers when another request changes the state.
    let waiter = {
        let d = d.clone_with_key(d.key.clone());
        let id = id.clone();
        std::thread::spawn(move || {
            d.get(&format!(
                "/v1/microvms/{id}?waitFor=SUSPENDED&timeoutSeconds=120"
            ))
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        d.post(&format!("/v1/microvms/{id}/suspend"), json!({})).1["state"],
        "SUSPENDED"
    );
    let (status, v) = waiter.join().unwrap();
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("SUSPENDED")),
        "{v}"
    );

    // TERMINATED ends every wait; bad values say what is allowed.
    d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    let (status, v) = d.get(&format!(
        "/v1/microvms/{id}?waitFor=RUNNING&timeoutSeconds=120"
    ));
    assert_eq!((status, v["state"].as_str()), (200, Some("TERMINATED")));
    let (status, v) = d.get(&format!("/v1/microvms/{id}?waitFor=SLEEPING"));
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("waitFor"), "{v}");
    let (status, v) = d.get(&format!(
        "/v1/microvms/{id}?waitFor=RUNNING&timeoutSeconds=301"
    ));
    assert_eq!(status, 400, "{v}");
}
