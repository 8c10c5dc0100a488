//! Fork on real guests: clones carry the parent's memory, processes and disk, then diverge.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kiln_testkit::{id, TestTemplate, TestVm};
use kiln_vmm::ForkTarget;

const COUNTER: &str = "mkdir -p /run/c && (i=0; while true; do i=$((i+1)); echo $i > /run/c/n.new; mv /run/c/n.new /run/c/n; sleep 0.1; done) >/dev/null 2>&1 &";

async fn count(vm: &TestVm) -> u64 {
    vm.ok("cat /run/c/n").await.trim().parse().expect("counter")
}

async fn assert_counting(vm: &TestVm) {
    let before = count(vm).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(count(vm).await > before, "counter stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_have_the_parents_state_then_diverge_with_their_own_identity() {
    let tpl = TestTemplate::build("").await;
    let mut parent = tpl.launch("parent").await;
    parent.ok(COUNTER).await;
    // State only the running parent has: a file on disk, one in memory, a shell variable
    // held by a live process.
    parent
        .ok("echo on-disk > /state.txt; sync; echo in-memory > /dev/shm/mem.txt")
        .await;
    let parent_gen = parent.ok("cat /run/kiln/vmgenid").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_fork = count(&parent).await;

    let targets: Vec<ForkTarget> = (0..3)
        .map(|i| ForkTarget {
            id: id(&format!("clone-{i}")),
            dir: tpl.scratch.path().join(format!("clone-{i}")),
        })
        .collect();
    let suspended = parent.fork(&targets).await.expect("fork");
    assert_eq!(suspended.len(), 3);
    // The parent runs on, with a new session (and so a new generation: it is one of four).
    assert_counting(&parent).await;
    assert_eq!(parent.ok("cat /state.txt").await, "on-disk\n");
    assert_ne!(parent.ok("cat /run/kiln/vmgenid").await, parent_gen);

    let mut clones = Vec::new();
    for s in suspended {
        assert!(s.manifest().memory_diff.is_some(), "clones are diffs");
        clones.push(TestVm::wrap(
            s.resume(Duration::from_secs(120))
                .await
                .expect("clone resumes"),
        ));
    }
    let mut randoms = Vec::new();
    let mut gens = vec![parent.ok("cat /run/kiln/vmgenid").await];
    for (i, c) in clones.iter().enumerate() {
        assert_eq!(c.ok("cat /state.txt").await, "on-disk\n");
        assert_eq!(c.ok("cat /dev/shm/mem.txt").await, "in-memory\n");
        // The parent's counting process goes on in the clone from where it was.
        let n = count(c).await;
        assert!(
            n >= at_fork,
            "clone {i} counter {n} < {at_fork} at the fork"
        );
        assert_counting(c).await;
        c.ok(&format!("echo clone-{i} > /state.txt; sync")).await;
        randoms.push(c.ok("head -c 32 /dev/urandom | od -An -tx1").await);
        gens.push(c.ok("cat /run/kiln/vmgenid").await);
    }
    for (i, c) in clones.iter().enumerate() {
        assert_eq!(
            c.ok("cat /state.txt").await,
            format!("clone-{i}\n"),
            "diverged"
        );
    }
    assert_eq!(
        parent.ok("cat /state.txt").await,
        "on-disk\n",
        "the parent's disk is its own"
    );
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), 3, "each clone reads its own random bytes");
    gens.sort();
    gens.dedup();
    assert_eq!(gens.len(), 4, "parent and clones each have a generation ID");

    // A clone forks too (its memory is the template plus its own diff).
    let mut first = clones.remove(0);
    let grand = first
        .fork(&[ForkTarget {
            id: id("grandchild"),
            dir: tpl.scratch.path().join("grandchild"),
        }])
        .await
        .expect("a clone forks");
    let grand = TestVm::wrap(
        grand
            .into_iter()
            .next()
            .unwrap()
            .resume(Duration::from_secs(120))
            .await
            .unwrap(),
    );
    assert_eq!(grand.ok("cat /state.txt").await, "clone-0\n");

    // What cannot be forked says why, and leaves the parent running.
    let err = parent.fork(&[]).await.expect_err("zero clones").to_string();
    assert!(err.contains("1 to 100"), "{err}");
    let taken = tpl.scratch.path().join("clone-1");
    let err = parent
        .fork(&[ForkTarget {
            id: id("again"),
            dir: taken.clone(),
        }])
        .await
        .expect_err("a directory in use")
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_counting(&parent).await;
    assert!(
        !tpl.scratch.path().join("parent").join("fork").exists(),
        "no work files left"
    );

    for vm in clones.into_iter().chain([grand, first, parent]) {
        vm.destroy().await;
    }
}
