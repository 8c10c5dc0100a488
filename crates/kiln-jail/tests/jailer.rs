//! The `kiln-jailer` binary on its own: a program it starts runs unprivileged, in namespaces
//! of its own, seeing only what its spec lists; a bad spec is refused with the stage named.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use kiln_jail::{JailSpec, Limits, ERROR_PREFIX, READY_PREFIX};

fn run(spec: &JailSpec) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-jailer"))
        .args(["--spec", &serde_json::to_string(spec).unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spec(dir: &std::path::Path, script: &str) -> JailSpec {
    JailSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        owned_dirs: vec![dir.join("vm")],
        read_only: vec![dir.join("shared.txt")],
        devices: vec![],
        limits: Limits::new(128 << 20, 32, 0.5),
        die_with_parent: true,
    }
}

#[test]
fn a_program_runs_unprivileged_seeing_only_its_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("vm")).unwrap();
    std::fs::write(dir.path().join("shared.txt"), "shared\n").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "secret\n").unwrap();
    let d = dir.path().display();
    let script = format!(
        "id -u; grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; echo pid=$$; \
         cat {d}/shared.txt; test -e {d}/secret.txt && echo SECRET-VISIBLE; \
         echo x > {d}/shared.txt 2>/dev/null && echo SHARED-WRITABLE; \
         echo mine > {d}/vm/own.txt && echo wrote; ls /sys 2>/dev/null | head -1; hostname"
    );
    let (code, out, err) = run(&spec(dir.path(), &script));
    assert_eq!(code, 0, "{out}{err}");
    let first = err.lines().next().unwrap();
    assert!(first.starts_with(READY_PREFIX), "{err}");
    let report = kiln_jail::parse_first_line(first).unwrap();
    assert!(report.uid >= kiln_jail::UID_BASE);
    assert_eq!(
        out.lines().next(),
        Some(report.uid.to_string().as_str()),
        "{out}"
    );
    assert!(
        out.contains("NoNewPrivs:\t1") && out.contains("CapEff:\t0000000000000000"),
        "{out}"
    );
    assert!(out.contains("pid=1"), "PID 1 of its own namespace: {out}");
    assert!(out.contains("shared\n") && out.contains("wrote\n"), "{out}");
    assert!(
        !out.contains("SECRET-VISIBLE") && !out.contains("SHARED-WRITABLE"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("kiln"), "its own hostname: {out}");
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata(dir.path().join("vm/own.txt")).unwrap();
    assert_eq!(own.uid(), report.uid, "what it writes is its uid's");
    // The jailer's cgroups are the caller's to remove once it ended.
    report.cgroups.remove().unwrap();
}

#[test]
fn a_bad_spec_is_refused_naming_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = spec(dir.path(), "true");
    bad.read_only.push("relative/path".into());
    let (code, _, err) = run(&bad);
    assert_eq!(code, 125);
    assert!(
        err.starts_with(&format!("{ERROR_PREFIX}spec: jail path relative/path")),
        "{err}"
    );
    let (code, _, err) = {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln-jailer"))
            .arg("--nonsense")
            .output()
            .unwrap();
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(125));
    assert!(err.contains("usage: kiln-jailer --spec JSON"), "{err}");
}
