//! `kiln sandbox -- CMD…`: the main job for now. Launches a fresh microVM from the base
//! image's template (built once and cached), runs the command, prints its output, exits
//! with its exit code, and destroys the microVM.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_proto::{ExecRequest, ProcessSpec};
use kiln_types::VmId;
use kiln_vmm::snapshot::LaunchConfig;
use kiln_vmm::{GuestAssets, MachineSpec};

#[derive(clap::Args)]
pub struct SandboxArgs {
    /// Base image to run (see `kiln doctor` for the list).
    #[arg(long, default_value = "busybox")]
    base: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn kiln_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}

pub async fn run(args: SandboxArgs) -> anyhow::Result<i32> {
    // detect() logs the dev-mode warning when emulating.
    let accel = kiln_vmm::accel::detect()?;
    let assets = GuestAssets::locate()?;
    let mut machine = MachineSpec::new(accel.accel);
    machine.memory_mib = args.memory;
    let home = kiln_home();
    let started = Instant::now();
    let template = kiln_vmm::base_template::ensure(
        &home.join("templates"),
        &args.base,
        &machine,
        &assets,
        Duration::from_secs(120),
        crate::confinement(),
    )
    .await?;
    let prepared = started.elapsed();
    let id = VmId::new(format!("sandbox-{}", std::process::id()))?;
    let launch_started = Instant::now();
    let vm = template
        .launch(LaunchConfig {
            id: id.clone(),
            dir: home.join("run").join(id.as_str()),
            machine: Some(machine),
            assets,
            timeout: Duration::from_secs(60),
            die_with_parent: true,
            network: kiln_vmm::NetworkAttachment::closed(),
            confinement: crate::confinement(),
        })
        .await?;
    let launched = launch_started.elapsed();
    eprintln!(
        "kiln: sandbox {id} launched from template in {} ms (template ready after {} ms)",
        launched.as_millis(),
        prepared.as_millis()
    );
    let request = ExecRequest {
        process: ProcessSpec {
            argv: args.command,
            ..Default::default()
        },
        stdin: false,
        timeout_ms: args.timeout.map(|s| s * 1000),
    };
    let result = vm.exec(request, None).await;
    vm.destroy().await?;
    let out = result?;
    std::io::stdout().write_all(&out.stdout)?;
    std::io::stderr().write_all(&out.stderr)?;
    if out.status.timed_out {
        eprintln!("kiln: command timed out and was killed");
    }
    Ok(out
        .status
        .code
        .unwrap_or(128 + out.status.signal.unwrap_or(0)))
}
