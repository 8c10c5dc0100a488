//! The fault-injection suite: kilnd is killed (SIGKILL, through `KILN_FAULT_AT`) at each
//! named step of launch, suspend, resume and terminate; after a restart every microVM is
//! RUNNING with its memory intact (a counter inside kept counting), or SUSPENDED and
//! resumable with its files, or TERMINATED with a reason — never lost — and no process,
//! directory or socket is left over.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::steps::{assert_no_strays, count, counting, die_at, sh, state};
use common::{hook_image, ReportServer, TestDaemon};
use serde_json::json;

#[test]
fn a_kilnd_killed_at_any_step_loses_no_microvm() {
    let report = ReportServer::start();
    let mut d = TestDaemon::start();
    hook_image(&d, &report);

    // Launch: rolled back, TERMINATED with the reason, nothing left.
    for step in ["launch.before-run", "launch.started", "launch.hooked"] {
        let mut id = String::new();
        die_at(&mut d, step, |d| {
            let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "hooks"}));
            assert_eq!(status, 200, "{r}");
            id = r["microvmId"].as_str().unwrap().to_string();
        });
        let v = state(&d, &id);
        assert_eq!(v["state"], "TERMINATED", "{step}: {v}");
        assert!(
            v["stateReason"]
                .as_str()
                .unwrap()
                .contains("kilnd restarted"),
            "{step}: {v}"
        );
        assert_no_strays(&d);
    }

    // Suspend before or during the save: rolled back, the guest runs on.
    for step in ["suspend.hooked", "suspend.saving"] {
        let (id, before) = counting(&d);
        die_at(&mut d, step, |d| {
            d.try_post(&format!("/v1/microvms/{id}/suspend"), json!({}));
        });
        let v = state(&d, &id);
        assert_eq!(v["state"], "RUNNING", "{step}: {v}\n{}", d.log());
        let after = count(&d, &id);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            after >= before && count(&d, &id) > after,
            "{step}: the counter goes on from {before}: {after}"
        );
        assert_no_strays(&d);
        assert_eq!(
            d.post(&format!("/v1/microvms/{id}/terminate"), json!({})).0,
            200
        );
    }

    // Suspend after the save: SUSPENDED, and it resumes with its memory.
    let (saved, before) = counting(&d);
    die_at(&mut d, "suspend.saved", |d| {
        d.try_post(&format!("/v1/microvms/{saved}/suspend"), json!({}));
    });
    assert_eq!(state(&d, &saved)["state"], "SUSPENDED", "{}", d.log());
    assert_no_strays(&d);
    let (status, v) = d.post(&format!("/v1/microvms/{saved}/resume"), json!({}));
    assert_eq!((status, v["state"].as_str()), (200, Some("RUNNING")), "{v}");
    assert!(count(&d, &saved) >= before);

    // Resume: rolled forward, RUNNING with its memory.
    for step in ["resume.before-run", "resume.started"] {
        // The snapshot holds at least the last count read.
        let before = count(&d, &saved);
        assert_eq!(
            d.post(&format!("/v1/microvms/{saved}/suspend"), json!({}))
                .1["state"],
            "SUSPENDED"
        );
        die_at(&mut d, step, |d| {
            d.try_post(&format!("/v1/microvms/{saved}/resume"), json!({}));
        });
        let v = state(&d, &saved);
        assert_eq!(v["state"], "RUNNING", "{step}: {v}\n{}", d.log());
        let after = count(&d, &saved);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            after >= before && count(&d, &saved) > after,
            "{step}: the counter goes on"
        );
        assert_no_strays(&d);
    }

    // Terminate: TERMINATED, nothing left.
    die_at(&mut d, "terminate.killed", |d| {
        d.try_post(&format!("/v1/microvms/{saved}/terminate"), json!({}));
    });
    let v = state(&d, &saved);
    assert_eq!(v["state"], "TERMINATED", "{v}");
    assert!(!v["stateReason"].as_str().unwrap_or_default().is_empty());
    assert_no_strays(&d);
}

#[test]
fn requests_during_a_transition_get_409_at_once_and_a_request_at_the_idle_timer_wins() {
    let report = ReportServer::start();
    let mut d = TestDaemon::start();
    hook_image(&d, &report);
    let hold = d.home.join("hold-idle");
    std::fs::write(&hold, b"held").unwrap();
    d.sigterm();
    let spec = format!("idle.decided={}", hold.display());
    d.spawn_env(&[], &[("KILN_FAULT_HOLD", &spec)]);

    // During the launch: a clear 409 at once, not a wait behind it.
    let (_, r) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "hooks", "idlePolicy": {"maxIdleDurationSeconds": 2,
               "suspendedDurationSeconds": 600, "autoResumeEnabled": true}}),
    );
    let id = r["microvmId"].as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    let (status, v) = d.post(
        &format!("/v1/microvms/{id}/exec"),
        json!({"command": ["true"]}),
    );
    assert_eq!(status, 409, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("waitFor=RUNNING"),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let v = d
        .get(&format!(
            "/v1/microvms/{id}?waitFor=RUNNING&timeoutSeconds=120"
        ))
        .1;
    assert_eq!(v["state"], "RUNNING", "{v}");

    // The idle timer fires and is held after deciding; a request comes in meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !d.log().contains("holding at idle.decided") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sh(&d, &id, "echo busy"), "busy\n");
    std::fs::remove_file(&hold).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !d.log().contains("no longer idle") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        state(&d, &id)["state"],
        "RUNNING",
        "the request kept it running"
    );
    // Left alone, it idles out as before.
    let v = d
        .get(&format!(
            "/v1/microvms/{id}?waitFor=SUSPENDED&timeoutSeconds=60"
        ))
        .1;
    assert_eq!(v["state"], "SUSPENDED", "{v}");
    assert!(v["stateReason"].as_str().unwrap().contains("idle"), "{v}");
}

/// The ingress's answer (status line) to a GET of `id`'s port 8080 with `token`.
fn through_ingress(d: &TestDaemon, id: &str, token: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&d.ingress).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {id}.localhost\r\nX-Kiln-Auth: {token}\r\nX-Kiln-Port: 8080\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_kilnd_killed_while_baking_or_rotating_keys_leaves_each_whole() {
    let report = ReportServer::start();
    let mut d = TestDaemon::start();
    hook_image(&d, &report);

    // A bake stopped before its record says SUCCESSFUL is FAILED ("interrupted") with
    // nothing of it left; one stopped after is SUCCESSFUL and runs.
    for (n, step) in ["bake.started", "bake.baked", "bake.recorded"]
        .into_iter()
        .enumerate()
    {
        let name = format!("bake{n}");
        die_at(&mut d, step, |d| {
            let dockerfile = format!("FROM busybox\nRUN echo {step} > /step\n");
            let tar = common::tar_of(&[("Dockerfile", &dockerfile)]);
            let (status, art) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
            assert_eq!(status, 200, "{art}");
            // kilnd may die before it answers.
            d.try_post(
                "/v1/images",
                json!({"name": name, "codeArtifact": {"artifactId": art["artifactId"]}}),
            );
        });
        let v = d.get(&format!("/v1/images/{name}")).1;
        let image = v["imageIdentifier"].as_str().unwrap().to_string();
        let build_dir = d.home.join("images").join(&name).join(&image);
        if step == "bake.recorded" {
            assert_eq!(v["status"], "SUCCESSFUL", "{step}: {v}");
            let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": name}));
            assert_eq!(status, 200, "{r}");
            let id = r["microvmId"].as_str().unwrap().to_string();
            d.wait_state(&id, "RUNNING", Duration::from_secs(90));
            assert_eq!(sh(&d, &id, "cat /step"), format!("{step}\n"));
            d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
        } else {
            assert_eq!(
                (v["status"].as_str(), v["statusReason"].as_str()),
                (Some("FAILED"), Some("interrupted")),
                "{step}: {v}"
            );
            assert!(
                !build_dir.join("template").exists(),
                "{step}: a template is left"
            );
            // The name does not point at the failed build.
            let current = std::fs::read_to_string(build_dir.parent().unwrap().join("current"));
            assert!(current.map_or(true, |c| c.trim() != image), "{step}");
        }
        assert!(
            !build_dir.join("vm").exists(),
            "{step}: the build VM's files are left"
        );
        assert_no_strays(&d);
    }

    // A key rotation stopped before or after its new file replaced the old one: kilnd
    // starts with a whole key file (0600, no temporary left), and a token issued before
    // is still admitted by the ingress (the app port is closed: 502, not 401).
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "hooks"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    let token = |d: &TestDaemon| {
        let (status, t) = d.post(
            "/v1/auth-tokens",
            json!({"microvmIdentifier": id, "expirationInMinutes": 30}),
        );
        assert_eq!(status, 200, "{t}");
        t["authToken"]["X-Kiln-Auth"].as_str().unwrap().to_string()
    };
    let before = token(&d);
    assert!(
        through_ingress(&d, &id, &before).contains("502"),
        "admitted"
    );
    assert!(
        through_ingress(&d, &id, "not-a-token").contains("401"),
        "refused"
    );
    for step in ["rotate.written", "rotate.renamed"] {
        die_at(&mut d, step, |d| {
            d.try_post("/v1/auth-tokens/rotate-key", json!({}));
        });
        let keys = d.home.join("ingress-keys.json");
        let mode = std::os::unix::fs::PermissionsExt::mode(&keys.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{step}");
        assert!(
            !d.home.join("ingress-keys.tmp").exists(),
            "{step}: a temporary is left"
        );
        let line = through_ingress(&d, &id, &before);
        assert!(
            line.contains("502"),
            "{step}: the old token: {line}\n{}",
            d.log()
        );
        let fresh = token(&d);
        assert!(through_ingress(&d, &id, &fresh).contains("502"), "{step}");
        let (status, v) = d.post("/v1/auth-tokens/rotate-key", json!({}));
        assert_eq!(status, 200, "{step}: rotating again works: {v}");
    }
    assert_eq!(state(&d, &id)["state"], "RUNNING");
    assert_no_strays(&d);
}
