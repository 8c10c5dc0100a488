//! Templates, copy-on-write clones, suspend and resume on real guests.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use kiln_testkit::{machine, suspend_resume, TestTemplate, TestVm};
use kiln_vmm::VmError;

/// A shell loop that counts in memory and publishes its count to a tmpfs file.
const COUNTER: &str = "mkdir -p /run/c && (i=0; while true; do i=$((i+1)); echo $i > /run/c/n; sleep 0.1; done) >/dev/null 2>&1 &";

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
    let a = suspend_resume(a).await;
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
    assert!(matches!(err, VmError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("RAM size"), "{err}");
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
