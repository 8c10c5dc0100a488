//! A QEMU upgrade on the host, as an operator meets it: images baked with the old QEMU show
//! REBUILD_REQUIRED with the difference and `kiln image rebuild` bakes them again from the
//! recorded request; suspended microVMs the new QEMU cannot resume are kept and flagged,
//! never deleted by policy, and their disk stays downloadable.
//!
//! The upgrade is simulated the way it shows on disk: the snapshots' manifests say they were
//! taken by QEMU 7.2 (what kiln ran before QEMU 10), everything else is real.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{kiln, kilnd_with, Daemon};

const OLD_QEMU: &str = "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)";
const FLAGS: &[&str] = &["--min-idle-seconds", "1", "--tick-ms", "200"];

fn ok(d: &Daemon, args: &[&str]) -> String {
    let (code, out, err) = kiln(d, args);
    let log = || std::fs::read_to_string(d.home.path().join("kilnd.log")).unwrap_or_default();
    assert_eq!(
        code,
        0,
        "kiln {args:?} failed: {out}{err}\n--- kilnd ---\n{}",
        log()
    );
    out
}

fn api(d: &Daemon, path: &str) -> Value {
    let read = |f: &str| std::fs::read_to_string(d.home.path().join(f)).unwrap();
    let endpoint = format!("http://{}", read("kilnd.addr").trim());
    let c =
        kiln_client::Client::from_env(Some(endpoint), Some(read("api-key").trim().into())).unwrap();
    c.raw_get(path).unwrap()
}

fn wait_state(d: &Daemon, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = api(d, &format!("/v1/microvms/{id}"));
        if v["state"] == state {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never became {state}: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Rewrites a manifest as if QEMU 7.2 had written it (root may write the 0444 template files).
fn taken_by_old_qemu(manifest: &Path) {
    let mut m: Value = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
    m["qemu_version"] = OLD_QEMU.into();
    m["qemu_build"] = OLD_QEMU.into();
    std::fs::write(manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// Downloads the microVM's disk and returns its bytes as a raw image.
fn download_disk(d: &Daemon, id: &str, scratch: &Path) -> Vec<u8> {
    let file = scratch.join(format!("{id}.qcow2"));
    let _ = std::fs::remove_file(&file);
    ok(d, &["disk", id, file.to_str().unwrap()]);
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&file)
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert!(info.get("backing-filename").is_none(), "standalone: {info}");
    let raw = scratch.join(format!("{id}.raw"));
    let status = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&file)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read(raw).unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn after_a_qemu_upgrade_images_rebuild_and_suspended_microvms_are_kept() {
    let mut d = kilnd_with(FLAGS);
    let scratch = tempfile::tempdir().unwrap();
    let ctx = scratch.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo built-from-the-recorded-request > /built.txt\n",
    )
    .unwrap();
    ok(
        &d,
        &[
            "image",
            "create",
            "upg",
            ctx.to_str().unwrap(),
            "--quiet",
            "--memory",
            "512",
        ],
    );
    let old_image = api(&d, "/v1/images/upg");
    assert_eq!(old_image["status"], "SUCCESSFUL", "{old_image}");
    assert_eq!(old_image["buildRequest"]["name"], "upg", "{old_image}");
    assert_eq!(
        old_image["buildRequest"]["memorySizeMib"], 512,
        "{old_image}"
    );

    // A microVM with a file on its disk, suspended, with a short suspended lifetime.
    let id = ok(&d, &["run", "upg", "--wait", "--suspended-seconds", "2"])
        .trim()
        .to_string();
    let marker = format!("kiln-upgrade-marker-{id}");
    ok(
        &d,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            &format!("echo {marker} > /root/keep.txt && sync"),
        ],
    );
    ok(&d, &["suspend", &id]);
    wait_state(&d, &id, "SUSPENDED");
    assert!(contains(
        &download_disk(&d, &id, scratch.path()),
        marker.as_bytes()
    ));

    // The upgrade: kilnd stops, the snapshots turn out to be QEMU 7.2's, kilnd starts.
    d.stop();
    let template = PathBuf::from(old_image_template(&d, &old_image));
    taken_by_old_qemu(&template.join("manifest.json"));
    let vm_dir = d.home.path().join("microvms").join(&id);
    taken_by_old_qemu(&vm_dir.join("suspended/manifest.json"));
    d.start_again(FLAGS);

    let image = api(&d, "/v1/images/upg");
    assert_eq!(image["status"], "REBUILD_REQUIRED", "{image}");
    let reason = image["statusReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("QEMU version: snapshot has 7.2.15")
            && reason.contains("kiln image rebuild upg"),
        "{reason}"
    );
    let metrics = metrics(&d);
    assert!(
        metrics.contains("kiln_images{status=\"REBUILD_REQUIRED\"} 1"),
        "{metrics}"
    );
    let (code, _, err) = kiln(&d, &["run", "upg"]);
    assert_eq!(
        code, 4,
        "running a REBUILD_REQUIRED image is a conflict: {err}"
    );
    assert!(
        err.contains("REBUILD_REQUIRED") && err.contains("QEMU version"),
        "{err}"
    );

    let vm = api(&d, &format!("/v1/microvms/{id}"));
    assert_eq!(vm["state"], "SUSPENDED", "{vm}");
    let blocked = vm["resumeBlockedReason"].as_str().unwrap_or_default();
    assert!(blocked.contains("QEMU version"), "{vm}");
    let (code, _, err) = kiln(&d, &["resume", &id]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("cannot be resumed on this host") && err.contains("kiln disk"),
        "{err}"
    );
    // Well past suspendedDurationSeconds (2 s): kept, with its files.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(api(&d, &format!("/v1/microvms/{id}"))["state"], "SUSPENDED");
    assert!(vm_dir.join("suspended/device.state").is_file() && vm_dir.join("disk.qcow2").is_file());
    assert!(contains(
        &download_disk(&d, &id, scratch.path()),
        marker.as_bytes()
    ));

    // One command bakes the image again from what it was created with.
    let out = kiln(&d, &["image", "rebuild", "upg"]);
    assert_eq!(out.0, 0, "{}{}", out.1, out.2);
    assert!(out.2.contains("Building upg as"), "{}", out.2);
    let rebuilt = api(&d, "/v1/images/upg");
    assert_eq!(rebuilt["status"], "SUCCESSFUL", "{rebuilt}");
    assert_ne!(rebuilt["imageIdentifier"], old_image["imageIdentifier"]);
    assert_eq!(rebuilt["buildRequest"], old_image["buildRequest"]);
    let fresh = ok(&d, &["run", "upg", "--wait"]).trim().to_string();
    let built = ok(&d, &["exec", &fresh, "--", "cat", "/built.txt"]);
    assert!(built.contains("built-from-the-recorded-request"), "{built}");

    // Its owner terminates the old microVM when done: then its files go.
    ok(&d, &["terminate", &id]);
    ok(&d, &["terminate", &fresh]);
    assert!(!vm_dir.exists());
}

fn old_image_template(d: &Daemon, image: &Value) -> String {
    let id = image["imageIdentifier"].as_str().unwrap();
    let record = d.home.path().join("images/upg").join(id).join("image.json");
    let record: Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    record["template"].as_str().unwrap().to_string()
}

/// kilnd's Prometheus text (unauthenticated, like /health).
fn metrics(d: &Daemon) -> String {
    use std::io::{Read, Write};
    let addr = std::fs::read_to_string(d.home.path().join("kilnd.addr")).unwrap();
    let mut s = std::net::TcpStream::connect(addr.trim()).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: kilnd\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}
