//! Per-microVM metrics through the real API: a running microVM gets samples (host PSS and
//! disk, the guest's own memory and disk from its agent), CPU moves when the guest burns
//! CPU and falls back when it stops, the history grows and is bounded in time order, a
//! write in the guest shows on its disk figures, and Prometheus carries the same figures
//! with microVM and image labels.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::steps::{sh, terminate};
use common::TestDaemon;
use serde_json::{json, Value};

fn metrics(d: &TestDaemon, id: &str) -> Value {
    d.get(&format!("/v1/microvms/{id}")).1["metrics"].clone()
}

/// Waits until `pred` holds for the newest sample; returns it.
fn until(d: &TestDaemon, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = metrics(d, id);
        if !m.is_null() && pred(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "never {what}: {m}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_follow_the_guest_and_reach_prometheus() {
    let d = TestDaemon::start();
    let tar = common::tar_of(&[("Dockerfile", "FROM busybox\nCMD [\"sleep\", \"86400\"]\n")]);
    let (status, art) = d.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
    assert_eq!(status, 200, "{art}");
    let (status, img) = d.post(
        "/v1/images",
        json!({"name": "metered", "codeArtifact": {"artifactId": art["artifactId"]},
               "waitForReady": false}),
    );
    assert_eq!(status, 202, "{img}");
    d.wait_image(img["imageIdentifier"].as_str().unwrap());
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "metered"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));

    // The guest's own figures: 512 MiB of RAM less what its kernel keeps, a root disk.
    let m = until(&d, &id, "had the guest's figures", |m| {
        m["guestMemoryTotalBytes"].as_u64().is_some()
    });
    let total = m["guestMemoryTotalBytes"].as_u64().unwrap();
    assert!(
        (300 << 20..=512 << 20).contains(&total),
        "guest memory total {total}"
    );
    assert!(
        m["guestMemoryAvailableBytes"].as_u64().unwrap() <= total,
        "{m}"
    );
    assert!(m["guestDiskTotalBytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["hostMemoryBytes"].as_u64().unwrap() > 1 << 20, "{m}");
    assert!(m["hostDiskBytes"].as_u64().is_some(), "{m}");

    // Idle first: the highest CPU over a few samples.
    let idle = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(250));
            metrics(&d, &id)["cpuPercent"].as_f64().unwrap()
        })
        .fold(0.0_f64, f64::max);
    // Then a busy loop in the guest for a few seconds, in the background.
    sh(
        &d,
        &id,
        "(timeout 6 sh -c 'while :; do :; done' >/dev/null 2>&1 &) ; echo started",
    );
    let busy = until(&d, &id, "showed the busy loop", |m| {
        m["cpuPercent"].as_f64().unwrap() > (idle + 30.0).max(50.0)
    });
    assert!(busy["cpuSeconds"].as_f64().unwrap() > m["cpuSeconds"].as_f64().unwrap());
    until(&d, &id, "fell back after the loop", |m| {
        m["cpuPercent"].as_f64().unwrap() < (idle + 30.0).max(50.0)
    });

    // 16 MiB written in the guest: its disk use grows by about that (guest figures are
    // asked every 5 s).
    let before = metrics(&d, &id)["guestDiskUsedBytes"].as_u64().unwrap();
    sh(
        &d,
        &id,
        "dd if=/dev/zero of=/big bs=1M count=16 2>/dev/null; sync",
    );
    until(&d, &id, "counted the written file", |m| {
        m["guestDiskUsedBytes"].as_u64().unwrap() >= before + (12 << 20)
    });

    // The history: many samples, in time order, and `sinceMs` cuts it.
    let (status, h) = d.get(&format!("/v1/microvms/{id}/metrics"));
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["intervalMs"], 200);
    let samples = h["samples"].as_array().unwrap();
    assert!(samples.len() >= 20, "{} samples", samples.len());
    let times: Vec<i64> = samples
        .iter()
        .map(|s| s["atMs"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    let cut = times[times.len() - 3];
    let (_, later) = d.get(&format!("/v1/microvms/{id}/metrics?sinceMs={cut}"));
    // Samples taken after the cut: the two newest of the history, and any taken since (the
    // tick runs every 200 ms, so one may land between the two requests).
    let later: Vec<i64> = later["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["atMs"].as_i64().unwrap())
        .collect();
    assert!(
        later.len() >= 2 && later[..2] == times[times.len() - 2..],
        "{later:?} after {cut}"
    );
    assert!(later.iter().all(|t| *t > cut), "{later:?} after {cut}");
    assert!(samples
        .iter()
        .any(|s| s["cpuPercent"].as_f64().unwrap() > 50.0));

    // Prometheus: the same figures, labelled by microVM and image.
    let text = d.respond_public("/metrics").1;
    let text = text.as_str().unwrap();
    let labels = format!("microvm=\"{id}\",image=\"metered\"");
    for series in [
        format!("kiln_microvm_cpu_percent{{{labels}}} "),
        format!("kiln_microvm_memory_bytes{{{labels},kind=\"host\"}} "),
        format!("kiln_microvm_memory_bytes{{{labels},kind=\"guest_total\"}} "),
        format!("kiln_microvm_disk_bytes{{{labels},kind=\"guest_used\"}} "),
        format!("kiln_microvm_network_bytes_total{{{labels},direction=\"in\"}} "),
    ] {
        assert!(text.contains(&series), "no {series} in\n{text}");
    }

    // Bad input and unknown microVMs.
    assert_eq!(
        d.get(&format!("/v1/microvms/{id}/metrics?sinceMs=x")).0,
        400
    );
    assert_eq!(d.get("/v1/microvms/mvm-0000000000000000/metrics").0, 404);
    // Not running: no current sample, and the history goes with it.
    let (status, _) = d.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    assert_eq!(status, 200);
    d.wait_state(&id, "SUSPENDED", Duration::from_secs(60));
    assert!(metrics(&d, &id).is_null());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.get(&format!("/v1/microvms/{id}/metrics")).1["samples"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the history of a suspended microVM stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    terminate(&d, &id);
}
