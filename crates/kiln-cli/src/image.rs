//! `kiln image local build|list|get|logs` and `kiln image import`: images baked on this
//! machine without kilnd (the API commands are in `image_api.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use kiln_image::{BuildSpec, Builder, ImageStatus};
use kiln_vmm::GuestAssets;

#[derive(Subcommand)]
pub enum LocalCommand {
    /// Bake an image from a build context (a directory, .zip or .tar with a Dockerfile).
    Build {
        /// The build context.
        context: PathBuf,
        /// Image name (a-z, 0-9, '-').
        #[arg(long)]
        name: String,
        /// Dockerfile path inside the context.
        #[arg(long, default_value = "Dockerfile")]
        dockerfile: String,
        /// Baseline memory in MiB (512-8192).
        #[arg(long, default_value_t = 512)]
        memory: u32,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// KEY=VALUE, for ARG (repeatable).
        #[arg(long = "build-arg")]
        build_args: Vec<String>,
        /// Port of the app's lifecycle hooks (/ready, /run, …).
        #[arg(long, default_value_t = kiln_image::build::DEFAULT_HOOK_PORT)]
        hook_port: u16,
        /// Seconds to wait for GET /ready to answer 200.
        #[arg(long, default_value_t = 60)]
        ready_timeout: u64,
        /// Snapshot without waiting for /ready.
        #[arg(long)]
        no_wait_ready: bool,
        /// Also require GET /validate to answer 200.
        #[arg(long)]
        validate: bool,
        /// Print only the result, not the build log.
        #[arg(long)]
        quiet: bool,
        /// Print the final record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List images and the status of their latest build.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show an image's record.
    Get { name: String },
    /// Print the build log of an image's latest build.
    Logs { name: String },
}

fn builder() -> anyhow::Result<Builder> {
    let home = crate::sandbox::kiln_home();
    let builder = Builder {
        images_dir: home.join("images"),
        layers_dir: home.join("layers"),
        assets: GuestAssets::locate()?,
        accel: kiln_vmm::accel::detect()?.accel,
        confinement: crate::confinement(),
    };
    for id in builder.recover_interrupted()? {
        eprintln!("kiln: build {id} was interrupted; marked FAILED and cleaned up");
    }
    Ok(builder)
}

pub async fn run(cmd: LocalCommand) -> anyhow::Result<i32> {
    let builder = builder()?;
    match cmd {
        LocalCommand::Build {
            context,
            name,
            dockerfile,
            memory,
            vcpus,
            build_args,
            hook_port,
            ready_timeout,
            no_wait_ready,
            validate,
            quiet,
            json,
        } => {
            let mut args = BTreeMap::new();
            for a in build_args {
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--build-arg {a:?}: use KEY=VALUE"))?;
                args.insert(k.to_string(), v.to_string());
            }
            let spec = BuildSpec {
                dockerfile,
                memory_mib: memory,
                vcpus,
                build_args: args,
                hook_port,
                wait_ready: !no_wait_ready,
                ready_timeout: Duration::from_secs(ready_timeout),
                validate,
                ..BuildSpec::new(&name, &context)
            };
            let progress: Option<kiln_image::log::LogSink> = if quiet {
                None
            } else {
                Some(Arc::new(|line: &str| eprintln!("{line}")))
            };
            let record = builder.build_with_progress(spec, progress).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&record)?);
            } else {
                println!("{} {} {:?}", record.name, record.id, record.status);
                if let Some(reason) = &record.reason {
                    println!("reason: {reason}");
                }
            }
            Ok(if record.status == ImageStatus::Successful {
                0
            } else {
                1
            })
        }
        LocalCommand::List { json } => {
            let records: Vec<_> = builder
                .names()
                .iter()
                .filter_map(|n| builder.find(n))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                println!(
                    "{:<24} {:<32} {:<11} {:>6}  BASE",
                    "NAME", "ID", "STATUS", "MEMORY"
                );
                for r in records {
                    println!(
                        "{:<24} {:<32} {:<11} {:>6}  {}",
                        r.name,
                        r.id,
                        format!("{:?}", r.status).to_uppercase(),
                        r.memory_mib,
                        r.base.unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        LocalCommand::Get { name } => match builder.find(&name) {
            Some(r) => {
                println!("{}", serde_json::to_string_pretty(&r)?);
                Ok(0)
            }
            None => {
                eprintln!("kiln: no image named {name:?} (see `kiln image local list`)");
                Ok(2)
            }
        },
        LocalCommand::Logs { name } => match builder.builds(&name).pop() {
            Some(r) => {
                let log =
                    std::fs::read_to_string(builder.build_dir(&name, &r.id).join("build.log"))?;
                print!("{log}");
                Ok(0)
            }
            None => {
                eprintln!("kiln: no image named {name:?} (see `kiln image local list`)");
                Ok(2)
            }
        },
    }
}

/// `kiln image import`: a root filesystem tarball as a base image usable as `FROM <name>`.
pub async fn import(name: &str, tarball: &std::path::Path) -> anyhow::Result<i32> {
    let builder = builder()?;
    let base = kiln_image::base::import(&builder.assets, name, tarball).await?;
    println!(
        "imported {} ({}); use it as FROM {}",
        base.name,
        base.disk.display(),
        base.name
    );
    Ok(0)
}
