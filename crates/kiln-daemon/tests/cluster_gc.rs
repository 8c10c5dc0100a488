//! Garbage collection of object storage in a cluster: blobs that no image bundle and no
//! snapshot list names any more are removed (after a resume, after an image is deleted),
//! those still named stay, and the microVMs that used them carry on; a node that fetched
//! a deleted image removes its copy and its cached blobs too.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::nodes::{as_strs, build_app, object_store_nodes, set_capacity};
use common::steps::sh;
use common::TestDaemon;
use serde_json::json;

/// The blobs in object storage at `url` now.
fn listed(url: &str) -> HashSet<String> {
    let cache = tempfile::tempdir().unwrap();
    let blobs = kiln_objects::Blobs::open(url, cache.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(blobs.list())
        .unwrap()
        .into_iter()
        .map(|l| l.id.to_string())
        .collect()
}

/// Waits (up to a minute) until the blobs at `url` are `want`.
fn wait_listed(url: &str, want: &HashSet<String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = listed(url);
        if &now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} blobs, want {}: extra {:?}, missing {:?}",
            now.len(),
            want.len(),
            now.difference(want).collect::<Vec<_>>(),
            want.difference(&now).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn wait_log(d: &TestDaemon, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !d.log().contains(text) {
        assert!(Instant::now() < deadline, "no {text:?} in {}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn blobs_no_image_or_snapshot_names_are_collected_and_named_ones_stay() {
    let Some((mut flags, _secrets)) = object_store_nodes(&["a", "b"]) else {
        return;
    };
    // A has room for one microVM, B for more: a launch through A runs on B, which fetches
    // the image. Collection every second, of blobs unnamed and unclaimed for 3 s.
    set_capacity(&mut flags[0], 1024);
    let gc = [
        "--blob-gc-interval-seconds",
        "1",
        "--blob-gc-grace-seconds",
        "3",
    ];
    for f in &mut flags {
        f.extend(gc.map(String::from));
    }
    let url = flags[0][flags[0].iter().position(|f| f == "--object-store").unwrap() + 1].clone();
    let flags = as_strs(&flags);
    let a = TestDaemon::start_with(&flags[0]);
    let b = TestDaemon::start_seeded(&flags[1], &[("api-key", &a.key)]);
    let image = build_app(&a, "collected");
    wait_log(&a, "image uploaded to object storage");
    let of_image = listed(&url);
    assert!(of_image.len() >= 4, "{of_image:?}");

    let (status, r) = a.post("/v1/microvms", json!({"imageIdentifier": "collected"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    let v = a.wait_state(&id, "RUNNING", Duration::from_secs(90));
    assert_eq!(v["node"], "b", "{v}");
    sh(&a, &id, "echo kept > /root/file");
    let (status, v) = a.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&id, "SUSPENDED", Duration::from_secs(120));
    wait_log(&b, "snapshot uploaded");
    let with_snapshot = listed(&url);
    assert!(
        with_snapshot.is_superset(&of_image) && with_snapshot.len() > of_image.len(),
        "the snapshot adds blobs of its own: {} then {}",
        of_image.len(),
        with_snapshot.len()
    );

    // Resumed, its snapshot list is forgotten: the blobs only it named go, the image's
    // stay, and the microVM carries on.
    let (status, v) = a.post(&format!("/v1/microvms/{id}/resume"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&id, "RUNNING", Duration::from_secs(120));
    wait_listed(&url, &of_image, "after the resume");
    assert_eq!(sh(&a, &id, "cat /root/file").trim(), "kept");
    let deleted = a.metric("kiln_blob_gc_deleted_total") + b.metric("kiln_blob_gc_deleted_total");
    assert_eq!(deleted as usize, with_snapshot.len() - of_image.len());
    assert!(
        a.metric("kiln_blob_gc_deleted_bytes_total") + b.metric("kiln_blob_gc_deleted_bytes_total")
            > 0
    );
    // A launch of the image still finds every blob it needs (B holds its copy; the
    // bundle is whole in storage too).
    let rounds = a.metric("kiln_blob_gc_rounds_total") + b.metric("kiln_blob_gc_rounds_total");
    assert!(rounds >= 1);

    // Terminated and the image deleted (through A): nothing is left in storage, and B
    // removes its copy of the template and its cached blobs.
    let (status, v) = a.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&id, "TERMINATED", Duration::from_secs(60));
    let (status, v) = a.delete(&format!("/v1/images/{image}"));
    assert!(status == 200 || status == 204, "{status} {v}");
    wait_listed(&url, &HashSet::new(), "after the image is deleted");
    let deadline = Instant::now() + Duration::from_secs(60);
    let cached = |d: &TestDaemon| {
        std::fs::read_dir(d.home.join("blobs"))
            .map(|e| e.count())
            .unwrap_or(0)
    };
    while b.home.join("imported").join(&image).exists() || cached(&b) > 0 {
        assert!(
            Instant::now() < deadline,
            "B keeps {} cached blobs, template there: {}",
            cached(&b),
            b.home.join("imported").join(&image).exists()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
