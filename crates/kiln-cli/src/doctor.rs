//! `kiln doctor`: what is present, what is missing, and which accelerator will be used;
//! and, when a kilnd answers at the configured address, its health (accelerator, dev mode).

use kiln_vmm::accel::{self, DEV_MODE_WARNING};
use kiln_vmm::manifest::qemu_version;
use kiln_vmm::GuestAssets;
use serde_json::json;
use std::time::Duration;

/// Prints the report; returns whether kiln can run guests here. A kilnd that does not
/// answer is reported, not a failure: the local checks decide.
pub fn run(as_json: bool, endpoint: Option<String>) -> anyhow::Result<bool> {
    let accel = accel::detect()?;
    let dir = GuestAssets::default_dir();
    let assets = GuestAssets::open(&dir);
    let qemu = qemu_version();
    let qemu_ok = qemu != "unknown";
    let ready = qemu_ok && assets.is_ok();
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
            "qemu": qemu,
            "assets_dir": dir,
            "kernel": assets.as_ref().ok().map(|a| a.kernel_version.clone()),
            "bases": assets.as_ref().map(|a| a.bases()).unwrap_or_default(),
            "problem": assets.as_ref().err().map(|e| e.to_string()),
            "daemon": match &daemon {
                Ok(h) => json!({"endpoint": endpoint, "reachable": true, "health": h}),
                Err(e) => json!({"endpoint": endpoint, "reachable": false, "problem": e.to_string()}),
            },
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ready);
    }
    let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
    println!("{} qemu          {qemu}", mark(qemu_ok));
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
    match &daemon {
        Ok(h) => {
            println!(
                "ok   kilnd         {endpoint}: {}, accelerator {}",
                h["status"].as_str().unwrap_or("?"),
                h["accelerator"].as_str().unwrap_or("?")
            );
            if h["devMode"] == true {
                println!(
                    "WARN kilnd         {}",
                    h["warning"].as_str().unwrap_or(DEV_MODE_WARNING)
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
