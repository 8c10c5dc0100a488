//! `kiln bench`: measured side by side in one run, never asserted.
//! - cold boot → agent ready vs launch from template → agent ready (ratio);
//! - launch vs QEMU's own floor (a bare start and state load of the same template), and a
//!   launch from a QEMU started ahead (kilnd's pool) against both;
//! - launch with the jail vs without (`--no-jail`);
//! - suspend and resume times; a diff suspend's bytes against the guest's private set, a
//!   sharing resume against a launch, memory after suspend/resume, a fork (bench_snapshot);
//! - host memory (PSS) of N clones of one template vs one cold-booted VM;
//! - image bake and first launch vs cold boot;
//! - guest network throughput and connection rate: kiln's backend vs QEMU user-net;
//! - RunMicrovm → first proxied HTTP 200 vs a cold boot, and the ingress vs no proxy
//!   (bench_api, through `kiln-bench-api`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_types::VmId;
use kiln_vmm::snapshot::LaunchConfig;
use kiln_vmm::{BootConfig, GuestAssets, MachineSpec, Vm};

use crate::bench_report::Report;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Repetitions of each timed step (medians are printed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Clones to launch for the memory measurement.
    #[arg(long, default_value_t = 10)]
    clones: usize,
    /// Base image to measure.
    #[arg(long, default_value = "busybox")]
    base: String,
    /// Which measurements to run.
    #[arg(long, value_enum, default_value = "all")]
    part: BenchPart,
    /// With `--part api` (or all): also bake the seed's demo image from this directory
    /// (`examples/agent-sandbox`) and measure RunMicrovm against its cold boot; minutes
    /// under emulation.
    #[arg(long, value_name = "DIR")]
    seed_image: Option<std::path::PathBuf>,
    /// With `--part cluster`: a 0600 file holding the URL of a scratch PostgreSQL database
    /// two kilnd nodes share for the measurement.
    #[arg(long, value_name = "FILE")]
    database_url_file: Option<std::path::PathBuf>,
    /// With `--part cluster`: object storage for the two nodes
    /// (`s3://BUCKET[/PREFIX]?endpoint=…`, its key in the AWS_* environment), which adds
    /// resume on another node against resume on the same node.
    #[arg(long, value_name = "URL")]
    object_store: Option<String>,
    /// Print one JSON document (every figure with its samples, median, min and max).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPart {
    All,
    Runtime,
    Image,
    Network,
    /// RunMicrovm and the ingress, through a kilnd (`kiln-bench-api`).
    Api,
    /// Two kilnd nodes on one PostgreSQL (`--database-url-file`): placement latency and the
    /// ingress across nodes. Not part of `all`.
    Cluster,
    /// The guest kernel command line's effect on the touched set.
    Cmdline,
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn all_ms(v: &[Duration]) -> Vec<f64> {
    v.iter().copied().map(ms).collect()
}

/// Proportional set size of a process in KiB (shared pages divided among sharers).
pub(crate) fn pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let accel = kiln_vmm::accel::detect()?;
    let assets = GuestAssets::locate()?;
    // As kilnd's microVMs are: with a NIC, so every launch starts its network backend too
    // (a jailed process of its own), closed to everything.
    let mut machine = MachineSpec::new(accel.accel);
    machine.network = true;
    let scratch = crate::sandbox::kiln_home()
        .join("bench")
        .join(std::process::id().to_string());
    std::fs::create_dir_all(&scratch)?;
    let mut report = Report::new(
        args.json,
        &format!(
            "kiln bench: accel={} ({}), {} MiB guest, base {}, kernel {}",
            accel.accel,
            accel.reason,
            machine.memory_mib,
            args.base,
            assets.kernel.display()
        ),
        serde_json::json!({
            "accelerator": accel.accel, "reason": accel.reason, "memoryMib": machine.memory_mib,
            "base": args.base, "rounds": args.rounds, "kernel": assets.kernel,
            "qemu": kiln_vmm::manifest::qemu_version(),
        }),
    );
    let wants = |p: BenchPart| args.part == BenchPart::All || args.part == p;
    let mut result = Ok(());
    if wants(BenchPart::Runtime) {
        result = measure(&args, &assets, &machine, &scratch, &mut report).await;
    }
    if result.is_ok() && wants(BenchPart::Image) {
        result = measure_image(&assets, &machine, &scratch, &mut report).await;
    }
    if result.is_ok() && wants(BenchPart::Network) {
        result = crate::bench_net::measure(&assets, &machine, &scratch, &mut report).await;
    }
    if result.is_ok() && wants(BenchPart::Cmdline) {
        result = match assets.base_disk(&args.base) {
            Ok(base) => {
                crate::bench_cmdline::measure(
                    args.rounds,
                    &assets,
                    &machine,
                    &base,
                    &scratch,
                    &mut report,
                )
                .await
            }
            Err(e) => Err(e.into()),
        };
    }
    if args.part == BenchPart::Cluster {
        result = match &args.database_url_file {
            Some(file) => crate::bench_cluster::measure(
                args.rounds,
                file,
                args.object_store.as_deref(),
                &scratch,
                &mut report,
            ),
            None => Err(anyhow::anyhow!(
                "--part cluster needs --database-url-file FILE (a scratch PostgreSQL database)"
            )),
        };
    }
    if result.is_ok() && wants(BenchPart::Api) {
        result = crate::bench_api::measure(args.rounds, args.seed_image.as_deref(), &mut report);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    report.finish()
}

// INVARIANT: every caller names its VM with a short fixed lowercase word, with a number or
// the network backend's name ("cold-3", "clone-0", "net-kiln"), which VmId accepts.
#[allow(clippy::expect_used)]
pub(crate) fn id(name: String) -> VmId {
    VmId::new(name).expect("bench ids are valid")
}

/// A launch into `scratch/name` (of `machine` if given), NIC (if any) leading nowhere.
pub fn launch_config(
    scratch: &Path,
    name: &str,
    machine: Option<MachineSpec>,
    assets: &GuestAssets,
) -> LaunchConfig {
    LaunchConfig {
        id: id(name.to_string()),
        dir: scratch.join(name),
        machine,
        assets: assets.clone(),
        timeout: Duration::from_secs(60),
        die_with_parent: true,
        network: kiln_vmm::NetworkAttachment::closed(),
        confinement: crate::confinement(),
    }
}

/// A cold boot of `machine` on `base` into `scratch/name`, NIC (if any) leading nowhere.
pub fn cold_boot_config(
    scratch: &Path,
    name: &str,
    machine: MachineSpec,
    assets: &GuestAssets,
    (base_disk, base_format): (std::path::PathBuf, kiln_vmm::disk::BackingFormat),
) -> BootConfig {
    BootConfig {
        id: id(name.to_string()),
        dir: scratch.join(name),
        machine,
        assets: assets.clone(),
        base_disk,
        base_format,
        top_disk: None,
        disk_size_mib: None,
        timeout: Duration::from_secs(120),
        die_with_parent: true,
        network: kiln_vmm::NetworkAttachment::closed(),
        confinement: crate::confinement(),
    }
}

async fn measure(
    args: &BenchArgs,
    assets: &GuestAssets,
    machine: &MachineSpec,
    scratch: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let base = assets.base_disk(&args.base)?;
    let boot = |n: usize| {
        cold_boot_config(
            scratch,
            &format!("cold-{n}"),
            machine.clone(),
            assets,
            (base.clone(), kiln_vmm::disk::BackingFormat::Raw),
        )
    };
    // Cold boots; the last one becomes the template.
    let mut cold = Vec::new();
    let mut last = None;
    for n in 0..args.rounds {
        let t = Instant::now();
        let vm = Vm::boot(boot(n)).await?;
        cold.push(t.elapsed());
        if let Some(prev) = last.replace(vm) {
            prev.destroy().await?;
        }
    }
    let single = last.context("--rounds must be at least 1")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let single_pss = pss_kib(single.qemu_pid());
    let t = Instant::now();
    let template = single
        .snapshot_template(&scratch.join("template"))
        .await?
        .with_spare_overlays(scratch.join("overlays-ahead"));
    let snapshot_time = t.elapsed();

    let launch = |name: String| launch_config(scratch, &name, Some(machine.clone()), assets);
    let mut launches = Vec::new();
    let (mut suspends, mut resumes) = (Vec::new(), Vec::new());
    for n in 0..args.rounds {
        let t = Instant::now();
        let vm = template.launch(launch(format!("clone-{n}"))).await?;
        launches.push(t.elapsed());
        vm.sh("echo warm > /tmp/w").await?;
        let t = Instant::now();
        let suspended = vm.suspend().await?;
        suspends.push(t.elapsed());
        let t = Instant::now();
        let vm = suspended.resume(Duration::from_secs(60)).await?;
        resumes.push(t.elapsed());
        vm.destroy().await?;
    }

    // QEMU's own floor: a bare start on the same template and its state load, unjailed.
    let (mut floor_start, mut floor) = (Vec::new(), Vec::new());
    for n in 0..args.rounds {
        let f = template
            .measure_floor(&scratch.join(format!("floor-{n}")), assets)
            .await?;
        floor_start.push(f.start);
        floor.push(f.loaded);
    }

    // Launches from a QEMU started ahead (kilnd's pool): the prestart is not timed.
    let mut prestarted = Vec::new();
    for n in 0..args.rounds {
        let cfg = launch(format!("pre-{n}"));
        let pre = template
            .prestart(kiln_vmm::PrestartConfig {
                id: cfg.id,
                dir: cfg.dir,
                assets: cfg.assets,
                timeout: cfg.timeout,
                die_with_parent: cfg.die_with_parent,
                confinement: cfg.confinement,
            })
            .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        let vm = template.launch_prestarted(pre, cfg.network, None).await?;
        prestarted.push(t.elapsed());
        vm.destroy().await?;
    }

    // The jail's cost: launches of the same template jailed and unjailed, alternating.
    let (mut jailed, mut unjailed) = (Vec::new(), Vec::new());
    for n in 0..args.rounds {
        for jail in [n % 2 == 0, n % 2 == 1] {
            let mut cfg = launch(format!("jail-{n}-{}", u8::from(jail)));
            cfg.confinement = if jail {
                kiln_vmm::Confinement::default()
            } else {
                kiln_vmm::Confinement::Unjailed
            };
            let t = Instant::now();
            let vm = template.launch(cfg).await?;
            let took = t.elapsed();
            vm.destroy().await?;
            if jail { &mut jailed } else { &mut unjailed }.push(took);
        }
    }

    let mut clones = Vec::new();
    for n in 0..args.clones {
        let vm = template.launch(launch(format!("mem-{n}"))).await?;
        vm.sh("true").await?;
        clones.push(vm);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clone_pss: u64 = clones.iter().map(|vm| pss_kib(vm.qemu_pid())).sum();
    for vm in clones {
        vm.destroy().await?;
    }
    let snapshots = crate::bench_snapshot::measure(
        args.rounds,
        args.clones,
        &template,
        &launch,
        single_pss,
        report,
    )
    .await;

    report.section("runtime: cold boot, launch, jail, memory:");
    let cold = report.samples("cold boot -> agent ready", "ms", &all_ms(&cold));
    let launch = report.samples("template launch -> agent ready", "ms", &all_ms(&launches));
    report.ratio("ratio cold/launch", &cold, &launch);
    report.samples("QEMU floor: bare start -> QMP", "ms", &all_ms(&floor_start));
    let floor = report.samples("QEMU floor: bare start + state load", "ms", &all_ms(&floor));
    report.ratio("ratio launch/QEMU floor", &launch, &floor);
    let pre = report.samples(
        "launch from a pre-started QEMU -> agent ready",
        "ms",
        &all_ms(&prestarted),
    );
    report.ratio("ratio pre-started launch/QEMU floor", &pre, &floor);
    report.ratio("ratio launch/pre-started launch", &launch, &pre);
    let with_jail = report.samples("launch, jailed", "ms", &all_ms(&jailed));
    let without = report.samples("launch, --no-jail", "ms", &all_ms(&unjailed));
    report.ratio("ratio jailed/unjailed launch", &with_jail, &without);
    report.samples("template snapshot", "ms", &[ms(snapshot_time)]);
    report.samples("suspend (state to disk)", "ms", &all_ms(&suspends));
    report.samples("resume -> agent ready", "ms", &all_ms(&resumes));
    let one = report.samples("PSS of one cold-booted VM", "KiB", &[single_pss as f64]);
    let all = report.samples(
        &format!("PSS of {} clones (sum)", args.clones),
        "KiB",
        &[clone_pss as f64],
    );
    if single_pss > 0 && args.clones > 0 {
        report.ratio(
            &format!("{} clones vs one cold-booted VM, memory", args.clones),
            &all,
            &one,
        );
    }
    template.delete()?;
    snapshots
}

/// Image section: bake a small image, rebuild it with every step cached, and compare the
/// first launch from the image with a cold boot of the same root disk.
pub async fn measure_image(
    assets: &GuestAssets,
    machine: &MachineSpec,
    scratch: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let ctx = scratch.join("image-context");
    std::fs::create_dir_all(ctx.join("app"))?;
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nWORKDIR /srv\nCOPY app/ ./\nRUN mkdir -p hooks && echo ok > hooks/ready\nCMD [\"httpd\", \"-f\", \"-p\", \"127.0.0.1:9000\", \"-h\", \"/srv/hooks\"]\n",
    )?;
    std::fs::write(ctx.join("app/index.html"), "hello\n")?;
    let builder = kiln_image::Builder {
        images_dir: scratch.join("images"),
        layers_dir: scratch.join("layers"),
        assets: assets.clone(),
        accel: machine.accel,
        confinement: crate::confinement(),
    };
    let t = Instant::now();
    let first = builder
        .build(kiln_image::BuildSpec::new("bench", &ctx))
        .await?;
    let bake = t.elapsed();
    anyhow::ensure!(
        first.status == kiln_image::ImageStatus::Successful,
        "bench image failed: {:?}",
        first.reason
    );
    let t = Instant::now();
    let cached = builder
        .build(kiln_image::BuildSpec::new("bench", &ctx))
        .await?;
    let rebuild = t.elapsed();
    anyhow::ensure!(
        cached.steps.iter().all(|s| s.cached),
        "rebuild was not fully cached"
    );

    let template = kiln_vmm::Template::open(
        cached
            .template
            .as_ref()
            .context("the successful build has no template")?,
    )?;
    let t = Instant::now();
    let vm = template
        .launch(launch_config(scratch, "image-launch", None, assets))
        .await?;
    let launch = t.elapsed();
    vm.destroy().await?;
    let t = Instant::now();
    let cold = Vm::boot(cold_boot_config(
        scratch,
        "image-cold",
        template.manifest().machine.clone(),
        assets,
        (
            template.dir().join("disk.qcow2"),
            kiln_vmm::disk::BackingFormat::Qcow2,
        ),
    ))
    .await?;
    let cold_boot = t.elapsed();
    cold.destroy().await?;
    report.samples("image bake (busybox, 4 steps)", "ms", &[ms(bake)]);
    report.samples("rebuild, every step cached", "ms", &[ms(rebuild)]);
    let launch = report.samples("first launch from the image", "ms", &[ms(launch)]);
    let cold = report.samples("cold boot of the same root disk", "ms", &[ms(cold_boot)]);
    report.ratio("ratio cold/launch", &cold, &launch);
    Ok(())
}
