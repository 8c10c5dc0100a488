//! `kiln bench`'s snapshot section, on the runtime section's template, side by side in one
//! run: a diff suspend (bytes written against the guest's private set), a sharing resume
//! against a launch of the same template, host memory of clones fresh and after a
//! suspend/resume cycle, and a fork of one running guest.

use std::time::{Duration, Instant};

use kiln_vmm::snapshot::LaunchConfig;
use kiln_vmm::{ForkTarget, Template, Vm};

use crate::bench::{all_ms, id, ms, pss_kib};
use crate::bench_report::Report;

/// What each measured guest writes before it is suspended (so the diff holds real data).
const DIRTY: &str = "head -c 16777216 /dev/urandom > /tmp/blob && echo warm > /tmp/w";

/// The guest's private (written) memory in bytes, as smaps counts it.
fn private_bytes(vm: &Vm) -> anyhow::Result<u64> {
    let usage = vm
        .ram_usage()
        .ok_or_else(|| anyhow::anyhow!("a template launch maps its template's RAM"))??;
    Ok(usage.anonymous)
}

pub async fn measure(
    rounds: usize,
    clones: usize,
    template: &Template,
    launch: &dyn Fn(String) -> LaunchConfig,
    single_pss: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    report.section("snapshots: diff suspend, sharing resume, fork:");
    let (mut launches, mut suspends, mut resumes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut written, mut private) = (Vec::new(), Vec::new());
    for n in 0..rounds {
        let t = Instant::now();
        let vm = template.launch(launch(format!("snap-{n}"))).await?;
        launches.push(t.elapsed());
        vm.sh(DIRTY).await?;
        private.push(private_bytes(&vm)? as f64 / 1024.0);
        let t = Instant::now();
        let suspended = vm.suspend().await?;
        suspends.push(t.elapsed());
        written.push(suspended.state_bytes() as f64 / 1024.0);
        let t = Instant::now();
        let vm = suspended.resume(Duration::from_secs(60)).await?;
        resumes.push(t.elapsed());
        vm.destroy().await?;
    }
    let launch_stat = report.samples(
        "launch -> agent ready (same rounds)",
        "ms",
        &all_ms(&launches),
    );
    let resume_stat = report.samples("diff resume -> agent ready", "ms", &all_ms(&resumes));
    report.ratio("ratio resume/launch", &resume_stat, &launch_stat);
    report.samples(
        "diff suspend (16 MiB written first)",
        "ms",
        &all_ms(&suspends),
    );
    let bytes = report.samples("suspend writes (diff + devices)", "KiB", &written);
    let set = report.samples(
        "private set before suspend (smaps Anonymous)",
        "KiB",
        &private,
    );
    report.ratio("ratio written/private set", &bytes, &set);

    // Host memory of N clones fresh, then after each was suspended and resumed.
    let mut vms = Vec::new();
    for n in 0..clones {
        let vm = template.launch(launch(format!("cycle-{n}"))).await?;
        vm.sh("true").await?;
        vms.push(vm);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh: u64 = vms.iter().map(|vm| pss_kib(vm.qemu_pid())).sum();
    let mut cycled = Vec::new();
    for vm in vms {
        let s = vm.suspend().await?;
        cycled.push(s.resume(Duration::from_secs(60)).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: u64 = cycled.iter().map(|vm| pss_kib(vm.qemu_pid())).sum();
    for vm in cycled {
        vm.destroy().await?;
    }
    let fresh = report.samples(
        &format!("PSS of {clones} fresh clones (sum)"),
        "KiB",
        &[fresh as f64],
    );
    let after = report.samples(
        &format!("PSS of the {clones} after suspend + resume (sum)"),
        "KiB",
        &[after as f64],
    );
    report.ratio("ratio after-cycle/fresh, memory", &after, &fresh);
    if single_pss > 0 {
        let one = report.samples(
            "PSS of one cold-booted VM (this run)",
            "KiB",
            &[single_pss as f64],
        );
        report.ratio(
            &format!("{clones} fresh vs one cold-booted VM, memory"),
            &fresh,
            &one,
        );
        report.ratio(
            &format!("{clones} after suspend + resume vs one cold-booted VM, memory"),
            &after,
            &one,
        );
    }
    fork(clones, template, launch, report).await
}

/// One running guest forked into `clones`: the fork, the clones' resumes, their memory.
async fn fork(
    clones: usize,
    template: &Template,
    launch: &dyn Fn(String) -> LaunchConfig,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut parent = template.launch(launch("fork-parent".into())).await?;
    parent.sh(DIRTY).await?;
    let cfg = launch("fork-parent".into());
    let targets: Vec<ForkTarget> = (0..clones)
        .map(|n| {
            let name = format!("fork-{n}");
            ForkTarget {
                id: id(name.clone()),
                dir: cfg.dir.with_file_name(name),
            }
        })
        .collect();
    let t = Instant::now();
    let suspended = parent.fork(&targets).await?;
    let forked = t.elapsed();
    let mut resumes = Vec::new();
    let mut running = Vec::new();
    for s in suspended {
        let t = Instant::now();
        running.push(s.resume(Duration::from_secs(60)).await?);
        resumes.push(t.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let parent_pss = pss_kib(parent.qemu_pid());
    let clone_pss: u64 = running.iter().map(|vm| pss_kib(vm.qemu_pid())).sum();
    for vm in running {
        vm.destroy().await?;
    }
    parent.destroy().await?;
    report.samples(
        &format!("fork into {clones} (parent paused within)"),
        "ms",
        &[ms(forked)],
    );
    report.samples(
        "a fork's clone resume -> agent ready",
        "ms",
        &all_ms(&resumes),
    );
    let p = report.samples("PSS of the forked parent", "KiB", &[parent_pss as f64]);
    report.samples(
        &format!("PSS of its {clones} clones (sum)"),
        "KiB",
        &[clone_pss as f64],
    );
    if clones > 0 {
        let each = report.samples("PSS per clone", "KiB", &[clone_pss as f64 / clones as f64]);
        report.ratio("ratio clone/parent, memory", &each, &p);
    }
    Ok(())
}
