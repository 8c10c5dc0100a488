//! `kiln bench --part cmdline`: what the guest kernel's command line does to a guest's
//! touched set (the pages its QEMU holds privately, which a suspend writes and no sibling
//! shares). Each variant is cold-booted with one option added, snapshotted, and launched;
//! its private set is measured idle and after a workload that writes and frees 16 MiB and
//! then writes 16 MiB again, side by side with the command line kiln uses.

use std::path::Path;
use std::time::Duration;

use kiln_vmm::{GuestAssets, MachineSpec, Vm};

use crate::bench::{cold_boot_config, launch_config};
use crate::bench_report::{Report, Stat};

/// Each variant: its name and what it adds to kiln's command line.
const VARIANTS: &[(&str, &str)] = &[
    ("kiln's command line", ""),
    ("transparent_hugepage=always", "transparent_hugepage=always"),
    ("transparent_hugepage=never", "transparent_hugepage=never"),
    ("init_on_alloc=0", "init_on_alloc=0"),
    ("init_on_free=1", "init_on_free=1"),
];

/// Writes 16 MiB, frees it, and writes 16 MiB again (what a build or a test run does).
const WORKLOAD: &str = "head -c 16777216 /dev/urandom > /tmp/a && rm /tmp/a && \
                        head -c 16777216 /dev/urandom > /tmp/b";

fn private_kib(vm: &Vm) -> anyhow::Result<f64> {
    let usage = vm
        .ram_usage()
        .ok_or_else(|| anyhow::anyhow!("a template launch maps its template's RAM"))??;
    Ok(usage.anonymous as f64 / 1024.0)
}

pub async fn measure(
    rounds: usize,
    assets: &GuestAssets,
    machine: &MachineSpec,
    base: &Path,
    scratch: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    report.section("guest kernel command line: the touched set (smaps Anonymous):");
    let mut baseline: Option<(Stat, Stat)> = None;
    for (n, (name, extra)) in VARIANTS.iter().enumerate() {
        let cfg = cold_boot_config(
            scratch,
            &format!("cmdline-{n}"),
            machine.clone(),
            assets,
            (base.to_path_buf(), kiln_vmm::disk::BackingFormat::Raw),
        );
        let vm = Vm::boot_with_cmdline(cfg, extra).await?;
        let template = vm
            .snapshot_template(&scratch.join(format!("cmdline-template-{n}")))
            .await?;
        let (mut idle, mut worked) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let name = format!("cmdline-{n}-{r}");
            let machine = Some(template.manifest().machine.clone());
            let clone = template
                .launch(launch_config(scratch, &name, machine, assets))
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            idle.push(private_kib(&clone)?);
            clone.sh(WORKLOAD).await?;
            worked.push(private_kib(&clone)?);
            clone.destroy().await?;
        }
        template.delete()?;
        let i = report.samples(&format!("{name}: idle clone"), "KiB", &idle);
        let w = report.samples(&format!("{name}: after the workload"), "KiB", &worked);
        match &baseline {
            None => baseline = Some((i, w)),
            Some((bi, bw)) => {
                report.ratio(&format!("{name} / kiln's, idle"), &i, bi);
                report.ratio(&format!("{name} / kiln's, after the workload"), &w, bw);
            }
        }
    }
    Ok(())
}
