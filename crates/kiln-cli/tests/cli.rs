//! The `kiln` binary end to end: doctor reports the accelerator rule's choice, and
//! `kiln sandbox` runs a command in a real microVM launched from a cached template.

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
