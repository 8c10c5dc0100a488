//! Exec through the agent on a real guest: output, exit codes, stdin, env, cwd, user, large
//! output, concurrency, timeouts, and a stream the host never reads.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_proto::{ErrorKind, ExecRequest, ProcessSpec};
use kiln_testkit::TestVm;
use kiln_vmm::agent::{AgentError, ExecEvent};
use kiln_vmm::VmError;

fn spec(argv: &[&str]) -> ProcessSpec {
    ProcessSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        process: spec(argv),
        stdin: false,
        timeout_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_processes_with_their_io_and_limits() {
    let vm = TestVm::boot().await;

    // Output and exit codes.
    let out = vm.sh("echo out; echo err >&2; exit 7").await.unwrap();
    assert_eq!(out.stdout_text(), "out\n");
    assert_eq!(out.stderr_text(), "err\n");
    assert_eq!(out.status.code, Some(7));
    assert!(!out.status.success());
    let killed = vm.sh("kill -TERM $$").await.unwrap();
    assert_eq!((killed.status.code, killed.status.signal), (None, Some(15)));

    // The guest is the busybox base, not the host.
    assert!(vm.ok("cat /etc/os-release").await.contains("kiln busybox"));

    // stdin, env, cwd, user.
    let out = vm.exec(req(&["cat"]), Some(b"piped in")).await.unwrap();
    assert_eq!(out.stdout, b"piped in");
    let mut with_env = req(&["sh", "-c", "echo $GREETING; pwd; id -u; id -g"]);
    with_env.process.env = vec![("GREETING".into(), "hello".into())];
    with_env.process.cwd = Some("/tmp".into());
    with_env.process.user = Some("nobody".into());
    let out = vm.exec(with_env, None).await.unwrap();
    assert_eq!(out.stdout_text(), "hello\n/tmp\n65534\n65534\n");

    // Clear errors for what cannot run.
    match vm.exec(req(&["no-such-program"]), None).await {
        Err(VmError::Agent {
            source: AgentError::Guest(e),
            ..
        }) => {
            assert_eq!(e.kind, ErrorKind::NotFound);
            assert!(e.message.contains("no-such-program"), "{e}");
        }
        other => panic!("expected not found, got {other:?}"),
    }
    let mut bad_user = req(&["true"]);
    bad_user.process.user = Some("ghost".into());
    assert!(matches!(
        vm.exec(bad_user, None).await,
        Err(VmError::Agent {
            source: AgentError::Guest(_),
            ..
        })
    ));

    // 10 MB of output arrives intact.
    let out = vm
        .sh("head -c 10485760 /dev/zero | tr '\\0' 'k'")
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 10 * 1024 * 1024);
    assert!(out.stdout.iter().all(|b| *b == b'k'));

    // 8 concurrent execs, each with its own output.
    let runs = (0..8).map(|i| {
        let agent = vm.agent().clone();
        tokio::spawn(async move {
            agent
                .sh(&format!("sleep 0.3; echo run-{i}"))
                .await
                .unwrap()
                .stdout_text()
        })
    });
    let started = Instant::now();
    let outputs: Vec<String> = futures_join(runs.collect()).await;
    for (i, out) in outputs.iter().enumerate() {
        assert_eq!(out, &format!("run-{i}\n"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(8 * 3),
        "execs ran concurrently"
    );

    // A timeout kills the whole process group.
    let mut slow = req(&["sh", "-c", "sleep 1000 & sleep 1000"]);
    slow.timeout_ms = Some(500);
    let out = vm.exec(slow, None).await.unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    const FIND: &str = "ps | grep '[s]leep 1000' || true";
    assert_eq!(
        vm.ok(FIND).await,
        "",
        "children of a timed-out exec are gone"
    );
    // Control: the same probe does see such a process while it runs.
    vm.ok("sleep 1000 >/dev/null 2>&1 &").await;
    assert!(vm.ok(FIND).await.contains("sleep 1000"));
    vm.ok("killall sleep").await;

    // A stream the host never reads stalls only itself: flow control bounds it.
    let agent = vm.agent().clone();
    let mut flood = agent.exec_stream(req(&["yes", "flood"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert_eq!(vm.ok("echo still-fine").await, "still-fine\n");
    }
    flood.signal(9).await.unwrap();
    loop {
        match flood.next().await.unwrap() {
            ExecEvent::Exited(status) => {
                assert_eq!(status.signal, Some(9));
                break;
            }
            ExecEvent::Stdout(_) | ExecEvent::Stderr(_) => {}
        }
    }

    let dir = vm.dir().to_path_buf();
    let pid = vm.qemu_pid();
    vm.destroy().await;
    assert!(!dir.exists(), "VM directory removed");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU is gone"
    );
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
