//! The `kiln` binary end to end: doctor reports the accelerator rule's choice, and
//! `kiln sandbox` runs a command in a real microVM launched from a cached template.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn kiln(home: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("KILN_HOME", home)
        .env("KILN_ASSETS", kiln_vmm::GuestAssets::default_dir());
    cmd
}

#[test]
fn doctor_reports_the_accelerator_and_dev_mode() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(home.path())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let has_virt = cpuinfo.split_whitespace().any(|f| f == "vmx" || f == "svm");
    if std::env::var_os("KILN_ACCEL").is_none() && !has_virt {
        assert_eq!(report["accelerator"], "tcg", "{report}");
        assert_eq!(report["dev_mode"], true);
        assert!(report["accelerator_reason"]
            .as_str()
            .unwrap()
            .contains("vmx"));
    }
    assert_eq!(report["ready"], true, "{report}");
    // QEMU 10 and its firmware, and what set-up checked after installing.
    let upstream = |v: &serde_json::Value| {
        kiln_vmm::manifest::upstream_version(v.as_str().unwrap()).to_string()
    };
    assert!(upstream(&report["qemu"]).starts_with("10."), "{report}");
    assert_eq!(
        upstream(&report["qemu"]),
        upstream(&report["qemu_img"]),
        "{report}"
    );
    assert!(
        report["firmware"]["bytes"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(report["firmware"]["path"]
        .as_str()
        .unwrap()
        .ends_with("qboot.rom"));
    let checks = report["setup_checks"]
        .as_array()
        .expect("set-up checks recorded");
    for tool in [
        "qemu-system-x86_64",
        "qemu-img",
        "firmware",
        "mke2fs",
        "busybox",
        "cpio",
        "mmdebstrap",
        "dpkg-deb",
        "xz",
        "zstd",
        "ip",
        "python3-venv",
    ] {
        assert!(
            checks.iter().any(|c| c["name"] == tool && c["ok"] == true),
            "{tool} not checked: {report}"
        );
    }
    // A failed check recorded by set-up makes the host not ready, and says which.
    let assets = tempfile::tempdir().unwrap();
    let real = kiln_vmm::GuestAssets::default_dir();
    for f in ["kernel", "initramfs.cpio", "initramfs.key", "bases"] {
        std::os::unix::fs::symlink(real.join(f), assets.path().join(f)).unwrap();
    }
    std::fs::write(
        assets.path().join("host-checks"),
        "ok qemu-img 10.0.2\nfail mmdebstrap not installed -- apt-get install -y mmdebstrap\n",
    )
    .unwrap();
    let broken = kiln(home.path())
        .env("KILN_ASSETS", assets.path())
        .arg("doctor")
        .output()
        .unwrap();
    assert!(!broken.status.success());
    let text = String::from_utf8_lossy(&broken.stdout);
    assert!(
        text.contains("FAIL set-up check  mmdebstrap not installed"),
        "{text}"
    );
    assert!(report["bases"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b == "busybox"));

    let text = kiln(home.path()).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    if report["dev_mode"] == true {
        assert!(text.contains("dev mode: emulation"), "{text}");
    }

    let forced = kiln(home.path())
        .args(["doctor", "--json"])
        .env("KILN_ACCEL", "kvm")
        .output()
        .unwrap();
    let forced: serde_json::Value = serde_json::from_slice(&forced.stdout).unwrap();
    assert_eq!(forced["accelerator"], "kvm");
    assert_eq!(forced["accelerator_reason"], "KILN_ACCEL=kvm");
}

#[test]
fn sandbox_runs_a_command_in_a_microvm_and_reuses_its_template() {
    let home = tempfile::tempdir().unwrap();
    for round in 0..2 {
        let out = kiln(home.path())
            .args([
                "sandbox",
                "--",
                "sh",
                "-c",
                "cat /etc/os-release; echo pid=$$; exit 3",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "round {round}: {stderr}");
        assert!(stdout.contains("kiln busybox"), "{stdout}");
        assert!(stderr.contains("launched from template"), "{stderr}");
    }
    let templates: Vec<_> = std::fs::read_dir(home.path().join("templates"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(
        templates.len(),
        1,
        "the second run reused the first run's template"
    );
    let leftovers: Vec<_> = std::fs::read_dir(home.path().join("run"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        leftovers.is_empty(),
        "sandboxes leave no files: {leftovers:?}"
    );
}

#[test]
fn image_build_streams_its_log_and_an_interrupted_build_is_recovered() {
    use std::io::{BufRead, BufReader};
    let home = tempfile::tempdir().unwrap();
    let ctx = home.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo first > /first\nRUN sleep 600\n",
    )
    .unwrap();

    let mut child = kiln(home.path())
        .args(["image", "local", "build"])
        .arg(&ctx)
        .args(["--name", "slow"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("Step 2/2 : RUN sleep 600");
        seen.push(line);
        if done {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("Step 1/2 : RUN echo first")),
        "progress is streamed: {seen:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let out = kiln(home.path())
        .args(["image", "local", "list", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupted"), "{stderr}");
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(records[0]["status"], "FAILED");
    assert_eq!(records[0]["reason"], "interrupted");
    let build_dir = home
        .path()
        .join("images/slow")
        .join(records[0]["id"].as_str().unwrap());
    let mut left: Vec<String> = std::fs::read_dir(&build_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["build.log", "image.json"]);
    // Only the finished layer of step 1 remains; the unfinished one is gone.
    // Each build writes its layers in a staging directory of its own.
    let layers: Vec<_> = std::fs::read_dir(home.path().join("layers"))
        .unwrap()
        .flatten()
        .filter(|d| d.file_type().unwrap().is_dir() && d.file_name() != "index")
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .collect();
    assert_eq!(layers.len(), 1, "{layers:?}");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&layers[0]).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o444),
        "a finished layer is root's and read-only, whatever uid built it"
    );

    // The next build reuses step 1 and fails clearly on a bad step.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo first > /first\nRUN exit 5\n",
    )
    .unwrap();
    let out = kiln(home.path())
        .args(["image", "local", "build"])
        .arg(&ctx)
        .args(["--name", "slow", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Failed") && stdout.contains("exit code 5"),
        "{stdout}"
    );
}

#[test]
fn completions_name_the_subcommands() {
    let home = tempfile::tempdir().unwrap();
    let out = kiln(home.path())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.contains("complete -F _kiln"),
        "a bash completion script"
    );
    for sub in [
        "image",
        "create",
        "logs",
        "run",
        "exec",
        "shell",
        "doctor",
        "completions",
    ] {
        assert!(script.contains(sub), "{sub} is completed");
    }
    for shell in ["zsh", "fish"] {
        let out = kiln(home.path())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("terminate"));
    }
    let out = kiln(home.path())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// The figure called `name` in a `kiln bench --json` document.
fn figure<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing: {doc}"))
}

/// `kiln bench --json ARGS`, which must succeed with one JSON document on stdout.
fn bench_json(home: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = kiln(home)
        .args(["bench", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

/// `kiln bench --part cmdline`: each variant's touched set, idle and after its workload.
#[test]
fn bench_cmdline_measures_the_touched_set_of_each_variant() {
    let home = tempfile::tempdir().unwrap();
    let doc = bench_json(home.path(), &["--part", "cmdline", "--rounds", "1"]);
    let median = |name: &str| figure(&doc, name)["median"].as_f64().unwrap();
    for variant in [
        "kiln's command line",
        "init_on_alloc=0",
        "transparent_hugepage=never",
    ] {
        let (idle, worked) = (
            median(&format!("{variant}: idle clone")),
            median(&format!("{variant}: after the workload")),
        );
        // The workload writes 16 MiB that stay: the touched set grows by at least that.
        assert!(
            idle > 0.0 && worked >= idle + 16.0 * 1024.0,
            "{variant}: {idle} then {worked}"
        );
    }
    median("init_on_alloc=0 / kiln's, after the workload");
}

/// `kiln bench --part api`: RunMicrovm through a real kilnd to the first proxied 200, a cold
/// boot of the same image to its app's first 200, and the ingress against no proxy.
#[test]
fn bench_api_reports_run_to_first_200_and_the_proxy_against_none() {
    let home = tempfile::tempdir().unwrap();
    let doc = bench_json(home.path(), &["--part", "api", "--rounds", "1"]);
    let find = |name: &str| figure(&doc, name);
    let run = find("RunMicrovm -> first proxied HTTP 200");
    let running = find("RunMicrovm -> RUNNING (/run done)");
    assert!(
        run["median"].as_f64().unwrap() >= running["median"].as_f64().unwrap(),
        "{run}"
    );
    assert!(
        find("cold boot -> the app's first HTTP 200")["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let proxied = find("GET through the ingress, 16 at once: latency");
    assert!(proxied["n"].as_u64().unwrap() >= 16, "{proxied}");
    assert!(
        find("GET without the proxy (agent channel), 16 at once: throughput")["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    find("latency the proxy adds at 16 connections: p99");
    find("ratio cold boot -> 200 / RunMicrovm -> 200");
    find("ratio proxied / unproxied throughput, 16 at once");
}

#[test]
fn bench_json_gives_every_figure_with_its_spread() {
    let home = tempfile::tempdir().unwrap();
    let doc = bench_json(
        home.path(),
        &["--part", "runtime", "--rounds", "2", "--clones", "1"],
    );
    assert_eq!(doc["meta"]["rounds"], 2);
    let find = |name: &str| figure(&doc, name);
    let launch = find("template launch -> agent ready");
    assert_eq!(launch["n"], 2);
    assert_eq!(launch["samples"].as_array().unwrap().len(), 2);
    let (min, med, max) = (
        launch["min"].as_f64().unwrap(),
        launch["median"].as_f64().unwrap(),
        launch["max"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= med && med <= max, "{launch}");
    let ratio = find("ratio cold/launch");
    assert!(ratio["min"].as_f64().unwrap() <= ratio["median"].as_f64().unwrap());
    // The snapshot section: a diff suspend writes something, bounded by the RAM.
    let written = find("suspend writes (diff + devices)");
    assert!(written["median"].as_f64().unwrap() > 0.0, "{written}");
    assert!(
        written["max"].as_f64().unwrap() < 512.0 * 1024.0,
        "{written}"
    );
    find("ratio resume/launch");
    find("ratio written/private set");
    find("1 after suspend + resume vs one cold-booted VM, memory");
    assert_eq!(find("a fork's clone resume -> agent ready")["n"], 1);
    // QEMU's floor: a bare start on the same template, measured each round, under a launch.
    let floor = find("QEMU floor: bare start + state load");
    assert_eq!(floor["n"], 2);
    assert!(floor["min"].as_f64().unwrap() > 0.0, "{floor}");
    assert!(
        find("QEMU floor: bare start -> QMP")["median"]
            .as_f64()
            .unwrap()
            <= floor["median"].as_f64().unwrap()
    );
    find("ratio launch/QEMU floor");
    // Launches from QEMUs started ahead, each round, against both.
    let pre = find("launch from a pre-started QEMU -> agent ready");
    assert_eq!(pre["n"], 2);
    assert!(pre["min"].as_f64().unwrap() > 0.0, "{pre}");
    find("ratio pre-started launch/QEMU floor");
    find("ratio launch/pre-started launch");
}

/// `kiln bench --part cluster`: two kilnd nodes on the test PostgreSQL, RunMicrovm direct and
/// passed on, and the app's GET through each node's ingress, side by side.
#[test]
fn bench_cluster_measures_placement_and_the_ingress_across_nodes() {
    let Ok(admin) = std::env::var("KILN_TEST_DATABASE_URL") else {
        eprintln!("not run: KILN_TEST_DATABASE_URL is not set (scripts/test.sh sets it)");
        return;
    };
    let db = format!("kiln_bench_{}", std::process::id());
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let home = tempfile::tempdir().unwrap();
    let url = home.path().join("database-url");
    std::fs::write(&url, format!("{admin} dbname={db}")).unwrap();
    std::fs::set_permissions(&url, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut args = vec![
        "--part".to_string(),
        "cluster".into(),
        "--rounds".into(),
        "2".into(),
        "--database-url-file".into(),
        url.to_str().unwrap().into(),
    ];
    // With the test object storage (its key in the environment), resume across nodes too.
    let objects = std::env::var("KILN_TEST_S3_URL").ok().map(|u| {
        let (base, query) = u.split_once('?').unwrap();
        format!("{base}/bench-{}?{query}", std::process::id())
    });
    if let Some(o) = &objects {
        args.extend(["--object-store".to_string(), o.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let doc = bench_json(home.path(), &args);
    if objects.is_some() {
        for name in [
            "ResumeMicrovm on the node that suspended it",
            "ResumeMicrovm on the node it was handed to",
            "ratio resume other node / same node",
        ] {
            let f = figure(&doc, name);
            assert!(f["median"].as_f64().unwrap() > 0.0, "{f}");
        }
        assert_eq!(
            figure(&doc, "ResumeMicrovm on the node it was handed to")["n"],
            2
        );
    }
    for name in [
        "RunMicrovm answered by the image's node",
        "RunMicrovm passed on by the other node",
        "GET through the owner's ingress",
        "GET through the other node's ingress",
    ] {
        let f = figure(&doc, name);
        assert!(f["median"].as_f64().unwrap() > 0.0, "{f}");
        assert!(
            f["min"].as_f64().unwrap() <= f["max"].as_f64().unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        figure(&doc, "GET through the other node's ingress")["n"],
        200
    );
    assert_eq!(
        figure(&doc, "RunMicrovm passed on by the other node")["n"],
        2
    );
    assert!(
        figure(&doc, "ratio cross-node / same-node")["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Nothing left running: the bench terminated its microVMs and stopped its nodes.
    let live: i64 = postgres::Client::connect(&format!("{admin} dbname={db}"), postgres::NoTls)
        .unwrap()
        .query_one(
            "SELECT COUNT(*) FROM microvms WHERE state != 'TERMINATED'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(live, 0);
}
