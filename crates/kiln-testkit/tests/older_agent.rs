//! A newer host serves a guest whose agent speaks an older protocol generation: what an
//! upgrade of kilnd meets in every microVM an older kiln started. The agent acts as one of
//! generation 1 (`kiln.agent_generation=1` on its kernel command line); the host negotiates
//! down, runs what generation 1 has, refuses what it lacks with why, and takes the running
//! guest back the way a restarted kilnd does (leave it running, adopt it from its record),
//! negotiating down again on the new session.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kiln_proto::{ProcessSpec, ShellRequest};
use kiln_testkit::{boot_config, machine, scratch, TestVm};
use kiln_vmm::adopt::AdoptConfig;
use kiln_vmm::Vm;

const COUNTER: &str = "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done) \
                       >/dev/null 2>&1 </dev/null &";

async fn count(vm: &Vm) -> u64 {
    let out = vm.agent().sh("cat /tmp/count").await.unwrap();
    out.stdout_text().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_host_serves_and_takes_back_an_agent_of_an_older_generation() {
    kiln_testkit::init_logging();
    let dir = scratch();
    let cfg = boot_config(dir.path(), "older", machine());
    let (id, vm_dir) = (cfg.id.clone(), cfg.dir.clone());
    let vm = Vm::boot_with_cmdline(cfg, "kiln.agent_generation=1")
        .await
        .unwrap();
    const { assert!(kiln_proto::GENERATION_CURRENT > 1, "the host is newer") };
    assert_eq!(vm.agent().generation(), 1);
    assert_eq!(vm.agent().ping().await.unwrap().generation, 1);

    // Generation 1 has exec; shells came with generation 2 and are refused before the guest.
    let out = vm.agent().sh("echo $((6*7))").await.unwrap();
    assert_eq!(out.stdout_text(), "42\n");
    let shell = vm
        .agent()
        .shell_stream(ShellRequest {
            process: ProcessSpec {
                argv: vec!["/bin/sh".into()],
                ..Default::default()
            },
            cols: 80,
            rows: 24,
        })
        .await;
    let err = shell.err().expect("no shell at generation 1").to_string();
    assert!(err.contains("generation 1; shells need 2"), "{err}");
    let err = vm.agent().detach_nic().await.unwrap_err().to_string();
    assert!(
        err.contains("generation 1; taking the NIC away needs 3"),
        "{err}"
    );
    vm.agent().sh(COUNTER).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = count(&vm).await;

    // What a restarted kilnd does: the old one lets go, the new one takes it back.
    let record = vm.record();
    vm.leave_running();
    let vm = Vm::adopt(AdoptConfig {
        id,
        dir: vm_dir,
        record,
        network: kiln_vmm::NetworkAttachment::closed(),
        confinement: kiln_vmm::Confinement::default(),
        timeout: Duration::from_secs(60),
    })
    .await
    .unwrap();
    let vm = TestVm::wrap(vm);
    assert_eq!(
        vm.agent().generation(),
        1,
        "the new session negotiated down too"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = count(&vm).await;
    assert!(after > before, "the guest ran on: {before} then {after}");
    vm.destroy().await;
}
