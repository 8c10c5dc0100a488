//! The `kiln` CLI against a real kilnd: run, list, get, exec, token, suspend, resume,
//! terminate, events, with text and JSON output and exit codes scripts can rely on.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{context, kiln, kilnd};

#[test]
fn the_cli_drives_microvms_through_the_api() {
    let d = kilnd();
    std::env::set_var("KILN_HOME", d.home.path());
    let client = kiln_client::Client::from_env(None, None).unwrap();
    let image = client
        .build_image("cli", &context(), Default::default())
        .unwrap()
        .image_identifier;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = client.raw_get(&format!("/v1/images/{image}")).unwrap();
        if v["status"] == "SUCCESSFUL" {
            break;
        }
        assert!(v["status"] != "FAILED" && Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A microVM through its whole life from the CLI.
    let (code, id, err) = kiln(&d, &["run", "cli", "--wait", "--label", "task=t-1"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    // Labels: listed, filtered on the server, changed and removed.
    let (code, listed, err) = kiln(&d, &["ls", "--label", "task=t-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        listed.contains(&id) && listed.contains("task=t-1"),
        "{listed}"
    );
    let (_, none, _) = kiln(&d, &["ls", "--label", "task=t-2", "--output", "json"]);
    let none: serde_json::Value = serde_json::from_str(&none).unwrap();
    assert_eq!(none["microvms"], serde_json::json!([]), "{none}");
    let (code, _, err) = kiln(&d, &["label", &id, "owner=cli", "task-"]);
    assert_eq!(code, 0, "{err}");
    let (_, shown, _) = kiln(&d, &["get", &id, "--output", "json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&shown).unwrap()["labels"],
        serde_json::json!({"owner": "cli"})
    );
    // Nodes: without a cluster, this kilnd alone, reachable, with its one microVM.
    let (code, out, err) = kiln(&d, &["node", "ls", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1, "{nodes}");
    assert_eq!(nodes["nodes"][0]["name"], nodes["thisNode"]);
    assert_eq!(nodes["nodes"][0]["reachable"], true);
    assert_eq!(nodes["nodes"][0]["microvms"], 1);
    assert!(nodes["nodes"][0]["capacity"]["memoryMib"].as_u64().unwrap() > 0);
    let (code, table, err) = kiln(&d, &["node", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("(this)") && table.contains("reachable"),
        "{table}"
    );
    // Draining is for a cluster: a single kilnd says so, and is not marked.
    let this = nodes["thisNode"].as_str().unwrap();
    let (code, _, err) = kiln(&d, &["node", "drain", this]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("draining is for a cluster"), "{err}");
    let (code, _, err) = kiln(&d, &["node", "remove", this]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("no node to remove"), "{err}");
    let (_, out, _) = kiln(&d, &["node", "ls", "--output", "json"]);
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["nodes"][0]["draining"], false, "{again}");
    // Webhooks from the CLI: a loopback target is refused (this kilnd has no
    // --allow-private-webhook-targets), with the reason; the list stays empty.
    let (code, _, err) = kiln(&d, &["webhook", "create", "http://127.0.0.1:9/in"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--allow-private-webhook-targets"), "{err}");
    let (code, out, err) = kiln(&d, &["webhook", "ls", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["webhooks"],
        serde_json::json!([])
    );
    let (code, _, err) = kiln(&d, &["label", &id, "bad key=x"]);
    assert_eq!(code, 2, "a usage error: {err}");
    assert!(err.contains("label key"), "{err}");
    let (code, out, _) = kiln(
        &d,
        &["exec", &id, "--", "sh", "-c", "echo from-guest; exit 7"],
    );
    assert_eq!(
        (code, out.as_str()),
        (7, "from-guest\n"),
        "exit codes pass through"
    );
    cli_files(&d, &id);
    cli_processes(&d, &id);
    // The app's output, as the guest keeps it.
    let (code, logs, err) = kiln(&d, &["logs", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(logs.contains("app-started-42"), "{logs}");
    let (code, token, _) = kiln(&d, &["token", &id, "--port", "8080", "--minutes", "2"]);
    assert_eq!(code, 0);
    assert_eq!(token.trim().split('.').count(), 5, "a compact JWE: {token}");
    let (code, token, _) = kiln(&d, &["token", "create", &id, "--port", "8080"]);
    assert_eq!((code, token.trim().split('.').count()), (0, 5), "{token}");
    let (_, shown, _) = kiln(&d, &["get", &id, "--output", "json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&shown).unwrap()["state"],
        "RUNNING"
    );
    assert_eq!(kiln(&d, &["suspend", &id]).0, 0);
    assert_eq!(kiln(&d, &["suspend", &id]).0, 4, "conflict");
    assert_eq!(kiln(&d, &["resume", &id]).0, 0);
    // An interactive shell through the ingress, here with piped input.
    let mut shell = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["shell", &id])
        .env("KILN_HOME", d.home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        shell.stdin.as_mut().unwrap(),
        b"echo shell-$((2+3)); exit 4\n",
    )
    .unwrap();
    let out = shell.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("shell-5"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(4), "the shell's exit code");
    let (code, gone, _) = kiln(&d, &["terminate", &id]);
    assert_eq!(code, 0);
    assert!(gone.contains("TERMINATED"), "{gone}");

    // A failing /run: `kiln run --wait` reports TERMINATED with the reason and exits 1.
    let (code, out, _) = kiln(
        &d,
        &[
            "run",
            "cli",
            "--payload",
            "please-fail",
            "--wait",
            "--output",
            "json",
        ],
    );
    let failed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (code, failed["state"].as_str()),
        (1, Some("TERMINATED")),
        "{out}"
    );
    assert!(
        failed["stateReason"]
            .as_str()
            .unwrap()
            .contains("run hook failed"),
        "{out}"
    );

    // Egress connectors: `none` leaves the guest without a network interface; a connector
    // kilnd does not know is a validation error (exit 2).
    let (code, closed, err) = kiln(
        &d,
        &[
            "run",
            "cli",
            "--connectors",
            r#"[{"type":"none"}]"#,
            "--wait",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, nics, _) = kiln(&d, &["exec", closed.trim(), "--", "ls", "/sys/class/net"]);
    assert_eq!((code, nics.trim()), (0, "lo"));
    assert_eq!(kiln(&d, &["terminate", closed.trim()]).0, 0);
    let (code, _, err) = kiln(&d, &["run", "cli", "--connectors", r#"[{"type":"vpc"}]"#]);
    assert_eq!(code, 2, "{err}");

    // Exit codes for errors.
    assert_eq!(kiln(&d, &["get", "mvm-0000000000000000"]).0, 3, "not found");
    let (code, _, err) = kiln(&d, &["run", "cli", "--idle-seconds", "1"]);
    assert_eq!(code, 2, "validation: {err}");
    assert!(err.contains("maxIdleDurationSeconds"), "{err}");
    let (code, _, err) = kiln(&d, &["list", "--api-key", "bad"]);
    assert_eq!(code, 5, "auth: {err}");
    let (code, _, err) = kiln(&d, &["list", "--endpoint", "http://127.0.0.1:9"]);
    assert_eq!(code, 6, "unreachable: {err}");

    // Tables and events.
    let (code, table, _) = kiln(&d, &["list"]);
    assert_eq!(code, 0);
    assert!(
        table.starts_with("MICROVM") && table.contains("TERMINATED"),
        "{table}"
    );
    let (code, events, _) = kiln(&d, &["events"]);
    assert_eq!(code, 0);
    assert!(
        events.contains("PENDING") && events.contains("TERMINATED"),
        "{events}"
    );
}

/// `kiln cp` both ways (a file, a directory as tar), `kiln ls ID:/path`, `kiln fs …`.
fn cli_processes(d: &common::Daemon, id: &str) {
    let (code, out, err) = kiln(
        d,
        &[
            "proc",
            "start",
            id,
            "--shell",
            "echo out; echo err >&2; exit 4",
        ],
    );
    assert_eq!((code, out.as_str()), (4, "out\n"), "{err}");
    assert!(err.contains("err"), "{err}");
    let (code, out, err) = common::kiln_stdin(
        d,
        &[
            "proc",
            "start",
            id,
            "-i",
            "--",
            "sh",
            "-c",
            "read a; echo got:$a",
        ],
        b"hi\n",
    );
    assert_eq!((code, out.as_str()), (0, "got:hi\n"), "{err}");
    let (code, pid, err) = kiln(
        d,
        &[
            "proc", "start", id, "-d", "--tag", "cli", "--", "sleep", "300",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let pid = pid.trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "{pid}");
    let (code, ls, err) = kiln(d, &["proc", "ls", id, "--running", "--tag", "cli"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert!(ls.contains(&pid) && ls.contains("sleep 300"), "{ls}");
    let (code, _, err) = kiln(d, &["proc", "kill", id, &pid, "-s", "KILL"]);
    assert_eq!(code, 0, "{err}");
    let (code, waited, err) = kiln(d, &["proc", "wait", id, &pid]);
    assert_eq!(code, 128 + 9, "{err}");
    assert!(waited.contains("signal 9"), "{waited}");
    let (code, _, err) = kiln(d, &["proc", "resize", id, "999999", "80x24"]);
    assert_eq!(code, 3, "an unknown pid: {err}");
    let (code, _, err) = kiln(d, &["proc", "resize", id, &pid, "80"]);
    assert_eq!(code, 2, "{err}");
}

fn cli_files(d: &common::Daemon, id: &str) {
    let local = tempfile::tempdir().unwrap();
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha").unwrap();
    std::fs::write(tree.join("sub/b.txt"), "beta").unwrap();
    let remote = |p: &str| format!("{id}:{p}");
    let (code, _, err) = kiln(d, &["cp", tree.to_str().unwrap(), &remote("/tmp/clitree")]);
    assert_eq!(code, 0, "{err}");
    let single = local.path().join("single.txt");
    std::fs::write(&single, "one file").unwrap();
    let (code, out, err) = kiln(
        d,
        &["cp", single.to_str().unwrap(), &remote("/tmp/clitree/")],
    );
    assert_eq!((code, out.trim()), (0, "/tmp/clitree/single.txt"), "{err}");
    let (code, ls, err) = kiln(d, &["ls", &remote("/tmp/clitree")]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), 3, "{ls}");
    assert!(
        lines[0].ends_with(" a.txt") && lines[2].starts_with('d') && lines[2].ends_with(" sub"),
        "{ls}"
    );
    let (_, cat, _) = kiln(d, &["fs", "cat", &remote("/tmp/clitree/sub/b.txt")]);
    assert_eq!(cat, "beta");
    let back = local.path().join("back");
    let (code, _, err) = kiln(d, &["cp", &remote("/tmp/clitree"), back.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(back.join("sub/b.txt")).unwrap(),
        "beta"
    );
    assert_eq!(
        std::fs::read_to_string(back.join("single.txt")).unwrap(),
        "one file"
    );
    let (code, _, err) = kiln(
        d,
        &[
            "cp",
            &remote("/tmp/clitree/a.txt"),
            local.path().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(local.path().join("a.txt")).unwrap(),
        "alpha"
    );
    let (code, _, err) = kiln(
        d,
        &[
            "fs",
            "mv",
            &remote("/tmp/clitree/a.txt"),
            "/tmp/clitree/c.txt",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        kiln(d, &["fs", "stat", &remote("/tmp/clitree/a.txt")]).0,
        3,
        "not found"
    );
    let (code, _, err) = kiln(d, &["fs", "rm", &remote("/tmp/clitree")]);
    assert_eq!(code, 4, "not empty is a conflict: {err}");
    let mut watch = cli_watch(d, &remote("/tmp/clitree/sub"));
    assert_eq!(kiln(d, &["fs", "rm", "-r", &remote("/tmp/clitree")]).0, 0);
    watch.ends_by_itself();
    let (code, _, err) = kiln(d, &["cp", "here", "there"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("MICROVM_ID:/path"), "{err}");
}

/// A running `kiln fs watch` that has seen a file made in the directory.
struct CliWatch {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

fn cli_watch(d: &common::Daemon, target: &str) -> CliWatch {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["fs", "watch", target])
        .env("KILN_HOME", d.home.path())
        .env_remove("KILN_ENDPOINT")
        .env_remove("KILN_API_KEY")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        out.lines()
            .map_while(Result::ok)
            .for_each(|l| drop(tx.send(l)))
    });
    let (id, dir) = target.split_once(':').unwrap();
    // The watch starts some time after the command does: make files until one is seen.
    for n in 0..30 {
        let touch = format!("touch {dir}/w{n}");
        assert_eq!(kiln(d, &["proc", "start", id, "--shell", &touch]).0, 0);
        if let Ok(line) = lines.recv_timeout(Duration::from_secs(1)) {
            assert!(line.starts_with(&format!("create {dir}/w")), "{line}");
            return CliWatch { child, lines };
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("kiln fs watch printed nothing in 30 s");
}

impl CliWatch {
    /// The watched directory went away: the command ends, with success.
    fn ends_by_itself(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                let rest: Vec<String> = self.lines.try_iter().collect();
                assert!(status.success(), "{status}; it printed {rest:?}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("kiln fs watch went on after its directory was removed");
    }
}

/// `kiln image create|list|get|logs|delete` through kilnd: a directory context with a build
/// arg and the streamed progress, a failing build (exit 1, reason and log tail, JSON
/// record), following the log of a running build, and deleting.
#[test]
fn image_commands_build_follow_and_delete_through_the_api() {
    let d = kilnd();
    let ctx = d.home.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let mut archive = tar::Archive::new(std::io::Cursor::new(context()));
    archive.unpack(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nARG GREETING=unset\nCOPY start.sh hook.sh /srv/\n\
         RUN echo greeting=$GREETING\nCMD [\"/srv/start.sh\"]\n",
    )
    .unwrap();
    let ctx = ctx.to_str().unwrap();

    let (code, out, err) = kiln(
        &d,
        &[
            "image",
            "create",
            "hello",
            ctx,
            "--build-arg",
            "GREETING=hi-there",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("Step 1/") && err.contains("greeting=hi-there"),
        "the build log streams with the build arg applied: {err}"
    );
    assert!(
        out.contains("hello-") && out.contains("SUCCESSFUL"),
        "{out}"
    );
    let built = out.split_whitespace().nth(1).unwrap().to_string();

    // A failing build: exit 1, the reason and the log tail on stderr, the JSON record.
    let bad = d.home.path().join("bad.tar");
    let mut b = tar::Builder::new(Vec::new());
    let text = b"FROM busybox\nRUN echo about-to-fail; exit 5\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(text.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "Dockerfile", &text[..]).unwrap();
    std::fs::write(&bad, b.into_inner().unwrap()).unwrap();
    let (code, out, err) = kiln(
        &d,
        &[
            "image",
            "create",
            "broken",
            bad.to_str().unwrap(),
            "--quiet",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(!err.contains("Building broken as"), "--quiet: {err}");
    assert!(err.contains("exit code 5"), "the reason: {err}");
    assert!(err.contains("about-to-fail"), "the log tail: {err}");
    let failed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(failed["status"], "FAILED", "{out}");
    let failed_id = failed["imageIdentifier"].as_str().unwrap().to_string();

    // Not a build context.
    let (code, _, err) = kiln(&d, &["image", "create", "x", "/etc/hostname"]);
    assert_eq!(code, 2, "{err}");

    // A build followed from another command while it runs.
    std::fs::write(
        Path::new(ctx).join("Dockerfile"),
        "FROM busybox\nRUN sleep 3; echo slow-step-done\nRUN exit 0\n",
    )
    .unwrap();
    let (code, out, err) = kiln(
        &d,
        &[
            "image",
            "create",
            "slow",
            ctx,
            "--no-wait",
            "--no-wait-ready",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let slow = out.trim().to_string();
    assert!(slow.starts_with("slow-"), "{out}");
    let (code, _, err) = kiln(&d, &["image", "delete", &slow]);
    assert_eq!(code, 4, "a build in progress cannot be deleted: {err}");
    let (code, log, err) = kiln(&d, &["image", "logs", &slow, "-f"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        log.contains("slow-step-done") && log.contains("Step 2/2"),
        "-f follows until the build ends: {log}"
    );
    let (_, shown, _) = kiln(&d, &["image", "get", &slow, "--output", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["status"], "SUCCESSFUL", "{shown}");

    let (code, table, _) = kiln(&d, &["image", "list"]);
    assert_eq!(code, 0);
    assert!(table.starts_with("NAME"), "{table}");
    for needle in [built.as_str(), failed_id.as_str(), slow.as_str(), "FAILED"] {
        assert!(table.contains(needle), "{needle} in {table}");
    }
    let (code, log, _) = kiln(&d, &["image", "logs", "hello"]);
    assert_eq!(code, 0);
    assert!(log.contains("greeting=hi-there"), "{log}");

    assert_eq!(kiln(&d, &["image", "delete", &failed_id]).0, 0);
    assert_eq!(kiln(&d, &["image", "get", &failed_id]).0, 3, "gone");
}

/// `kiln doctor` shows the health of the kilnd it is configured for, and says so when
/// none answers (without failing: the local checks decide).
#[test]
fn doctor_reports_the_daemons_health() {
    let d = kilnd();
    let (code, out, err) = kiln(&d, &["doctor", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let daemon = &report["daemon"];
    assert_eq!(daemon["reachable"], true, "{report}");
    let addr = std::fs::read_to_string(d.home.path().join("kilnd.addr")).unwrap();
    assert_eq!(daemon["endpoint"], format!("http://{}", addr.trim()));
    assert_eq!(daemon["health"]["status"], "ok");
    assert_eq!(
        daemon["health"]["accelerator"], report["accelerator"],
        "kilnd runs on this machine with the same rule"
    );
    assert_eq!(daemon["health"]["devMode"], report["dev_mode"]);

    let (code, text, _) = kiln(&d, &["doctor"]);
    assert_eq!(code, 0);
    assert!(
        text.contains(&format!("ok   kilnd         http://{}", addr.trim())),
        "{text}"
    );
    if report["dev_mode"] == true {
        assert!(text.contains("WARN kilnd"), "{text}");
    }

    let (code, out, _) = kiln(
        &d,
        &["doctor", "--json", "--endpoint", "http://127.0.0.1:9"],
    );
    assert_eq!(code, 0, "an absent daemon is not a local failure");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["daemon"]["reachable"], false, "{report}");
    let (_, text, _) = kiln(&d, &["doctor", "--endpoint", "http://127.0.0.1:9"]);
    assert!(
        text.contains("not answering at http://127.0.0.1:9"),
        "{text}"
    );
}
