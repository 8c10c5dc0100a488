//! kilnd's microVMs are jailed, its health says how; their jails outlive a kill -9 of kilnd
//! and the restart takes them back; terminating them, or their QEMU ending while kilnd is
//! down, leaves no cgroup, uid or file of a jail behind.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use common::{client, context, kiln, kilnd, wait_image};

fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The kiln cgroup directories `pid` is in, as the host sees them.
fn cgroup_dirs(pid: u32) -> Vec<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    own.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            if !path.contains("/kiln/vm-") {
                return None;
            }
            let controller = list.split(',').next().filter(|c| !c.is_empty());
            Some(match controller {
                Some(c) => PathBuf::from(format!("/sys/fs/cgroup/{c}{path}")),
                None => PathBuf::from(format!("/sys/fs/cgroup{path}")),
            })
        })
        .collect()
}

fn files_owned_by(dir: &Path, uid: u32, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.uid() == uid {
            out.push(p.clone());
        }
        if meta.is_dir() {
            files_owned_by(&p, uid, out);
        }
    }
}

#[test]
fn kilnd_jails_its_microvms_they_outlive_a_kill_9_and_leave_no_jail_behind() {
    let mut d = kilnd();
    let (code, health, err) = kiln(&d, &["doctor", "--json"]);
    assert_eq!(code, 0, "{health}{err}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["jail"]["ok"], true, "{health}");
    assert_eq!(health["netBackend"]["ok"], true, "{health}");
    let kilnd_jail = &health["daemon"]["health"]["jail"];
    assert_eq!(kilnd_jail["uidRange"], "1900000000-1900065535", "{health}");
    assert!(
        kilnd_jail["cgroups"].as_array().unwrap().len() >= 3,
        "{kilnd_jail}"
    );

    let client = client(&d);
    let image = client
        .build_image("jailed", &context(), Default::default())
        .unwrap()
        .image_identifier;
    wait_image(&client, &image);
    let run = || {
        let (code, id, err) = kiln(&d, &["run", "jailed", "--wait"]);
        assert_eq!(code, 0, "{err}");
        id.trim().to_string()
    };
    let (kept, lost) = (run(), run());
    let jails = |id: &str| {
        let pid_file = d.home.path().join("microvms").join(id).join("qemu.pid");
        let read =
            |p: &Path| -> u32 { std::fs::read_to_string(p).unwrap().trim().parse().unwrap() };
        let (pid, net_pid) = (read(&pid_file), read(&pid_file.with_file_name("net.pid")));
        let uid = uid_of(pid).expect("QEMU runs");
        assert!(
            uid >= kiln_jail::UID_BASE,
            "QEMU runs as a jail uid, not {uid}"
        );
        let net_uid = uid_of(net_pid).expect("the network backend runs");
        assert!(
            net_uid >= kiln_jail::UID_BASE && net_uid != uid,
            "the network backend has a jail uid of its own, not {net_uid}"
        );
        let mut cgroups = cgroup_dirs(pid);
        assert!(cgroups.len() >= 3, "{cgroups:?}");
        let net_cgroups = cgroup_dirs(net_pid);
        assert!(net_cgroups.len() >= 3, "{net_cgroups:?}");
        cgroups.extend(net_cgroups);
        ((pid, uid), (net_pid, net_uid), cgroups)
    };
    let (kept_qemu, kept_net, kept_cgroups) = jails(&kept);
    let (lost_qemu, lost_net, lost_cgroups) = jails(&lost);
    let (code, out, err) = kiln(&d, &["exec", &kept, "--", "echo", "jailed"]);
    assert_eq!((code, out.as_str()), (0, "jailed\n"), "{err}");

    // kill -9 of kilnd: both jails keep running. One QEMU then dies while kilnd is down.
    d.kill_hard();
    std::thread::sleep(Duration::from_millis(500));
    for (pid, uid) in [kept_qemu, kept_net, lost_qemu, lost_net] {
        assert_eq!(
            uid_of(pid),
            Some(uid),
            "a jail did not outlive kilnd's kill -9"
        );
    }
    kill(lost_qemu.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while uid_of(lost_qemu.0).is_some() || uid_of(lost_net.0).is_some() {
        assert!(
            Instant::now() < deadline,
            "QEMU or its network backend outlived its kill"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    d.start_again(&[]);
    // The one left running is taken back, in the same jails.
    let vm = client_json(&d, &kept);
    assert_eq!(vm["state"], "RUNNING", "{vm}");
    let (code, out, err) = kiln(&d, &["exec", &kept, "--", "echo", "adopted"]);
    assert_eq!((code, out.as_str()), (0, "adopted\n"), "{err}");
    assert_eq!(uid_of(kept_qemu.0), Some(kept_qemu.1));
    assert_eq!(uid_of(kept_net.0), Some(kept_net.1));
    // The one whose QEMU died is TERMINATED, and nothing of its jails is left.
    let vm = client_json(&d, &lost);
    assert_eq!(vm["state"], "TERMINATED", "{vm}");
    assert_jails_gone(&d, &lost_cgroups, &[lost_qemu.1, lost_net.1]);

    // Terminating the adopted one releases its jails like any other's.
    let (code, _, err) = kiln(&d, &["terminate", &kept]);
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while uid_of(kept_qemu.0).is_some() || uid_of(kept_net.0).is_some() {
        assert!(
            Instant::now() < deadline,
            "the adopted jails outlived terminate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while kept_cgroups.iter().any(|c| c.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_jails_gone(&d, &kept_cgroups, &[kept_qemu.1, kept_net.1]);
}

fn kill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn client_json(d: &common::Daemon, id: &str) -> serde_json::Value {
    let (code, out, err) = kiln(d, &["get", id, "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// No cgroup of these jails and no file of these uids is left. Any kilnd that starts on this
/// machine sweeps cgroups of free uid slots (tests run side by side), so some may have gone
/// before this kilnd looked; what must hold is that none is left now.
fn assert_jails_gone(d: &common::Daemon, cgroups: &[PathBuf], uids: &[u32]) {
    let left: Vec<_> = cgroups.iter().filter(|c| c.exists()).collect();
    assert!(left.is_empty(), "cgroups of a dead jail survived: {left:?}");
    let mut left = Vec::new();
    for uid in uids {
        files_owned_by(d.home.path(), *uid, &mut left);
    }
    assert!(left.is_empty(), "files of the dead jails' uids: {left:?}");
}

/// CPU-seconds a process's cgroup used so far (cpuacct on v1, cpu.stat on v2), read the way
/// an operator would, from the process's own /proc entry.
fn cgroup_cpu_seconds(pid: u32) -> f64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if list.split(',').any(|c| c == "cpuacct") {
            let file = format!("/sys/fs/cgroup/cpuacct{path}/cpuacct.usage");
            let ns: f64 = std::fs::read_to_string(file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            return ns / 1e9;
        }
        if list.is_empty() {
            let file = format!("/sys/fs/cgroup{path}/cpu.stat");
            if let Ok(stat) = std::fs::read_to_string(file) {
                let usec: f64 = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                return usec / 1e6;
            }
        }
    }
    panic!("no CPU accounting cgroup for {pid}: {own}")
}

/// CPUs used over `window`, from the cgroup.
fn cpu_rate(pid: u32, window: Duration) -> f64 {
    let (t0, c0) = (Instant::now(), cgroup_cpu_seconds(pid));
    std::thread::sleep(window);
    (cgroup_cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64()
}

#[test]
fn a_cpu_hog_bursts_while_it_has_credit_then_is_held_to_its_baseline() {
    // 1.5 CPU-seconds of credit: a hog bursting at 4 x 0.1 CPU spends it in 5 s.
    let d = common::kilnd_with(&["--cpu-credit-max-seconds", "1.5", "--tick-ms", "200"]);
    let client = client(&d);
    let req = kiln_client::api::CreateImageRequest {
        cpu_baseline: Some(0.1),
        ..Default::default()
    };
    let img = client.build_image("burst", &context(), req).unwrap();
    let v = wait_image(&client, &img.image_identifier);
    assert_eq!(
        (v["cpuBaseline"].as_f64(), v["vcpus"].as_u64()),
        (Some(0.1), Some(1)),
        "{v}"
    );
    let (code, id, err) = kiln(&d, &["run", "burst", "--wait"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    let pid: u32 =
        std::fs::read_to_string(d.home.path().join("microvms").join(&id).join("qemu.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let (code, _, err) = kiln(
        &d,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "(while :; do :; done) >/dev/null 2>&1 </dev/null &",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let bursting = cpu_rate(pid, Duration::from_millis(1500));
    assert!(
        bursting > 0.2,
        "with credit it uses clearly more than its 0.1 baseline: {bursting}"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vm = client.raw_get(&format!("/v1/microvms/{id}")).unwrap();
        if vm["usage"]["cpuCreditSeconds"].as_f64() == Some(0.0) {
            assert!(
                vm["usage"]["cpuSecondsAboveBaseline"].as_f64().unwrap() > 1.0,
                "{vm}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the credit was never spent: {vm}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(400));
    let held = cpu_rate(pid, Duration::from_secs(3));
    assert!(
        held <= 0.13,
        "spent, it is held to its 0.1 baseline: {held}"
    );

    let addr = std::fs::read_to_string(d.home.path().join("kilnd.addr")).unwrap();
    let key = std::fs::read_to_string(d.home.path().join("api-key")).unwrap();
    let metrics = {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(addr.trim()).unwrap();
        write!(
            conn,
            "GET /metrics HTTP/1.0\r\nAuthorization: Bearer {}\r\n\r\n",
            key.trim()
        )
        .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    };
    assert!(
        metrics.contains(&format!(
            "kiln_microvm_burst_cpu_seconds_total{{microvm=\"{id}\""
        )),
        "{metrics}"
    );
    let (code, _, err) = kiln(&d, &["terminate", &id]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_microvm_over_its_memory_limit_is_terminated_alone_with_the_reason() {
    // A limit below the guest's 512 MiB: filling the guest's RAM goes over.
    let d = common::kilnd_with(&["--jail-memory-mib", "300"]);
    let client = client(&d);
    let image = client
        .build_image("oom", &context(), Default::default())
        .unwrap()
        .image_identifier;
    wait_image(&client, &image);
    let run = |name: &str| {
        let (code, id, err) = kiln(&d, &["run", "oom", "--wait"]);
        assert_eq!(code, 0, "{name}: {err}");
        id.trim().to_string()
    };
    let (victim, bystander) = (run("victim"), run("bystander"));
    let _ = kiln(
        &d,
        &[
            "exec",
            &victim,
            "--",
            "sh",
            "-c",
            "mount -o remount,size=480m /dev/shm && dd if=/dev/zero of=/dev/shm/fill bs=1M count=400",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let vm = loop {
        let vm = client.raw_get(&format!("/v1/microvms/{victim}")).unwrap();
        if vm["state"] == "TERMINATED" {
            break vm;
        }
        assert!(Instant::now() < deadline, "never terminated: {vm}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let reason = vm["stateReason"].as_str().unwrap_or_default();
    assert!(reason.contains("out of memory"), "{reason}");
    assert!(reason.contains("console tail"), "{reason}");
    let (code, out, err) = kiln(&d, &["exec", &bystander, "--", "echo", "unharmed"]);
    assert_eq!((code, out.as_str()), (0, "unharmed\n"), "{err}");
    assert_eq!(
        client
            .raw_get(&format!("/v1/microvms/{bystander}"))
            .unwrap()["state"],
        "RUNNING"
    );
}
