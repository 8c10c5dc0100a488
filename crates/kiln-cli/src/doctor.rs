//! `kiln doctor`: what is present, what is missing, and which accelerator will be used;
//! and, when a kilnd answers at the configured address, its health (accelerator, dev mode).

use kiln_vmm::accel::{self, DEV_MODE_WARNING};
use kiln_vmm::machine::firmware_path;
use kiln_vmm::manifest::{qemu_version, upstream_version};
use kiln_vmm::GuestAssets;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// The QEMU major version kiln drives (scripts/setup-lib.sh installs it).
const QEMU_MAJOR: &str = "10";

/// QEMU as found now: the emulator and qemu-img of one supported version.
struct Qemu {
    system: String,
    img: String,
    problem: Option<String>,
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().next().map(str::to_string)
}

fn check_qemu() -> Qemu {
    let system = qemu_version().to_string();
    let img = first_line("qemu-img", &["--version"]).unwrap_or_else(|| "unknown".into());
    let (s, i) = (upstream_version(&system), upstream_version(&img));
    let problem = if system == "unknown" {
        Some("qemu-system-x86_64 is missing".to_string())
    } else if s.split('.').next() != Some(QEMU_MAJOR) {
        Some(format!(
            "qemu-system-x86_64 is {s}; kiln needs {QEMU_MAJOR}.x"
        ))
    } else if img == "unknown" {
        Some("qemu-img is missing".to_string())
    } else if s != i {
        Some(format!(
            "qemu-img is {i}, qemu-system-x86_64 is {s}: they must be the same version"
        ))
    } else {
        None
    };
    Qemu {
        system,
        img,
        problem,
    }
}

/// The firmware file and the version of the package that ships it.
fn firmware() -> (std::path::PathBuf, Option<u64>, Option<String>) {
    let path = firmware_path();
    let size = std::fs::metadata(&path).ok().map(|m| m.len());
    let package = first_line("dpkg-query", &["-W", "-f=${Version}\n", "qemu-system-data"]);
    (path, size, package)
}

/// What the last run of scripts/setup.sh checked after installing, one `ok|fail NAME DETAIL`
/// per line (`$KILN_ASSETS/host-checks`).
fn setup_checks(assets_dir: &Path) -> Option<Vec<(bool, String, String)>> {
    let text = std::fs::read_to_string(assets_dir.join("host-checks")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (verdict, rest) = l.split_once(' ')?;
                let (name, detail) = rest.split_once(' ').unwrap_or((rest, ""));
                Some((verdict == "ok", name.to_string(), detail.to_string()))
            })
            .collect(),
    )
}

/// Prints the report; returns whether kiln can run guests here. A kilnd that does not
/// answer is reported, not a failure: the local checks decide.
pub fn run(as_json: bool, endpoint: Option<String>) -> anyhow::Result<bool> {
    let accel = accel::detect()?;
    let dir = GuestAssets::default_dir();
    let assets = GuestAssets::open(&dir);
    let qemu = check_qemu();
    let (fw_path, fw_size, fw_package) = firmware();
    let checks = setup_checks(&dir);
    let checks_ok = checks
        .as_ref()
        .is_some_and(|c| c.iter().all(|(ok, _, _)| *ok));
    // A real (throw-away) jail, started the way every microVM's is.
    let jail = kiln_jail::preflight(&kiln_jail::Partition::default()).map_err(|e| {
        let mut text = e.to_string();
        if let Some(source) = std::error::Error::source(&e) {
            text.push_str(&format!(": {source}"));
        }
        text
    });
    let jail_facts = kiln_jail::facts(&kiln_jail::Partition::default());
    let net_backend = kiln_vmm::netproc::check_net_backend();
    let ready = qemu.problem.is_none()
        && fw_size.is_some()
        && assets.is_ok()
        && checks_ok
        && jail.is_ok()
        && net_backend.is_ok();
    let endpoint = kiln_client::endpoint_from_env(endpoint);
    let daemon = kiln_client::health(&endpoint, Duration::from_secs(3));
    if as_json {
        let report = json!({
            "ready": ready,
            "accelerator": accel.accel,
            "accelerator_reason": accel.reason,
            "dev_mode": accel.dev_mode(),
            "kvm_device_present": accel::kvm_device_present(),
            "probe": accel.probe,
            "qemu": qemu.system,
            "qemu_img": qemu.img,
            "qemu_problem": qemu.problem,
            "firmware": {"path": fw_path, "bytes": fw_size, "package_version": fw_package},
            "setup_checks": checks.as_ref().map(|c| c.iter().map(|(ok, name, detail)| {
                json!({"name": name, "ok": ok, "detail": detail})
            }).collect::<Vec<_>>()),
            "assets_dir": dir,
            "kernel": assets.as_ref().ok().map(|a| a.kernel_version.clone()),
            "bases": assets.as_ref().map(|a| a.bases()).unwrap_or_default(),
            "problem": assets.as_ref().err().map(|e| e.to_string()),
            "jail": {
                "ok": jail.is_ok(),
                "problem": jail.as_ref().err(),
                "uidRange": jail_facts.uid_range,
                "uidsInUse": jail_facts.uids_in_use,
                "namespaces": jail_facts.namespaces,
                "cgroups": jail_facts.cgroups,
                "seccomp": jail_facts.seccomp,
            },
            "netBackend": match &net_backend {
                Ok(path) => json!({"ok": true, "path": path}),
                Err(problem) => json!({"ok": false, "problem": problem}),
            },
            "daemon": match &daemon {
                Ok(h) => json!({"endpoint": endpoint, "reachable": true, "health": h}),
                Err(e) => json!({"endpoint": endpoint, "reachable": false, "problem": e.to_string()}),
            },
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ready);
    }
    let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
    println!(
        "{} qemu          {}",
        mark(qemu.problem.is_none()),
        qemu.system
    );
    println!(
        "{} qemu-img      {}",
        mark(qemu.problem.is_none()),
        qemu.img
    );
    if let Some(p) = &qemu.problem {
        println!("FAIL qemu          {p}");
    }
    match fw_size {
        Some(bytes) => println!(
            "ok   firmware      {} ({bytes} bytes, qemu-system-data {})",
            fw_path.display(),
            fw_package.as_deref().unwrap_or("?")
        ),
        None => println!("FAIL firmware      {} is missing", fw_path.display()),
    }
    match &checks {
        Some(list) => {
            for (ok, name, detail) in list {
                println!("{} set-up check  {name} {detail}", mark(*ok));
            }
        }
        None => println!("FAIL set-up check  none recorded in {}", dir.display()),
    }
    println!("ok   accelerator   {} ({})", accel.accel, accel.reason);
    if accel.dev_mode() {
        println!("WARN dev mode       {DEV_MODE_WARNING}");
    }
    match &assets {
        Ok(a) => {
            println!(
                "ok   guest kernel  {} ({})",
                a.kernel_version,
                a.kernel.display()
            );
            println!(
                "ok   initramfs     {} (agent build {})",
                a.initramfs.display(),
                a.initramfs_key
            );
            println!("ok   base images   {}", a.bases().join(", "));
        }
        Err(e) => println!("FAIL guest assets  {e}"),
    }
    match &jail {
        Ok(_) => println!(
            "ok   jail          uids {} ({} in use), namespaces {}",
            jail_facts.uid_range,
            jail_facts.uids_in_use,
            jail_facts.namespaces.join(" ")
        ),
        Err(e) => println!("FAIL jail          {e}"),
    }
    for line in &jail_facts.cgroups {
        println!("{} jail cgroup   {line}", mark(jail.is_ok()));
    }
    println!(
        "{} jail seccomp  {}",
        mark(jail.is_ok()),
        jail_facts.seccomp
    );
    match &net_backend {
        Ok(path) => println!(
            "ok   net backend   {} (jailed in the host's network namespace; seccomp checked)",
            path.display()
        ),
        Err(e) => println!("FAIL net backend   {e}"),
    }
    match &daemon {
        Ok(h) => {
            println!(
                "ok   kilnd         {endpoint}: {}, accelerator {}",
                h.status, h.accelerator
            );
            if h.dev_mode {
                println!(
                    "WARN kilnd         {}",
                    h.warning.as_deref().unwrap_or(DEV_MODE_WARNING)
                );
            }
        }
        Err(_) => {
            println!("info kilnd         not answering at {endpoint} (scripts/run.sh starts it)")
        }
    }
    if !ready {
        println!("\nRun scripts/setup.sh to install what is missing.");
    }
    Ok(ready)
}
