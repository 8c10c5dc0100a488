//! ForkMicrovm through the real API: a RUNNING microVM is copied into clones that run on
//! from its memory (a file and a counting process), each with its own generation ID, under
//! the microVM quota; bad requests are refused with what to do; and kilnd killed at each
//! step of a fork leaves the parent running and every clone TERMINATED with a reason
//! (it never ran) or SUSPENDED and resumable, with nothing left over.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::steps::{
    assert_counts_on, assert_no_strays, count, counting, die_at, sh, state, terminate,
};
use common::{hook_image, ReportServer, TestDaemon};
use serde_json::{json, Value};

const GENID: &str = "cat /run/kiln/vmgenid";

fn fork(d: &TestDaemon, id: &str, count: u64) -> (u16, Value) {
    d.post(
        &format!("/v1/microvms/{id}/fork"),
        json!({ "count": count }),
    )
}

fn ids(v: &Value) -> Vec<String> {
    v["microvms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["microvmId"].as_str().unwrap().to_string())
        .collect()
}

/// Every microVM id the daemon lists.
fn all_ids(d: &TestDaemon) -> HashSet<String> {
    ids(&d.get("/v1/microvms").1).into_iter().collect()
}

#[test]
fn a_fork_runs_on_from_the_parent_and_a_crash_at_any_step_loses_nothing() {
    let report = ReportServer::start();
    let mut d = TestDaemon::start_with(&["--max-microvms", "4"]);
    hook_image(&d, &report);
    let (parent, _) = counting(&d);
    sh(&d, &parent, "echo from-the-parent > /root/note");

    // Bad requests say what was wrong.
    for (n, want) in [
        (0, "count must be 1 to 100"),
        (101, "count must be 1 to 100"),
    ] {
        let (status, v) = fork(&d, &parent, n);
        assert_eq!(status, 400, "{v}");
        assert!(v["message"].as_str().unwrap().contains(want), "{v}");
    }
    assert_eq!(fork(&d, "mvm-0000000000000000", 1).0, 404);
    // Parent + 3 clones would pass --max-microvms 4 only with a fourth.
    let (status, v) = fork(&d, &parent, 4);
    assert_eq!(status, 429, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("max-microvms"),
        "{v}"
    );

    // Two clones: each runs on from the parent's memory and disk, with its own identity.
    let at_fork = count(&d, &parent);
    let (status, v) = fork(&d, &parent, 2);
    assert_eq!(status, 200, "{v}\n{}", d.log());
    assert_eq!(v["parentMicrovmId"], parent.as_str());
    let clones = ids(&v);
    assert_eq!(clones.len(), 2);
    let mut genids = HashSet::from([sh(&d, &parent, GENID)]);
    for c in &clones {
        let view = d.wait_state(c, "RUNNING", Duration::from_secs(120));
        assert!(
            view["stateReason"]
                .as_str()
                .unwrap()
                .contains(&format!("forked from {parent}"))
                || view["stateReason"].as_str().unwrap().contains("resum"),
            "{view}"
        );
        assert_eq!(sh(&d, c, "cat /root/note").trim(), "from-the-parent");
        assert_counts_on(&d, c, at_fork);
        genids.insert(sh(&d, c, GENID));
    }
    assert_eq!(
        genids.len(),
        3,
        "each of parent and clones its own ID: {genids:?}"
    );
    // They diverge: a file in one clone is not in the other nor in the parent.
    sh(&d, &clones[0], "echo mine > /root/only-here");
    for other in [&clones[1], &parent] {
        assert_eq!(
            sh(&d, other, "cat /root/only-here 2>/dev/null || echo none").trim(),
            "none"
        );
    }
    assert_counts_on(&d, &parent, at_fork);
    // A suspended microVM is not forked.
    let (status, v) = d.post(&format!("/v1/microvms/{}/suspend", clones[1]), json!({}));
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("SUSPENDED")),
        "{v}"
    );
    let (status, v) = fork(&d, &clones[1], 1);
    assert_eq!(status, 409, "{v}");
    for c in &clones {
        terminate(&d, c);
    }
    assert_no_strays(&d);

    // Killed before the clones are recorded SUSPENDED: they never ran, the parent runs on.
    for step in ["fork.paused", "fork.written"] {
        let before = all_ids(&d);
        let from = count(&d, &parent);
        die_at(&mut d, step, |d| {
            d.try_post(&format!("/v1/microvms/{parent}/fork"), json!({"count": 1}));
        });
        assert_eq!(
            state(&d, &parent)["state"],
            "RUNNING",
            "{step}\n{}",
            d.log()
        );
        assert_counts_on(&d, &parent, from);
        let new: Vec<String> = all_ids(&d).difference(&before).cloned().collect();
        assert_eq!(new.len(), 1, "{step}: one clone recorded: {new:?}");
        let v = state(&d, &new[0]);
        assert_eq!(v["state"], "TERMINATED", "{step}: {v}");
        assert!(
            v["stateReason"].as_str().unwrap().contains("fork again"),
            "{step}: {v}"
        );
        assert!(
            !d.home.join("microvms").join(&parent).join("fork").exists(),
            "{step}: the fork's work directory is removed"
        );
        assert_no_strays(&d);
    }

    // Killed once recorded: the clone is SUSPENDED and resumes with the parent's state.
    let before = all_ids(&d);
    let from = count(&d, &parent);
    die_at(&mut d, "fork.recorded", |d| {
        d.try_post(&format!("/v1/microvms/{parent}/fork"), json!({"count": 1}));
    });
    let new: Vec<String> = all_ids(&d).difference(&before).cloned().collect();
    assert_eq!(new.len(), 1, "one clone recorded: {new:?}");
    let clone = &new[0];
    assert_eq!(state(&d, clone)["state"], "SUSPENDED", "{}", d.log());
    assert_no_strays(&d);
    let (status, v) = d.post(&format!("/v1/microvms/{clone}/resume"), json!({}));
    assert_eq!((status, v["state"].as_str()), (200, Some("RUNNING")), "{v}");
    assert_eq!(sh(&d, clone, "cat /root/note").trim(), "from-the-parent");
    assert_counts_on(&d, clone, from);
    assert_counts_on(&d, &parent, from);
    terminate(&d, clone);
    terminate(&d, &parent);
    assert_no_strays(&d);
}
