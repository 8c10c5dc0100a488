//! A disk near full refuses new work, never what runs: with less free space on KILN_HOME's
//! disk than `--min-free-disk-mib`, uploads, builds and new microVMs answer 429 naming the
//! flag, and a suspend (which writes the memory) is refused with the microVM left RUNNING,
//! instead of a save that fails half way and costs it. `--max-disk-mib` caps what KILN_HOME
//! itself holds the same way.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{tar_of, TestDaemon};
use serde_json::json;

/// More than any disk here has free.
const FLOOR_MIB: &str = "1000000000";

#[test]
fn a_full_disk_refuses_new_work_and_keeps_what_runs() {
    let mut d = TestDaemon::start();
    let image = d.build_image("floor", &[("Dockerfile", "FROM busybox\n")], json!({}));
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": image}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));

    d.sigterm();
    d.spawn(&["--min-free-disk-mib", FLOOR_MIB]);
    assert_eq!(d.get(&format!("/v1/microvms/{id}")).1["state"], "RUNNING");
    let refused = |status: u16, body: &serde_json::Value| {
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["code"], "ServiceQuotaExceededException", "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("--min-free-disk-mib"),
            "{body}"
        );
    };
    let tar = tar_of(&[("Dockerfile", "FROM busybox\n")]);
    let (status, body) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
    refused(status, &body);
    let (status, body) = d.post("/v1/microvms", json!({"imageIdentifier": image}));
    refused(status, &body);
    let (status, body) = d.post(
        "/v1/images",
        json!({"name": "more", "codeArtifact": {"artifactId": "art-0123456789abcdef"}}),
    );
    assert!(status == 429 || status == 404, "{status} {body}");
    // The suspend would write the guest's memory: refused, and the microVM runs on.
    let (status, body) = d.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    refused(status, &body);
    assert!(
        body["message"].as_str().unwrap().contains("keeps running"),
        "{body}"
    );
    // So would a fork (its copies): refused before the parent pauses.
    let (status, body) = d.post(&format!("/v1/microvms/{id}/fork"), json!({"count": 2}));
    refused(status, &body);
    assert!(
        body["message"].as_str().unwrap().contains("no fork"),
        "{body}"
    );
    let (status, out) = d.post(
        &format!("/v1/microvms/{id}/exec"),
        json!({"command": ["echo", "alive"]}),
    );
    assert_eq!(
        (status, out["stdout"].as_str()),
        (200, Some("alive\n")),
        "{out}"
    );

    // A cap on what KILN_HOME holds (it already holds an image and a microVM: over 1 MiB).
    d.sigterm();
    d.spawn(&["--min-free-disk-mib", "0", "--max-disk-mib", "1"]);
    let (status, body) = d.post("/v1/microvms", json!({"imageIdentifier": image}));
    assert_eq!(status, 429, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("--max-disk-mib is 1"),
        "{body}"
    );
    let (status, body) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
    assert_eq!(status, 429, "{body}");
    assert_eq!(d.get(&format!("/v1/microvms/{id}")).1["state"], "RUNNING");

    // With room again, everything works.
    d.sigterm();
    d.spawn(&["--min-free-disk-mib", "0"]);
    let (status, v) = d.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("SUSPENDED")),
        "{v}"
    );
    assert_eq!(
        d.post(&format!("/v1/microvms/{id}/terminate"), json!({})).0,
        200
    );
}
