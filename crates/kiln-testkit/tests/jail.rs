//! Every QEMU in its own jail, read from the outside as an attacker's view would be: its
//! `/proc/<pid>/` entries, its mounts, its cgroups, and what its uid can open.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use kiln_testkit::{TestTemplate, TestVm};
use kiln_vmm::{Confinement, JailLimits};

fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{name} missing from status"))
        .trim()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// Whether `uid` can open `path` for reading, tried by a process running as that uid.
fn can_read_as(uid: u32, path: &Path) -> bool {
    std::process::Command::new("/usr/bin/head")
        .args(["-c", "1"])
        .arg(path)
        .uid(uid)
        .gid(uid)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The options of the mount at `target` in `pid`'s mount namespace.
fn mount_options(pid: u32, target: &Path) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (Path::new(f.get(4)?) == target).then(|| f.get(5).unwrap_or(&"").to_string())
    })
}

/// Whether everything of jail `j` is gone: QEMU, its cgroups. (Its uid may already be
/// another jail's: tests run side by side and the lowest free uid is taken first.)
fn jail_gone(j: &kiln_jail::JailReport) -> bool {
    let c = &j.cgroups;
    let qemu_alive = std::fs::read_to_string(format!("/proc/{}/status", j.pid))
        .map(|s| field(&s, "Uid").split_whitespace().next() == Some(&j.uid.to_string()))
        .unwrap_or(false);
    !qemu_alive
        && [&c.memory, &c.pids, &c.cpu, &c.cpuacct]
            .iter()
            .all(|d| !d.dir.exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_qemu_is_unprivileged_and_sees_only_its_own_files() {
    let tpl = TestTemplate::build("").await;
    let secret = tpl.scratch.path().join("api-key");
    std::fs::write(&secret, "not for guests\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let a = tpl.launch("jail-a").await;
    let b = tpl.launch("jail-b").await;
    let (ja, jb) = (a.jail().unwrap().clone(), b.jail().unwrap().clone());
    assert_ne!(ja.uid, jb.uid, "two microVMs never share a uid");

    let pid = a.qemu_pid();
    let st = status(pid);
    for id in field(&st, "Uid")
        .split_whitespace()
        .chain(field(&st, "Gid").split_whitespace())
    {
        assert_eq!(
            id,
            ja.uid.to_string(),
            "every uid and gid is the jail's: {st}"
        );
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    assert_eq!(field(&st, "Seccomp"), "2", "QEMU's seccomp filter is on");
    assert_eq!(field(&st, "CapEff"), "0000000000000000");
    assert_eq!(field(&st, "CapPrm"), "0000000000000000");
    assert_eq!(field(&st, "CapBnd"), "0000000000000000");
    assert!(
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .unwrap()
            .ends_with("qemu-system-x86_64"),
        "the jailed process is QEMU itself"
    );
    for kind in ["mnt", "pid", "ipc", "uts", "net", "cgroup"] {
        assert_ne!(
            ns(&pid.to_string(), kind),
            ns("self", kind),
            "{kind} namespace"
        );
    }
    assert_ne!(
        ns(&pid.to_string(), "mnt"),
        ns(&b.qemu_pid().to_string(), "mnt")
    );
    // Inherited descriptors: only what QEMU opened itself (no kilnd socket or lock file).
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().contains("uids.lock"),
            "QEMU holds the jail's lock file"
        );
    }

    // Its root: the system's programs, its own directory, the template files read-only.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    assert!(inside(a.dir()).join("disk.qcow2").is_file());
    assert!(
        !inside(&secret).exists(),
        "other files of the home are not in the jail"
    );
    assert!(
        !inside(b.dir()).exists(),
        "another VM's directory is not in the jail"
    );
    let template_ram = tpl.template.dir().join("memory.ram");
    assert!(inside(&template_ram).is_file());
    let opts = mount_options(pid, &template_ram).expect("the template RAM is a mount");
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "template RAM mounted {opts}"
    );
    let meta = std::fs::metadata(&template_ram).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o444));
    assert_eq!(
        std::fs::metadata(a.dir()).unwrap().uid(),
        ja.uid,
        "its directory is its own"
    );

    // What its uid can open on the host: not the home's secrets, not another VM's files.
    assert!(!can_read_as(ja.uid, &secret));
    assert!(!can_read_as(ja.uid, &b.dir().join("disk.qcow2")));
    assert!(
        can_read_as(jb.uid, &b.dir().join("disk.qcow2")),
        "the check can succeed"
    );

    // Its cgroups carry the limits.
    let cg = &ja.cgroups;
    assert_eq!(
        cg.memory_limit(),
        Some((512 + kiln_vmm::confine::QEMU_OVERHEAD_MIB) << 20)
    );
    assert_eq!(cg.pids_limit(), Some(kiln_vmm::confine::PIDS_LIMIT));
    assert_eq!(
        cg.cpu_quota_us(),
        Some(100_000),
        "one vCPU: one CPU of quota"
    );
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(own.contains(&format!("kiln/vm-{}", ja.uid)), "{own}");
    assert!(
        cg.cpu_seconds().unwrap() > 0.0,
        "CPU use is read from the cgroup"
    );

    // Exec, suspend and resume all work jailed.
    assert_eq!(a.ok("echo jailed").await, "jailed\n");
    let a = kiln_testkit::suspend_resume(a).await;
    assert_eq!(a.ok("echo resumed").await, "resumed\n");
    a.destroy().await;
    b.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_behind_after_terminate_or_suspend() {
    let tpl = TestTemplate::build("").await;
    let vm = tpl.launch("leave-none").await;
    let j = vm.jail().unwrap().clone();
    assert!(
        !kiln_jail::uids::is_free(j.uid),
        "a running jail holds its uid"
    );
    assert!(!jail_gone(&j));
    let dir = vm.dir().to_path_buf();
    let suspended = vm.into_inner().suspend().await.unwrap();
    // Suspended: no process, no cgroup, every file root's again.
    assert!(jail_gone(&j));
    for entry in walk(&dir) {
        let uid = std::fs::symlink_metadata(&entry).unwrap().uid();
        assert_eq!(uid, 0, "{} still belongs to uid {uid}", entry.display());
    }
    let vm = TestVm::wrap(suspended.resume(kiln_testkit::BOOT_TIMEOUT).await.unwrap());
    let j2 = vm.jail().unwrap().clone();
    vm.destroy().await;
    assert!(jail_gone(&j2));
    assert!(!dir.exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_memory_limit_a_qemu_is_killed_alone_and_reported() {
    let tpl = TestTemplate::build("").await;
    let bystander = tpl.launch("oom-bystander").await;
    let mut cfg = tpl.launch_config("oom-victim");
    cfg.confinement = Confinement::Jailed(JailLimits {
        memory_mib: Some(256),
        ..Default::default()
    });
    let victim = TestVm::wrap(tpl.template.launch(cfg).await.expect("launch"));
    assert_eq!(
        victim.jail().unwrap().cgroups.memory_limit(),
        Some(256 << 20)
    );
    // 400 MiB into the guest's RAM-backed /dev/shm: QEMU's memory grows past its limit.
    let _ = victim
        .sh("mount -o remount,size=480m /dev/shm && dd if=/dev/zero of=/dev/shm/fill bs=1M count=400")
        .await;
    let jail = victim.jail().unwrap().clone();
    let crash = victim.wait_crash().await.to_string();
    assert!(crash.contains("out of memory"), "{crash}");
    assert!(
        crash.contains("console tail"),
        "the report carries the console: {crash}"
    );
    assert!(jail_gone(&jail), "a crashed QEMU leaves nothing either");
    assert_eq!(bystander.ok("echo still here").await, "still here\n");
    bystander.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unjailed_qemu_runs_as_the_caller_for_development() {
    let tpl = TestTemplate::build("").await;
    let mut cfg = tpl.launch_config("no-jail");
    cfg.confinement = Confinement::Unjailed;
    let vm = TestVm::wrap(tpl.template.launch(cfg).await.expect("launch"));
    assert!(vm.jail().is_none());
    let st = status(vm.qemu_pid());
    assert_eq!(field(&st, "Uid").split_whitespace().next(), Some("0"));
    assert_eq!(ns(&vm.qemu_pid().to_string(), "mnt"), ns("self", "mnt"));
    assert_eq!(vm.ok("echo ok").await, "ok\n");
    vm.destroy().await;
}

/// The network backend of a microVM: its own uid (not QEMU's), no privileges, kiln's
/// seccomp filter, new mount/PID/IPC/UTS namespaces but the host's network namespace, a
/// root without the home, its own cgroups; gone with the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_backend_is_jailed_apart_from_qemu_in_the_host_network() {
    let scratch = kiln_testkit::scratch();
    let secret = scratch.path().join("api-key");
    std::fs::write(&secret, "not for guests\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    use kiln_vmm::kiln_net::{Connector, EgressPolicy, HostFacts, OperatorConfig};
    let connectors: Vec<Connector> = serde_json::from_value(serde_json::json!([
        {"type": "allowlist", "destinations": [{"name": "pinned.kiln.test", "ports": [80]}]}
    ]))
    .unwrap();
    let operator = OperatorConfig {
        static_hosts: [(
            "pinned.kiln.test".to_string(),
            vec!["192.0.2.7".parse().unwrap()],
        )]
        .into(),
        ..OperatorConfig::default()
    };
    let policy = EgressPolicy::compile(&connectors, &operator, HostFacts::read()).unwrap();
    let network = kiln_vmm::NetworkAttachment::egress(policy);
    let vm = TestVm::boot_with_network(kiln_testkit::machine(), network).await;
    let (qemu, net) = (vm.jail().unwrap().clone(), vm.net_jail().unwrap().clone());
    assert_eq!(vm.net_pid(), Some(net.pid));
    assert_ne!(net.uid, qemu.uid, "the backend's uid is not QEMU's");
    assert!(net.uid >= kiln_jail::UID_BASE);
    let st = status(net.pid);
    assert_eq!(
        field(&st, "Uid").split_whitespace().next(),
        Some(net.uid.to_string().as_str()),
        "{st}"
    );
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    assert_eq!(field(&st, "Seccomp"), "2", "kiln's filter is on");
    assert_eq!(field(&st, "CapEff"), "0000000000000000");
    assert!(std::fs::read_link(format!("/proc/{}/exe", net.pid))
        .unwrap()
        .ends_with("kiln-net-backend"));
    let pid = net.pid.to_string();
    assert_eq!(ns(&pid, "net"), ns("self", "net"), "the host's network");
    for kind in ["mnt", "pid", "ipc", "uts", "cgroup"] {
        assert_ne!(ns(&pid, kind), ns("self", kind), "{kind} namespace");
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(
        !root.join(vm.dir().strip_prefix("/").unwrap()).exists(),
        "no VM files"
    );
    assert!(!root.join(secret.strip_prefix("/").unwrap()).exists());
    assert!(
        root.join("etc/resolv.conf").is_file(),
        "the resolver's files"
    );
    assert!(!can_read_as(net.uid, &secret));
    assert!(!can_read_as(net.uid, &vm.dir().join("disk.qcow2")));
    // Only its link beyond standard I/O: no kilnd socket, no lock file, no QMP.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_link(e.path())
                .unwrap_or_default()
                .display()
                .to_string()
        })
        .collect();
    assert!(
        fds.iter()
            .all(|t| !t.contains("uids.lock") && !t.contains(".sock")),
        "{fds:?}"
    );
    assert_eq!(
        net.cgroups.memory_limit(),
        Some(kiln_vmm::netproc::NET_MEMORY_MIB << 20)
    );
    assert!(net.cgroups.pids_limit().is_some());
    // It works: the guest's resolver is the backend.
    let out = vm.sh("nslookup pinned.kiln.test 10.0.2.3").await.unwrap();
    assert!(
        out.stdout_text().contains("192.0.2.7"),
        "{}",
        out.stdout_text()
    );
    vm.destroy().await;
    assert!(
        jail_gone(&net),
        "the backend and its cgroups end with the VM"
    );
    assert!(jail_gone(&qemu));
}

/// The same jail on a host whose memory, pids and CPU controllers are on cgroup v2: these
/// hosts mount them under v1, so the jailer runs inside a guest (its own kernel) that mounts
/// only the unified hierarchy. It must find v2 for every controller, enable them down the
/// tree, write `memory.max`, `pids.max` and `cpu.max`, run the program inside, and the
/// kernel must enforce the memory limit (an allocation over it is OOM-killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cgroup_v2_host_the_jail_uses_v2_for_every_controller() {
    let vm = TestVm::boot().await;
    // The jailer and the libraries it links, at the host's paths.
    let jailer = kiln_jail::jailer_path().unwrap();
    let mut files = vec![jailer.clone()];
    let ldd = std::process::Command::new("ldd")
        .arg(&jailer)
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        files.extend(path);
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        vm.agent()
            .put_file(f.to_str().unwrap(), &bytes, 0o755)
            .await
            .unwrap_or_else(|e| panic!("copying {} into the guest: {e}", f.display()));
    }
    let setup = vm
        .sh(
            "mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup; \
             cat /proc/self/cgroup; cat /sys/fs/cgroup/cgroup.controllers; mkdir -p /tmp/v2vm",
        )
        .await
        .unwrap();
    let text = setup.stdout_text();
    assert!(text.starts_with("0::/\n"), "the guest is v2-only: {text}");
    for c in ["memory", "pids", "cpu"] {
        assert!(text.contains(c), "the guest's v2 hierarchy has {c}: {text}");
    }
    let spec = kiln_jail::JailSpec {
        program: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "id -u; awk 'BEGIN { s = sprintf(\"%100000000s\", \"\"); print \"survived\", length(s) }'"
                .into(),
        ],
        owned_dirs: vec!["/tmp/v2vm".into()],
        read_only: Vec::new(),
        devices: Vec::new(),
        limits: kiln_jail::Limits::new(48 << 20, 16, 0.5),
        die_with_parent: true,
        host_network: false,
        keep_fds: 0,
        partition: kiln_jail::Partition::default(),
    };
    let json = serde_json::to_string(&spec).unwrap().replace('\'', "'\\''");
    let run = vm
        .sh(&format!(
            "{} --spec '{json}' 2>/tmp/jailer.err; echo exit=$?; head -1 /tmp/jailer.err",
            jailer.display()
        ))
        .await
        .unwrap();
    let out = run.stdout_text();
    let report_line = out.lines().last().unwrap_or_default();
    let report = kiln_jail::parse_first_line(report_line)
        .unwrap_or_else(|e| panic!("{e}: {out}{}", run.stderr_text()));
    let c = &report.cgroups;
    assert!(
        [&c.memory, &c.pids, &c.cpu, &c.cpuacct]
            .iter()
            .all(|h| h.v2 && h.dir == c.memory.dir),
        "one v2 directory for every controller: {c:?}"
    );
    assert!(out.starts_with(&format!("{}\n", report.uid)), "{out}");
    assert!(
        !out.contains("survived"),
        "over its memory limit it is killed: {out}"
    );
    assert!(
        out.contains("exit=137"),
        "the jailer ends as the program did: {out}"
    );
    let dir = c.memory.dir.display();
    let limits = vm
        .sh(&format!(
            "cat {dir}/memory.max {dir}/pids.max {dir}/cpu.max; \
             grep -E '^oom_kill ' {dir}/memory.events; \
             cat {dir}/../cgroup.subtree_control; rmdir {dir} && echo removed"
        ))
        .await
        .unwrap()
        .stdout_text();
    let mut lines = limits.lines();
    assert_eq!(
        lines.next(),
        Some((48u64 << 20).to_string().as_str()),
        "{limits}"
    );
    assert_eq!(lines.next(), Some("16"), "{limits}");
    assert_eq!(lines.next(), Some("50000 100000"), "{limits}");
    let ooms: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ooms >= 1, "the kernel counted the OOM kill: {limits}");
    let enabled = lines.next().unwrap_or_default();
    for ctl in ["memory", "pids", "cpu"] {
        assert!(enabled.contains(ctl), "{ctl} enabled for jails: {limits}");
    }
    assert_eq!(lines.next(), Some("removed"), "{limits}");
    vm.destroy().await;
}
