//! Templates, copy-on-write clones, suspend and resume on real guests.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use kiln_testkit::{assets, machine, suspend_resume, TestTemplate, TestVm};
use kiln_vmm::GuestAssets;

/// A shell loop that counts in memory and publishes its count to a tmpfs file.
/// The count is written beside the file and renamed over it, so a reader never
/// sees the moment between the shell's truncation and its write (an empty file).
const COUNTER: &str = "mkdir -p /run/c && (i=0; while true; do i=$((i+1)); echo $i > /run/c/n.new; mv /run/c/n.new /run/c/n; sleep 0.1; done) >/dev/null 2>&1 &";

async fn count(vm: &TestVm) -> u64 {
    vm.ok("cat /run/c/n")
        .await
        .trim()
        .parse()
        .expect("counter value")
}

async fn assert_counting(vm: &TestVm) {
    let before = count(vm).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = count(vm).await;
    assert!(after > before, "counter stopped: {before} then {after}");
}

async fn guest_clock_skew(vm: &TestVm) -> i64 {
    let guest: i64 = vm.ok("date +%s").await.trim().parse().unwrap();
    let host = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    (guest - host).abs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_inherit_template_state_then_diverge_and_survive_suspend() {
    let tpl = TestTemplate::build(&format!("echo baked > /baked.txt; {COUNTER}")).await;
    let dir = tpl.template.dir().to_path_buf();
    for f in ["memory.ram", "device.state", "disk.qcow2", "manifest.json"] {
        assert!(dir.join(f).is_file(), "template has {f}");
    }

    let a = tpl.launch("clone-a").await;
    let b = tpl.launch("clone-b").await;

    // The file written before the template is in every clone; the loop kept counting.
    for vm in [&a, &b] {
        assert_eq!(vm.ok("cat /baked.txt").await, "baked\n");
        assert_counting(vm).await;
        assert!(
            guest_clock_skew(vm).await <= 2,
            "clock set from the host after restore"
        );
    }

    // Fresh entropy per clone: the first random bytes read after launch differ.
    let ra = a.ok("head -c 32 /dev/urandom | od -An -tx1").await;
    let rb = b.ok("head -c 32 /dev/urandom | od -An -tx1").await;
    assert_ne!(ra, rb, "clones of one template read the same random bytes");
    // And its own VM generation ID, for apps to reseed what the kernel does not hold.
    let vmgenid = |id: String| {
        let id = id.trim().to_string();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id:?}"
        );
        id
    };
    let (ga, gb) = (
        vmgenid(a.ok("cat /run/kiln/vmgenid").await),
        vmgenid(b.ok("cat /run/kiln/vmgenid").await),
    );
    assert_ne!(ga, gb, "clones of one template share a VM generation ID");

    // Divergence: each clone's writes are its own.
    a.ok("echo from-a > /mine.txt").await;
    b.ok("echo from-b > /mine.txt").await;
    assert_eq!(a.ok("cat /mine.txt").await, "from-a\n");
    assert_eq!(b.ok("cat /mine.txt").await, "from-b\n");
    a.ok("echo only-a > /a-only.txt; sync").await;
    assert!(b.sh("cat /a-only.txt").await.unwrap().status.code != Some(0));

    // Suspend and resume keep memory (the counter), disk, and the agent channel; a stream
    // open across the suspend ends cleanly instead of hanging.
    let before_suspend = count(&a).await;
    let mut open_stream = a
        .agent()
        .exec_stream(kiln_proto::ExecRequest {
            process: kiln_proto::ProcessSpec {
                argv: vec!["sleep".into(), "30".into()],
                ..Default::default()
            },
            stdin: false,
            timeout_ms: None,
        })
        .await
        .unwrap();
    let generations = a.ok("cat /run/kiln/vmgenid-count").await;
    let a = suspend_resume(a).await;
    let after_resume = vmgenid(a.ok("cat /run/kiln/vmgenid").await);
    assert_ne!(after_resume, ga, "a resume is a new VM generation");
    let more: u64 = a
        .ok("cat /run/kiln/vmgenid-count")
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(more > generations.trim().parse::<u64>().unwrap());
    let ended = tokio::time::timeout(Duration::from_secs(5), open_stream.next()).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "old stream ends with an error: {ended:?}"
    );
    assert!(count(&a).await >= before_suspend);
    assert_counting(&a).await;
    assert_eq!(a.ok("cat /mine.txt").await, "from-a\n");
    assert!(guest_clock_skew(&a).await <= 2);
    let info = a.agent().ping().await.unwrap();
    assert!(
        info.sessions >= 3,
        "a new agent session per restore (got {})",
        info.sessions
    );

    // A second suspend/resume cycle works on a resumed VM too.
    let a = suspend_resume(a).await;
    assert_counting(&a).await;

    let (dir_a, dir_b) = (a.dir().to_path_buf(), b.dir().to_path_buf());
    a.destroy().await;
    b.destroy().await;
    assert!(!dir_a.exists() && !dir_b.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_that_cannot_be_honoured_are_refused_clearly() {
    let tpl = TestTemplate::build("").await;

    let mut other = machine();
    other.memory_mib = 1024;
    other.cpu_model = "Skylake-Client-v1".into();
    let mut cfg = tpl.launch_config("mismatch");
    cfg.machine = Some(other);
    let err = tpl
        .template
        .launch(cfg)
        .await
        .expect_err("mismatching launch must be refused")
        .to_string();
    assert!(err.contains("RAM size") && err.contains("1024"), "{err}");
    assert!(
        err.contains("CPU model") && err.contains("Skylake-Client-v1"),
        "{err}"
    );
    assert!(
        !tpl.scratch.path().join("mismatch").exists(),
        "nothing left behind"
    );

    // A tampered manifest (another RAM size) is refused too.
    let manifest_path = tpl.template.dir().join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::write(
        &manifest_path,
        text.replace("\"memory_mib\": 512", "\"memory_mib\": 256"),
    )
    .unwrap();
    let err = tpl
        .template
        .launch(tpl.launch_config("tampered"))
        .await
        .expect_err("tampered manifest");
    // The recorded machine arguments say 512M, the tampered spec 256M: either check names it.
    assert!(err.to_string().contains("256"), "{err}");
    std::fs::write(&manifest_path, text.clone()).unwrap();

    // A template baked by another QEMU (as one from 7.2 before the upgrade) names it.
    let old = text.replace(
        &format!(
            "\"qemu_version\": \"{}\"",
            tpl.template.manifest().qemu_version
        ),
        "\"qemu_version\": \"QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)\"",
    );
    assert_ne!(old, text, "the manifest records the QEMU version");
    std::fs::write(&manifest_path, old).unwrap();
    let err = tpl
        .template
        .launch(tpl.launch_config("old-qemu"))
        .await
        .expect_err("another QEMU")
        .to_string();
    assert!(err.contains("QEMU version: snapshot has 7.2.15"), "{err}");
    std::fs::write(&manifest_path, text).unwrap();

    // A corrupted state file is caught by its checksum.
    let state = tpl.template.dir().join("device.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    let err = tpl
        .template
        .launch(tpl.launch_config("corrupt"))
        .await
        .expect_err("corrupt state")
        .to_string();
    assert!(err.contains("checksum"), "{err}");
}

/// A host whose guest kernel and agent were updated after the image was baked: a copy of
/// the assets with an unbootable kernel, another kernel release and another agent build.
fn updated_host_assets(dir: &std::path::Path) -> GuestAssets {
    let now = assets();
    std::fs::create_dir_all(dir.join("kernel")).unwrap();
    std::fs::write(dir.join("kernel/vmlinuz"), b"not a kernel").unwrap();
    std::fs::write(dir.join("kernel/vmlinux"), b"not a kernel either").unwrap();
    std::fs::write(dir.join("kernel/version"), "6.1.0-99-amd64\n").unwrap();
    std::fs::copy(&now.initramfs, dir.join("initramfs.cpio")).unwrap();
    std::fs::write(dir.join("initramfs.key"), "another-agent-build\n").unwrap();
    GuestAssets::open(dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_and_suspended_vms_keep_their_kernel_across_host_updates() {
    let tpl = TestTemplate::build(COUNTER).await;
    let boot = tpl.template.dir().join("boot");
    let kernel = assets().kernel;
    let kept = boot.join("kernel").join(kernel.file_name().unwrap());
    assert!(kept.is_file() && boot.join("initramfs.cpio").is_file());
    let updated = updated_host_assets(&tpl.scratch.path().join("updated-assets"));
    tpl.template
        .compatibility(&updated)
        .expect("the template boots its own kernel, not the host's new one");

    let mut cfg = tpl.launch_config("after-update");
    cfg.assets = updated.clone();
    let vm = TestVm::wrap(
        tpl.template
            .launch(cfg)
            .await
            .expect("launch after a host update"),
    );
    assert_counting(&vm).await;
    let suspended = vm.into_inner().suspend().await.expect("suspend");
    let dir = suspended.dir().to_path_buf();
    drop(suspended);
    // Re-opened as kilnd does after a restart, with the host's (updated) assets.
    let reopened = kiln_vmm::SuspendedVm::open(
        kiln_testkit::id("after-update"),
        &dir,
        updated,
        true,
        kiln_vmm::Confinement::default(),
    )
    .expect("reopen");
    reopened
        .compatibility()
        .expect("resumes with the kernel it booted");
    let vm = TestVm::wrap(
        reopened
            .resume(Duration::from_secs(120))
            .await
            .expect("resume"),
    );
    assert_counting(&vm).await;
    vm.destroy().await;
}

/// A suspend of a template clone writes its diff, not its RAM; the resume maps the template
/// again, so pages the guest did not write are still shared with a sibling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_writes_the_diff_and_resume_keeps_sharing_the_template() {
    let tpl = TestTemplate::build(COUNTER).await;
    let a = tpl.launch("diff-a").await;
    let b = tpl.launch("diff-b").await;
    // Both clones read their way through the same userland; `a` also writes 16 MiB.
    for vm in [&a, &b] {
        vm.ok("ls -R /bin /etc > /dev/null; cat /bin/busybox > /dev/null")
            .await;
    }
    a.ok("head -c 16777216 /dev/urandom > /dev/shm/blob; sha256sum /dev/shm/blob > /run/c/sum")
        .await;
    let sum = a.ok("sha256sum /dev/shm/blob").await;
    let ram = u64::from(machine().memory_mib) << 20;
    let before = a.ram_usage().expect("a clone maps its template").unwrap();
    assert!(
        before.shared > 0,
        "fresh clones share the template: {before:?}"
    );

    let suspended = a.into_inner().suspend().await.expect("suspend");
    let manifest = suspended.manifest().clone();
    let diff = manifest
        .memory_diff
        .clone()
        .expect("a clone's suspend is a diff");
    let written = manifest.state_bytes + diff.file_bytes;
    assert_eq!(written, suspended.state_bytes());
    // What it wrote is its private set (plus a header, an index and the devices), far from
    // its RAM size: the 16 MiB blob and what the guest touched, nothing else.
    assert!(
        diff.file_bytes <= before.anonymous + 2 * 4096 + diff.private_pages * 4,
        "diff {diff:?} beyond the private set {before:?}"
    );
    assert!(
        diff.data_pages * 4096 >= 16 << 20,
        "the blob is in the diff: {diff:?}"
    );
    assert!(
        written < ram / 8,
        "{written} bytes written for {ram} of RAM"
    );
    assert!(
        !suspended
            .dir()
            .join("suspended")
            .join("memory.ram")
            .exists(),
        "no full RAM file"
    );

    let a = TestVm::wrap(
        suspended
            .resume(Duration::from_secs(120))
            .await
            .expect("resume from the diff"),
    );
    assert_eq!(
        a.ok("sha256sum /dev/shm/blob").await,
        sum,
        "written memory is back"
    );
    assert_counting(&a).await;
    // The resumed guest maps the template again: its untouched pages are the template's
    // file pages, resident and mapped by the sibling too.
    let after = a.ram_usage().expect("resumed on the template").unwrap();
    assert!(
        after.shared >= 4 << 20,
        "a resumed clone shares the template with its sibling: {after:?}"
    );
    assert!(
        after.anonymous <= diff.private_pages * 4096 + (8 << 20),
        "only the diff (and what ran since) is private: {after:?} for {diff:?}"
    );
    // Suspending again writes the same order of bytes: the diff against the template, not
    // everything the last resume loaded.
    let a = suspend_resume(a).await;
    assert_eq!(a.ok("sha256sum /dev/shm/blob").await, sum);
    a.destroy().await;
    b.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_booted_guest_suspends_its_whole_ram_unthrottled_and_resumes() {
    // Its own scratch directory: a TestVm's would go with it at `into_inner`.
    let scratch = kiln_testkit::scratch();
    let cfg = kiln_testkit::boot_config(scratch.path(), "cold", machine());
    let vm = TestVm::wrap(kiln_vmm::Vm::boot(cfg).await.expect("cold boot"));
    vm.ok(&format!("echo cold > /root/f; {COUNTER}")).await;
    assert_counting(&vm).await;
    let suspended = vm.into_inner().suspend().await.expect("full suspend");
    // No template to diff against: the whole migration stream, RAM included.
    assert!(suspended.manifest().memory_diff.is_none());
    assert!(
        suspended.state_bytes() > 4 << 20,
        "the stream holds the guest's RAM: {} bytes",
        suspended.state_bytes()
    );
    let vm = TestVm::wrap(
        suspended
            .resume(Duration::from_secs(120))
            .await
            .expect("resume"),
    );
    assert_eq!(vm.ok("cat /root/f").await.trim(), "cold");
    assert_counting(&vm).await;
    vm.destroy().await;
}
