//! QEMUs started ahead of their launch (`Template::prestart`) on real, jailed guests: a
//! launch from one gives the guest state a launch without one gives; one dropped or made
//! stale never launches and leaves nothing behind.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use kiln_testkit::{assets, id, machine, TestTemplate, TestVm, BOOT_TIMEOUT};
use kiln_vmm::{NetworkAttachment, PrestartConfig, Template};

/// Memory-only state (the kernel boot id, made at its first read; a tmpfs file, a shell variable's loop), a process with a known pid,
/// a disk file: what a template holds and every clone must start from.
const PREPARE: &str = "cat /proc/sys/kernel/random/boot_id > /dev/null; echo baked > /baked.txt; mkdir -p /run/m && echo in-ram > /run/m/v; \
    (sleep 100000 & echo $! > /run/m/sleeper) ; \
    (i=0; while true; do i=$((i+1)); echo $i > /run/m/n.new; mv /run/m/n.new /run/m/n; sleep 0.1; done) >/dev/null 2>&1 &";

/// What must be equal in two clones of one template, whichever way they were launched.
const STATE: &str = "cat /baked.txt /run/m/v; p=$(cat /run/m/sleeper); \
    tr '\\0' ' ' < /proc/$p/cmdline; echo; cat /proc/sys/kernel/random/boot_id; \
    grep MemTotal /proc/meminfo; ls /sys/class/net | sort | tr '\\n' ' '";

fn prestart_config(tpl: &TestTemplate, name: &str) -> PrestartConfig {
    PrestartConfig {
        id: id(name),
        dir: tpl.scratch.path().join(name),
        assets: assets(),
        timeout: BOOT_TIMEOUT,
        die_with_parent: true,
        confinement: kiln_vmm::Confinement::default(),
    }
}

async fn count(vm: &TestVm) -> u64 {
    vm.ok("cat /run/m/n").await.trim().parse().unwrap()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

async fn gone(pid: u32) -> bool {
    for _ in 0..100 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn launch_prestarted(template: &Template, pre: kiln_vmm::Prestarted) -> TestVm {
    TestVm::wrap(
        template
            .launch_prestarted(pre, NetworkAttachment::closed(), None)
            .await
            .expect("launch from a pre-started QEMU"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_from_a_prestarted_qemu_gives_the_same_guest_state() {
    let mut m = machine();
    m.network = true;
    let tpl = TestTemplate::build_on(m, PREPARE).await;

    let fresh = tpl.launch("fresh").await;
    let pre = tpl
        .template
        .prestart(prestart_config(&tpl, "pre"))
        .await
        .unwrap();
    assert_eq!(pre.id().as_str(), "pre");
    assert!(pre.is_current());
    let qemu_pid = pre.record().unwrap().pid;
    assert!(
        pre.record().unwrap().jail.is_some(),
        "a pre-started QEMU is jailed"
    );
    // It waits long enough that a launch from it could not have started its QEMU.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pooled = launch_prestarted(&tpl.template, pre).await;
    assert_eq!(
        pooled.qemu_pid(),
        qemu_pid,
        "the pre-started QEMU runs the guest"
    );
    assert!(
        pooled.net_pid().is_some(),
        "its network backend started at the launch"
    );

    let (a, b) = (fresh.ok(STATE).await, pooled.ok(STATE).await);
    assert!(a.starts_with("baked\nin-ram\nsleep 100000 \n"), "{a}");
    assert!(a.contains("eth0"), "{a}");
    assert_eq!(
        a, b,
        "a launch from a pre-started QEMU restores the same state"
    );
    // Both run on from the template's count, and diverge (own entropy, own generation).
    for vm in [&fresh, &pooled] {
        let before = count(vm).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(count(vm).await > before, "the counter runs on");
    }
    let random = "head -c 32 /dev/urandom | od -An -tx1";
    assert_ne!(fresh.ok(random).await, pooled.ok(random).await);
    let genid = "cat /run/kiln/vmgenid";
    assert_ne!(fresh.ok(genid).await, pooled.ok(genid).await);
    let dir = pooled.dir().to_path_buf();
    pooled.destroy().await;
    fresh.destroy().await;
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prestarted_qemu_dropped_or_made_stale_never_launches_and_leaves_nothing() {
    let tpl = TestTemplate::build("").await;

    // Dropped: its QEMU is killed and its directory removed.
    let pre = tpl
        .template
        .prestart(prestart_config(&tpl, "dropped"))
        .await
        .unwrap();
    let (pid, dir) = (
        pre.record().unwrap().pid,
        tpl.scratch.path().join("dropped"),
    );
    assert!(alive(pid) && dir.is_dir());
    drop(pre);
    assert!(gone(pid).await, "a dropped pre-started QEMU is killed");
    assert!(!dir.exists());

    // Discarded: the same, awaited.
    let pre = tpl
        .template
        .prestart(prestart_config(&tpl, "discarded"))
        .await
        .unwrap();
    let pid = pre.record().unwrap().pid;
    pre.discard().await;
    assert!(!alive(pid) && !tpl.scratch.path().join("discarded").exists());

    // The template's state file replaced (here: touched) after the prestart: refused.
    let pre = tpl
        .template
        .prestart(prestart_config(&tpl, "stale"))
        .await
        .unwrap();
    let pid = pre.record().unwrap().pid;
    let state = tpl.template.dir().join("device.state");
    let file = std::fs::File::options().append(true).open(&state).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    assert!(!pre.is_current(), "a touched template makes it stale");
    let err = tpl
        .template
        .launch_prestarted(pre, NetworkAttachment::closed(), None)
        .await
        .unwrap_err();
    assert!(
        kiln_vmm::error_chain(&err).contains("template changed"),
        "{err}"
    );
    assert!(gone(pid).await && !tpl.scratch.path().join("stale").exists());

    // Another template's pre-started QEMU is refused by this one.
    let other = TestTemplate::build("echo other > /other.txt").await;
    let pre = other
        .template
        .prestart(prestart_config(&other, "foreign"))
        .await
        .unwrap();
    let err = tpl
        .template
        .launch_prestarted(pre, NetworkAttachment::closed(), None)
        .await
        .unwrap_err();
    assert!(
        kiln_vmm::error_chain(&err).contains("cannot launch"),
        "{err}"
    );

    // Fresh launches still work from the touched template (its checksum holds).
    let vm = tpl.launch("after").await;
    vm.ok("true").await;
    vm.destroy().await;
}
