//! Steps the fault and fork tests share: a counter in the guest, commands through exec,
//! kilnd killed at a named step and started again, and the check that nothing is left over.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use super::TestDaemon;

/// A counter in the guest's memory, published to /tmp/count. Each count is written beside
/// the file and renamed over it, so a reader never sees the file between the shell's
/// truncation and its write (an empty count). It starts at 0 before the script returns, so
/// a read right after it finds a number.
pub const COUNTER: &str =
    "echo 0 > /tmp/count; (i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; \
                       mv /tmp/count.new /tmp/count; sleep 0.1; done) >/dev/null 2>&1 </dev/null &";

pub fn sh(d: &TestDaemon, id: &str, script: &str) -> String {
    let (status, out) = d.post(
        &format!("/v1/microvms/{id}/exec"),
        json!({"command": ["sh", "-c", script]}),
    );
    assert_eq!(status, 200, "{out}\n{}", d.log());
    out["stdout"].as_str().unwrap().to_string()
}

pub fn count(d: &TestDaemon, id: &str) -> u64 {
    sh(d, id, "cat /tmp/count").trim().parse().unwrap()
}

pub fn state(d: &TestDaemon, id: &str) -> Value {
    d.get(&format!("/v1/microvms/{id}")).1
}

/// A RUNNING microVM with a counter running inside; returns it and the count so far.
pub fn counting(d: &TestDaemon) -> (String, u64) {
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "hooks"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    sh(d, &id, COUNTER);
    std::thread::sleep(Duration::from_millis(400));
    let n = count(d, &id);
    assert!(n > 0);
    (id, n)
}

/// Restarts kilnd with the fault armed at `step`, runs `action`, waits for kilnd to die
/// there, and starts it again without the fault.
pub fn die_at(d: &mut TestDaemon, step: &str, action: impl FnOnce(&TestDaemon)) {
    d.sigterm();
    d.spawn_env(&[], &[("KILN_FAULT_AT", step)]);
    action(d);
    d.wait_exit(Duration::from_secs(180));
    assert!(
        d.log().contains(&format!("killing this process at {step}")),
        "kilnd died elsewhere than {step}: {}",
        d.log()
    );
    d.spawn(&[]);
}

/// Nothing is left over: a QEMU per RUNNING microVM, a directory per live one, a report
/// socket per running one.
pub fn assert_no_strays(d: &TestDaemon) {
    let list = d.get("/v1/microvms").1;
    let vms = list["microvms"].as_array().unwrap();
    let with = |states: &[&str]| -> HashSet<String> {
        vms.iter()
            .filter(|v| states.contains(&v["state"].as_str().unwrap()))
            .map(|v| v["microvmId"].as_str().unwrap().to_string())
            .collect()
    };
    let running = with(&["RUNNING"]);
    let live = with(&["RUNNING", "SUSPENDED"]);
    assert_eq!(
        d.qemu_processes().len(),
        running.len(),
        "one QEMU per RUNNING microVM: {list}"
    );
    let names = |dir: &str, suffix: &str| -> HashSet<String> {
        std::fs::read_dir(d.home.join(dir))
            .map(|e| {
                e.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        n.strip_suffix(suffix).map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let dirs = names("microvms", "");
    let live: HashSet<String> = live.into_iter().chain(d.prestarted_ids()).collect();
    assert!(
        dirs.is_subset(&live),
        "stray directories: {dirs:?} of {live:?}"
    );
    let sockets = names("run/net", ".sock");
    assert!(
        sockets.is_subset(&running),
        "stray report sockets: {sockets:?} of {running:?}"
    );
}

pub fn terminate(d: &TestDaemon, id: &str) {
    let (status, v) = d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    assert_eq!(status, 200, "{v}");
}

/// The counter goes on in `id` from at least `from`.
pub fn assert_counts_on(d: &TestDaemon, id: &str, from: u64) {
    let now = count(d, id);
    std::thread::sleep(Duration::from_millis(300));
    let later = count(d, id);
    assert!(
        now >= from && later > now,
        "{id}: the counter goes on from {from}: {now}, then {later}"
    );
}
