//! QEMUs started ahead of launches (kilnd's pool, `--prestart-per-image`) through the real
//! API: after a launch of an image the next one's jailed QEMU waits, the next RunMicrovm
//! takes it (its id, its QEMU) and runs the same guest as a launch without it; a kill -9,
//! a graceful shutdown or the image's deletion ends the waiting one and leaves nothing.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::steps::{assert_no_strays, sh, terminate};
use common::TestDaemon;
use serde_json::json;

/// What two microVMs of one image must show alike, whichever way they were launched.
const STATE: &str = "cat /baked.txt; grep MemTotal /proc/meminfo; ls /sys/class/net | sort | \
    tr '\\n' ' '; uname -r";

fn run(d: &TestDaemon) -> String {
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "warm"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    id
}

/// The one pre-started QEMU (pid, id) once it waits.
fn waiting(d: &TestDaemon) -> (u32, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (pids, ids) = (d.prestarted_qemus(), d.prestarted_ids());
        let files: Vec<_> = ids
            .iter()
            .filter(|id| {
                d.home
                    .join("prestarted")
                    .join(format!("{id}.json"))
                    .exists()
            })
            .collect();
        if pids.len() == 1 && files.len() == 1 && d.metric("kiln_prestarted_qemus") == 1 {
            return (pids[0], files[0].clone());
        }
        assert!(
            Instant::now() < deadline,
            "no QEMU started ahead: {pids:?} {ids:?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn ends(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "QEMU {pid} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn qemu_pid(d: &TestDaemon, id: &str) -> u32 {
    let path = d.home.join("microvms").join(id).join("qemu.pid");
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn launches_take_prestarted_qemus_and_crashes_shutdowns_and_deletes_end_the_waiting_ones() {
    let mut d = TestDaemon::start();
    let image = d.build_image(
        "warm",
        &[("Dockerfile", "FROM busybox\nRUN echo baked > /baked.txt\n")],
        json!({}),
    );
    // The first launch starts its own QEMU; the image is hot from then on.
    let a = run(&d);
    assert_eq!(d.metric("kiln_launches_total{qemu=\"started\"}"), 1);
    let (pid, id) = waiting(&d);
    assert!(
        d.qemu_processes().len() == 1 && !d.qemu_processes().contains(&pid),
        "a waiting QEMU is no microVM's"
    );

    // The next takes it: the microVM has its id and runs in that very QEMU, jailed.
    let b = run(&d);
    assert_eq!(b, id, "the microVM gets the pre-started QEMU's id");
    assert_eq!(qemu_pid(&d, &b), pid, "and runs in it");
    assert_eq!(d.metric("kiln_launches_total{qemu=\"prestarted\"}"), 1);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(!uid.split_whitespace().skip(1).any(|u| u == "0"), "{uid}");
    assert_eq!(sh(&d, &a, STATE), sh(&d, &b, STATE));
    assert!(sh(&d, &b, STATE).starts_with("baked\n"));
    // Its network backend started at the launch, with its own policy.
    let net = d.home.join("microvms").join(&b).join("net.pid");
    let net: u32 = std::fs::read_to_string(net)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(net));

    // kill -9 with a QEMU waiting: it outlives kilnd, and the restart ends it.
    let (pid, id) = waiting(&d);
    d.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid), "kill -9 leaves it (nothing can end it then)");
    d.spawn(&[]);
    ends(pid);
    assert!(!d.home.join("microvms").join(&id).exists());
    assert!(d.prestarted_ids().is_empty(), "{:?}", d.prestarted_ids());
    for vm in [&a, &b] {
        assert_eq!(sh(&d, vm, "cat /baked.txt"), "baked\n");
    }
    assert_no_strays(&d);

    // A graceful shutdown ends it; the microVMs keep running for the next kilnd.
    let c = run(&d);
    let (pid, _) = waiting(&d);
    d.sigterm();
    assert!(!alive(pid), "a waiting QEMU ends with its kilnd");
    assert_eq!(d.qemu_processes().len(), 3);
    assert!(d.prestarted_ids().is_empty());

    // --prestart-per-image 0: nothing is started ahead.
    d.spawn(&["--prestart-per-image", "0"]);
    let e = run(&d);
    std::thread::sleep(Duration::from_secs(2));
    assert!(d.prestarted_ids().is_empty() && d.prestarted_qemus().is_empty());
    assert_eq!(d.metric("kiln_prestarted_qemus"), 0);
    d.sigterm();

    // Deleting the image ends its waiting QEMU.
    d.spawn(&[]);
    let f = run(&d);
    let (pid, id) = waiting(&d);
    for vm in [&a, &b, &c, &e, &f] {
        terminate(&d, vm);
    }
    assert_eq!(d.delete(&format!("/v1/images/{image}")).0, 204);
    ends(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.prestarted_ids().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", d.prestarted_ids());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!d.home.join("microvms").join(&id).exists());
    assert!(d.qemu_processes().is_empty() && d.prestarted_qemus().is_empty());
    assert_no_strays(&d);
}
