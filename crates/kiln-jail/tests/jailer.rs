//! The `kiln-jailer` binary on its own: a program it starts runs unprivileged, in namespaces
//! of its own, seeing only what its spec lists; a bad spec is refused with the stage named.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use kiln_jail::{JailSpec, Limits, ERROR_PREFIX, READY_PREFIX};

fn run(spec: &JailSpec) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-jailer"))
        .args(["--spec", &serde_json::to_string(spec).unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spec(dir: &std::path::Path, script: &str) -> JailSpec {
    JailSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        owned_dirs: vec![dir.join("vm")],
        read_only: vec![dir.join("shared.txt")],
        devices: vec![],
        limits: Limits::new(128 << 20, 32, 0.5),
        die_with_parent: true,
        host_network: false,
        keep_fds: 0,
        partition: kiln_jail::Partition::default(),
    }
}

/// Two kilnds on one machine (cluster nodes) tell their jails their own uids and cgroup
/// root: the program runs with one of those uids, in a cgroup under that root.
#[test]
fn a_partition_gives_the_jail_its_uid_range_and_cgroup_root() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("vm")).unwrap();
    std::fs::write(dir.path().join("shared.txt"), "shared\n").unwrap();
    let first = kiln_jail::UID_BASE + 20_000;
    let mut s = spec(dir.path(), "id -u");
    s.partition = kiln_jail::Partition::new(
        Some(&format!("{first}-{}", first + 9)),
        Some("kiln-partition-test"),
    )
    .unwrap();
    let (code, out, err) = run(&s);
    assert_eq!(code, 0, "{out}{err}");
    let report = kiln_jail::parse_first_line(err.lines().next().unwrap()).unwrap();
    assert!((first..first + 10).contains(&report.uid), "{report:?}");
    assert_eq!(out.trim(), report.uid.to_string());
    let dir = &report.cgroups.memory.dir;
    assert_eq!(
        dir.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str()),
        Some("kiln-partition-test"),
        "{dir:?}"
    );
    report.cgroups.remove().unwrap();
}

#[test]
fn a_program_runs_unprivileged_seeing_only_its_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("vm")).unwrap();
    std::fs::write(dir.path().join("shared.txt"), "shared\n").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "secret\n").unwrap();
    let d = dir.path().display();
    let script = format!(
        "id -u; grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; echo pid=$$; \
         cat {d}/shared.txt; test -e {d}/secret.txt && echo SECRET-VISIBLE; \
         echo x > {d}/shared.txt 2>/dev/null && echo SHARED-WRITABLE; \
         echo mine > {d}/vm/own.txt && echo wrote; ls /sys 2>/dev/null | head -1; hostname"
    );
    let (code, out, err) = run(&spec(dir.path(), &script));
    assert_eq!(code, 0, "{out}{err}");
    let first = err.lines().next().unwrap();
    assert!(first.starts_with(READY_PREFIX), "{err}");
    let report = kiln_jail::parse_first_line(first).unwrap();
    assert!(report.uid >= kiln_jail::UID_BASE);
    assert_eq!(
        out.lines().next(),
        Some(report.uid.to_string().as_str()),
        "{out}"
    );
    assert!(
        out.contains("NoNewPrivs:\t1") && out.contains("CapEff:\t0000000000000000"),
        "{out}"
    );
    assert!(out.contains("pid=1"), "PID 1 of its own namespace: {out}");
    assert!(out.contains("shared\n") && out.contains("wrote\n"), "{out}");
    assert!(
        !out.contains("SECRET-VISIBLE") && !out.contains("SHARED-WRITABLE"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("kiln"), "its own hostname: {out}");
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata(dir.path().join("vm/own.txt")).unwrap();
    assert_eq!(own.uid(), report.uid, "what it writes is its uid's");
    // The jailer's cgroups are the caller's to remove once it ended.
    report.cgroups.remove().unwrap();
}

/// A network backend's jail: the host's network namespace, its link passed as descriptor 3
/// (and nothing else), every other namespace its own.
#[test]
fn a_helper_keeps_the_host_network_and_only_the_descriptors_it_is_given() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("vm")).unwrap();
    std::fs::write(dir.path().join("shared.txt"), "shared\n").unwrap();
    let script = "readlink /proc/self/ns/net; readlink /proc/self/ns/mnt; \
                  ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; \
                  echo hello-from-jail >&3";
    let mut spec = spec(dir.path(), script);
    spec.host_network = true;
    spec.keep_fds = 1;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-jailer"));
    cmd.args(["--spec", &serde_json::to_string(&spec).unwrap()]);
    kiln_jail::pass_fds(&mut cmd, vec![theirs.into()]).unwrap();
    let out = cmd.output().unwrap();
    drop(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    let report = kiln_jail::parse_first_line(stderr.lines().next().unwrap()).unwrap();
    report.cgroups.remove().unwrap();
    let mut lines = stdout.lines();
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    let host_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_eq!(
        lines.next(),
        host_net.to_str(),
        "the host's network namespace"
    );
    assert_ne!(
        lines.next(),
        host_mnt.to_str(),
        "a mount namespace of its own"
    );
    // 0-2, the passed link as 3, and the directory `ls` itself reads.
    assert_eq!(lines.next(), Some("0 1 2 3 4 "), "{stdout}");
    let mut got = String::new();
    let mut ours = ours;
    ours.flush().unwrap();
    ours.read_to_string(&mut got).unwrap();
    assert_eq!(
        got, "hello-from-jail\n",
        "the link works and closes with the program"
    );
}

#[test]
fn a_bad_spec_is_refused_naming_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = spec(dir.path(), "true");
    bad.read_only.push("relative/path".into());
    let (code, _, err) = run(&bad);
    assert_eq!(code, 125);
    assert!(
        err.starts_with(&format!("{ERROR_PREFIX}spec: jail path relative/path")),
        "{err}"
    );
    let (code, _, err) = {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln-jailer"))
            .arg("--nonsense")
            .output()
            .unwrap();
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(125));
    assert!(err.contains("usage: kiln-jailer --spec JSON"), "{err}");
}
