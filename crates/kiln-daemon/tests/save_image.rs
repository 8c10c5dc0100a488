//! SaveMicrovmImage ("save as image") through the real API: a RUNNING microVM becomes an
//! image whose microVMs start with its memory (a file and a counting process) and run on
//! without the source image; bad requests are refused with what to do; and kilnd killed at
//! each step of a save leaves the microVM running and the image FAILED "interrupted" (or,
//! once recorded, SUCCESSFUL), with nothing left over.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::steps::{assert_counts_on, assert_no_strays, count, counting, die_at, sh, terminate};
use common::{hook_image, ReportServer, TestDaemon};
use serde_json::{json, Value};

fn save(d: &TestDaemon, id: &str, name: &str) -> (u16, Value) {
    d.post(&format!("/v1/microvms/{id}/image"), json!({ "name": name }))
}

/// The image once it is no longer CREATING.
fn wait_image(d: &TestDaemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, v) = d.get(&format!("/v1/images/{id}"));
        assert_eq!(status, 200, "{v}");
        if v["status"] != "CREATING" {
            return v;
        }
        assert!(Instant::now() < deadline, "image {id} still CREATING: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run(d: &TestDaemon, image: &str) -> String {
    let (status, r) = d.post("/v1/microvms", json!({ "imageIdentifier": image }));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    let v = d.wait_state(&id, "RUNNING", Duration::from_secs(120));
    assert_eq!(v["state"], "RUNNING", "{v}\n{}", d.log());
    id
}

/// The build directories of image `name` in the daemon's home.
fn build_dir(d: &TestDaemon, name: &str, id: &str) -> std::path::PathBuf {
    d.home.join("images").join(name).join(id)
}

#[test]
fn a_saved_image_launches_with_the_microvms_state_and_a_crash_at_any_step_loses_nothing() {
    let report = ReportServer::start();
    let mut d = TestDaemon::start();
    let source = hook_image(&d, &report);
    let (parent, _) = counting(&d);
    sh(&d, &parent, "echo saved-state > /root/note");

    // Bad requests say what was wrong.
    let (status, v) = save(&d, &parent, "Not_A_Name");
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("a-z, 0-9"), "{v}");
    let (status, v) = save(&d, &parent, "hooks");
    assert_eq!(status, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("Dockerfile"), "{v}");
    assert_eq!(save(&d, "mvm-0000000000000000", "warm").0, 404);

    // Saved: the answer comes once the state is captured; the microVM runs on.
    let at_save = count(&d, &parent);
    let (status, v) = save(&d, &parent, "warm");
    assert_eq!(status, 202, "{v}\n{}", d.log());
    assert_eq!(v["status"], "CREATING");
    let image_id = v["imageIdentifier"].as_str().unwrap().to_string();
    sh(&d, &parent, "echo after-the-save > /root/note");
    let image = wait_image(&d, &image_id);
    assert_eq!(image["status"], "SUCCESSFUL", "{image}\n{}", d.log());
    assert_eq!(image["sourceMicrovmId"], parent.as_str());
    let (_, src) = d.get(&format!("/v1/images/{source}"));
    assert_eq!(image["memorySizeMib"], src["memorySizeMib"]);
    assert_eq!(image["hookPort"], src["hookPort"]);
    assert_counts_on(&d, &parent, at_save);

    // A microVM of the image starts with the microVM's files and processes as they were.
    let child = run(&d, "warm");
    assert_eq!(sh(&d, &child, "cat /root/note").trim(), "saved-state");
    // The next launch's disk overlay is made ahead, once this launch is done.
    let spares = d.home.join("overlays-ahead");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&spares)
        .map(|e| {
            e.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
                .count()
        })
        .unwrap_or(0)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "no overlay made ahead in {}",
            spares.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_counts_on(&d, &child, at_save);
    assert_ne!(
        sh(&d, &child, "cat /run/kiln/vmgenid"),
        sh(&d, &parent, "cat /run/kiln/vmgenid"),
        "its own generation ID"
    );
    sh(&d, &child, "echo mine > /root/only-here");
    assert_eq!(
        sh(&d, &parent, "cat /root/only-here 2>/dev/null || echo none").trim(),
        "none"
    );
    terminate(&d, &child);
    assert_no_strays(&d);

    // Killed before the template is recorded: the image is FAILED "interrupted" with no
    // files left, and the microVM runs on.
    for step in ["image.captured", "image.written"] {
        let from = count(&d, &parent);
        die_at(&mut d, step, |d| {
            d.try_post(
                &format!("/v1/microvms/{parent}/image"),
                json!({"name": "crashed"}),
            );
        });
        let (status, v) = d.get("/v1/images/crashed");
        assert_eq!(status, 200, "{step}: {v}");
        assert_eq!(v["status"], "FAILED", "{step}: {v}");
        assert_eq!(v["statusReason"], "interrupted", "{step}: {v}");
        let dir = build_dir(&d, "crashed", v["imageIdentifier"].as_str().unwrap());
        for left in ["vm", "template"] {
            assert!(!dir.join(left).exists(), "{step}: {left} is removed");
        }
        assert_eq!(
            d.get(&format!("/v1/microvms/{parent}")).1["state"],
            "RUNNING",
            "{step}\n{}",
            d.log()
        );
        assert_counts_on(&d, &parent, from);
        assert!(
            !d.home.join("microvms").join(&parent).join("fork").exists(),
            "{step}: the work directory is removed"
        );
        assert_no_strays(&d);
        let (status, v) = d.delete(&format!(
            "/v1/images/{}",
            v["imageIdentifier"].as_str().unwrap()
        ));
        assert_eq!(status, 204, "{v}");
    }

    // Killed once recorded: the image is SUCCESSFUL and launches.
    die_at(&mut d, "image.recorded", |d| {
        d.try_post(
            &format!("/v1/microvms/{parent}/image"),
            json!({"name": "recorded"}),
        );
    });
    let (_, v) = d.get("/v1/images/recorded");
    assert_eq!(v["status"], "SUCCESSFUL", "{v}\n{}", d.log());

    // The image stands alone: with its source microVM and image gone, it still launches.
    terminate(&d, &parent);
    let (status, v) = d.delete(&format!("/v1/images/{source}"));
    assert_eq!(status, 204, "{v}");
    let again = run(&d, "warm");
    assert_eq!(sh(&d, &again, "cat /root/note").trim(), "saved-state");
    assert_counts_on(&d, &again, at_save);
    // Saving a saved image's microVM under its name makes a newer build of it.
    let (status, v) = save(&d, &again, "warm");
    assert_eq!(status, 202, "{v}");
    let newer = v["imageIdentifier"].as_str().unwrap().to_string();
    assert_ne!(newer, image_id);
    assert_eq!(wait_image(&d, &newer)["status"], "SUCCESSFUL");
    terminate(&d, &again);
    let recorded = run(&d, "recorded");
    assert_eq!(sh(&d, &recorded, "cat /root/note").trim(), "after-the-save");
    terminate(&d, &recorded);
    assert_no_strays(&d);
}
