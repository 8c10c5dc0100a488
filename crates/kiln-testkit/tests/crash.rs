//! A QEMU that dies under a VM is reported as a crash with its reason and console.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kiln_testkit::TestVm;
use kiln_vmm::VmError;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_from_outside_is_reported_as_a_crash() {
    let vm = TestVm::boot().await;
    assert!(vm.crash().is_none());
    kill(Pid::from_raw(vm.qemu_pid() as i32), Signal::SIGKILL).unwrap();

    let err = tokio::time::timeout(Duration::from_secs(10), vm.sh("echo unreachable"))
        .await
        .unwrap()
        .unwrap_err();
    match &err {
        VmError::Crashed { exit, console, .. } => {
            assert_eq!(exit.signal, Some(9));
            assert!(
                console.contains("kiln-agent"),
                "console tail is included: {console}"
            );
        }
        other => panic!("expected a crash report, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("crashed") && text.contains("signal 9"),
        "{text}"
    );
    assert!(vm.crash().is_some());

    let dir = vm.dir().to_path_buf();
    vm.destroy().await;
    assert!(!dir.exists());
}
