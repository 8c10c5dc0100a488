//! kilnd's quotas: microVMs not TERMINATED (`--max-microvms`) and image builds at once
//! (`--max-concurrent-builds`). Past one, the request gets a 429 that names the limit and the
//! flag, nothing is started, and a place freed is usable at once.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{tar_of, TestDaemon};
use serde_json::json;

const CONTEXT: &[(&str, &str)] = &[(
    "Dockerfile",
    "FROM busybox\nCMD [\"sh\", \"-c\", \"sleep 3600\"]\n",
)];

#[test]
fn quotas_refuse_the_microvm_or_build_over_the_limit_naming_the_flag() {
    let d = TestDaemon::start_with(&["--max-microvms", "1", "--max-concurrent-builds", "1"]);
    // Two builds at once: the second is refused while the first runs.
    let (status, art) = d.post_raw("/v1/artifacts", "application/x-tar", &tar_of(CONTEXT), true);
    assert_eq!(status, 200, "{art}");
    let artifact = art["artifactId"].clone();
    let (status, first) = d.post(
        "/v1/images",
        json!({"name": "quota", "codeArtifact": {"artifactId": artifact}, "waitForReady": false}),
    );
    assert_eq!(status, 202, "{first}");
    let (status, second) = d.post(
        "/v1/images",
        json!({"name": "quota-two", "codeArtifact": {"artifactId": artifact}, "waitForReady": false}),
    );
    assert_eq!(status, 429, "{second}");
    assert_eq!(second["code"], "ServiceQuotaExceededException", "{second}");
    let says = second["message"].as_str().unwrap();
    assert!(
        says.contains("limit is 1") && says.contains("--max-concurrent-builds"),
        "{second}"
    );
    let (_, images) = d.get("/v1/images");
    assert!(
        !images.to_string().contains("quota-two"),
        "the refused build left nothing: {images}"
    );
    d.wait_image(first["imageIdentifier"].as_str().unwrap());

    // One microVM at most: the second is refused until the first is terminated.
    let run = || d.post("/v1/microvms", json!({"imageIdentifier": "quota"}));
    let (status, one) = run();
    assert_eq!(status, 200, "{one}");
    let one = one["microvmId"].as_str().unwrap().to_string();
    let (status, two) = run();
    assert_eq!(status, 429, "{two}");
    let says = two["message"].as_str().unwrap();
    assert!(
        says.contains("limit is 1") && says.contains("--max-microvms"),
        "{two}"
    );
    let (_, list) = d.get("/v1/microvms");
    assert_eq!(list["microvms"].as_array().unwrap().len(), 1, "{list}");
    d.wait_state(&one, "RUNNING", Duration::from_secs(120));
    let (status, _) = d.post(&format!("/v1/microvms/{one}/terminate"), json!({}));
    assert_eq!(status, 200);
    let (status, again) = run();
    assert_eq!(status, 200, "a freed place is usable at once: {again}");
    let again = again["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&again, "RUNNING", Duration::from_secs(120));
    let (status, _) = d.post(&format!("/v1/microvms/{again}/terminate"), json!({}));
    assert_eq!(status, 200);
}

#[test]
fn uploads_stream_to_disk_under_their_cap_with_ids_of_their_own() {
    let d = TestDaemon::start_with(&["--max-artifact-mib", "1"]);
    let artifacts = d.home.join("artifacts");
    // Two uploads at once get two ids (they were named by the millisecond).
    let tar = tar_of(CONTEXT);
    let ids: Vec<String> = std::thread::scope(|s| {
        let ups: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let (status, art) =
                        d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
                    assert_eq!(status, 200, "{art}");
                    art["artifactId"].as_str().unwrap().to_string()
                })
            })
            .collect();
        ups.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{ids:?}");
    for id in &ids {
        let file = artifacts.join(format!("{id}.tar"));
        assert_eq!(std::fs::read(&file).unwrap(), tar, "{id} holds its upload");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // Over the cap: 413 naming the flag, and nothing left behind.
    let mut big = tar_of(&[("Dockerfile", "FROM busybox\n")]);
    // Sent whole before the answer is read (as ureq does): the 413 must still arrive.
    big.extend(std::iter::repeat_n(0u8, 8 << 20));
    let (status, err) = d.post_raw("/v1/artifacts", "application/x-tar", &big, true);
    assert_eq!(status, 413, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("--max-artifact-mib"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&artifacts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !ids.iter().any(|id| n.starts_with(id.as_str())))
        .collect();
    assert!(left.is_empty(), "a refused upload left {left:?}");
    // Not an archive: 400, nothing kept.
    let (status, err) = d.post_raw("/v1/artifacts", "application/x-tar", b"hello", true);
    assert_eq!(status, 400, "{err}");
    assert_eq!(std::fs::read_dir(&artifacts).unwrap().count(), 4);
}

/// Sets a file's modification time `ago` in the past (as a day passing would).
fn age(path: &std::path::Path, ago: &str) {
    let ok = std::process::Command::new("touch")
        .args(["-d", ago])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "touch {}", path.display());
}

#[test]
fn unused_uploads_go_a_day_after_upload_and_used_ones_stay() {
    let mut d = TestDaemon::start();
    let artifacts = d.home.join("artifacts");
    let upload = |d: &TestDaemon| {
        let (status, art) =
            d.post_raw("/v1/artifacts", "application/x-tar", &tar_of(CONTEXT), true);
        assert_eq!(status, 200, "{art}");
        art["artifactId"].as_str().unwrap().to_string()
    };
    let (unused, used, fresh) = (upload(&d), upload(&d), upload(&d));
    let (status, img) = d.post(
        "/v1/images",
        json!({"name": "kept", "codeArtifact": {"artifactId": used}, "waitForReady": false}),
    );
    assert_eq!(status, 202, "{img}");
    let id = img["imageIdentifier"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while d.get(&format!("/v1/images/{id}")).1["status"] != "SUCCESSFUL" {
        assert!(std::time::Instant::now() < deadline, "build too slow");
        std::thread::sleep(Duration::from_millis(200));
    }
    let file = |a: &str| artifacts.join(format!("{a}.tar"));
    age(&file(&unused), "2 days ago");
    age(&file(&used), "2 days ago");
    let partial = artifacts.join(".art-0000000000000000.upload");
    std::fs::write(&partial, b"half an upload").unwrap();
    age(&partial, "2 hours ago");
    // The sweep runs when kilnd starts (and every hour).
    d.sigterm();
    d.spawn(&[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while file(&unused).exists() || partial.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "an unused day-old upload or a stale partial one was kept"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        file(&used).exists(),
        "an image's build request keeps its upload"
    );
    assert!(file(&fresh).exists(), "an unused upload stays for a day");
}
