//! `kiln image create|get|list|delete|logs` over kilnd's API (CreateMicrovmImage and
//! friends), plus the local bake (`kiln image local …`) and base imports (`kiln image import`),
//! which work without the daemon.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use kiln_client::api::{CreateImageRequest, CreateImageResponse, Image, ImageStatus};
use kiln_client::{Client, ClientError};

use crate::remote::{print_json, Conn};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// CreateMicrovmImage: upload a build context to kilnd and follow the bake.
    Create(CreateArgs),
    /// GetMicrovmImage (by id, or by name: its newest good build).
    Get { id: String },
    /// Bake an image again from the build context and settings it was created with
    /// (CreateMicrovmImage with its recorded request): for an image whose status is
    /// REBUILD_REQUIRED after a QEMU or machine change on this host.
    Rebuild {
        /// Image name or id.
        name: String,
        /// Print only the result, not the build log.
        #[arg(long)]
        quiet: bool,
        /// Return once the build is accepted (prints the image id).
        #[arg(long)]
        no_wait: bool,
    },
    /// ListMicrovmImages: the newest build of every image (every page).
    List {
        /// Only those with this label: `key=value`, or `key` for any value (repeatable: all).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// UpdateMicrovmImage: `kiln image label <name|id> key=value… key-…`.
    Label {
        id: String,
        #[arg(required = true, value_parser = crate::remote::parse_label_change)]
        changes: Vec<(String, Option<String>)>,
    },
    /// DeleteMicrovmImage (refused while microVMs use it or while it builds).
    Delete { id: String },
    /// Print an image's build log; -f follows a running build until it ends.
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Import a root filesystem tarball as a base image usable as `FROM <name>` (local:
    /// writes to the guest assets that kilnd on this machine uses).
    Import { name: String, tarball: PathBuf },
    /// Bake and inspect images locally, without kilnd.
    #[command(subcommand)]
    Local(crate::image::LocalCommand),
}

#[derive(Args)]
pub struct CreateArgs {
    /// Image name (a-z, 0-9, '-').
    name: String,
    /// The build context: a directory, a .zip or a .tar with a Dockerfile.
    context: PathBuf,
    /// Dockerfile path inside the context.
    #[arg(long)]
    dockerfile: Option<String>,
    /// Baseline memory in MiB (512-8192).
    #[arg(long)]
    memory: Option<u32>,
    #[arg(long)]
    vcpus: Option<u8>,
    /// Root disk size in MiB (grown from the base's).
    #[arg(long)]
    disk: Option<u32>,
    /// Port of the app's lifecycle hooks (/ready, /run, …).
    #[arg(long)]
    hook_port: Option<u16>,
    /// Seconds to wait for GET /ready to answer 200.
    #[arg(long)]
    ready_timeout: Option<u64>,
    /// Snapshot without waiting for /ready.
    #[arg(long)]
    no_wait_ready: bool,
    /// Also require GET /validate to answer 200.
    #[arg(long)]
    validate: bool,
    /// KEY=VALUE, for ARG (repeatable).
    #[arg(long = "build-arg")]
    build_args: Vec<String>,
    /// A label, `key=value` (repeatable).
    #[arg(long = "label", value_parser = crate::remote::parse_label)]
    labels: Vec<(String, String)>,
    /// Egress connectors of the build as JSON (default: '[{"type":"internet"}]').
    #[arg(long, value_parser = crate::remote::parse_connectors)]
    connectors: Option<crate::remote::Connectors>,
    /// Print only the result, not the build log.
    #[arg(long)]
    quiet: bool,
    /// Return once the build is accepted (prints the image id) instead of following it.
    #[arg(long)]
    no_wait: bool,
}

impl CreateArgs {
    /// The CreateMicrovmImage request but its name and artifact.
    fn request(&self) -> Result<CreateImageRequest, ClientError> {
        let mut build_args = std::collections::BTreeMap::new();
        for a in &self.build_args {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| usage(format!("--build-arg {a:?}: use KEY=VALUE")))?;
            build_args.insert(k.to_string(), v.to_string());
        }
        Ok(CreateImageRequest {
            dockerfile: self.dockerfile.clone(),
            memory_size_mib: self.memory,
            vcpus: self.vcpus,
            disk_size_mib: self.disk,
            hook_port: self.hook_port,
            ready_timeout_seconds: self.ready_timeout,
            wait_for_ready: self.no_wait_ready.then_some(false),
            validate: self.validate.then_some(true),
            build_args,
            connectors: self.connectors.clone().map(|c| c.0),
            labels: (!self.labels.is_empty()).then(|| self.labels.iter().cloned().collect()),
            ..Default::default()
        })
    }
}

/// A usage error (exit code 2) raised on the client side.
pub(crate) fn usage(message: String) -> ClientError {
    ClientError::Api {
        status: 400,
        code: "ValidationException".into(),
        message,
    }
}

/// The bytes to upload: a zip or tar file as it is, a directory packed as a tar (symlinks
/// kept as links; kilnd validates every entry and applies `.dockerignore`).
fn artifact(context: &Path) -> Result<Vec<u8>, ClientError> {
    let bad = |e: std::io::Error| usage(format!("build context {}: {e}", context.display()));
    if context.is_dir() {
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        tar.append_dir_all("", context).map_err(bad)?;
        return tar.into_inner().map_err(bad);
    }
    let bytes = std::fs::read(context).map_err(bad)?;
    let is_zip = bytes.starts_with(b"PK\x03\x04");
    let is_tar = bytes.len() > 262 && &bytes[257..262] == b"ustar";
    if !is_zip && !is_tar {
        return Err(usage(format!(
            "build context {}: use a directory, a .zip or an uncompressed .tar",
            context.display()
        )));
    }
    Ok(bytes)
}

pub fn run(conn: Conn, cmd: ImageCommand) -> i32 {
    match execute(&conn, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e}");
            e.exit_code()
        }
    }
}

fn print_table(rows: &[&Image]) {
    println!(
        "{:<24} {:<34} {:<11} {:>6} {:>5}  REASON",
        "NAME", "IMAGE", "STATUS", "MEMORY", "VCPUS"
    );
    for r in rows {
        println!(
            "{:<24} {:<34} {:<11} {:>6} {:>5}  {}",
            r.name,
            r.image_identifier,
            r.status.as_str(),
            r.memory_size_mib.map(|m| m.to_string()).unwrap_or_default(),
            r.vcpus.map(|v| v.to_string()).unwrap_or_default(),
            r.status_reason.as_deref().unwrap_or("")
        );
    }
}

fn execute(conn: &Conn, cmd: ImageCommand) -> Result<i32, ClientError> {
    let c = Client::from_env(conn.endpoint.clone(), conn.api_key.clone())?;
    match cmd {
        ImageCommand::Create(args) => create(&c, conn, args),
        ImageCommand::Rebuild {
            name,
            quiet,
            no_wait,
        } => {
            let image = c.get_image(&name)?;
            let request = image.build_request.ok_or_else(|| ClientError::Api {
                status: 409,
                code: "ConflictException".into(),
                message: format!(
                    "image {name} has no recorded build request (it was created before \
                         kiln recorded them): run `kiln image create` with its context again"
                ),
            })?;
            let started = c.create_image(&request)?;
            follow(&c, conn, &started, quiet, no_wait)
        }
        ImageCommand::Get { id } => {
            let v = c.get_image(&id)?;
            if conn.json() {
                print_json(&v);
            } else {
                print_table(&[&v]);
            }
            Ok(0)
        }
        ImageCommand::List { labels } => {
            let images = c.list_all_images(&kiln_client::api::ListImagesQuery {
                label: labels,
                ..Default::default()
            })?;
            if conn.json() {
                print_json(&kiln_client::api::ImageList {
                    images,
                    next_cursor: None,
                });
            } else {
                print_table(&images.iter().collect::<Vec<_>>());
            }
            Ok(0)
        }
        ImageCommand::Label { id, changes } => {
            let req = kiln_client::api::UpdateLabelsRequest {
                labels: changes.into_iter().collect(),
            };
            let v = c.update_image_labels(&id, &req)?;
            if conn.json() {
                print_json(&v);
            } else {
                print_table(&[&v]);
            }
            Ok(0)
        }
        ImageCommand::Delete { id } => {
            c.delete_image(&id)?;
            if conn.json() {
                print_json(&serde_json::json!({"imageIdentifier": id, "deleted": true}));
            } else {
                println!("deleted {id}");
            }
            Ok(0)
        }
        ImageCommand::Logs { id, follow } => {
            let reader = c.image_logs(&id, follow)?;
            let mut stdout = std::io::stdout().lock();
            std::io::copy(&mut BufReader::new(reader), &mut stdout).map_err(|e| {
                ClientError::Unreachable {
                    endpoint: c.endpoint().to_string(),
                    detail: format!("log stream: {e}"),
                }
            })?;
            Ok(0)
        }
        ImageCommand::Import { .. } | ImageCommand::Local(_) => {
            unreachable!("local image commands run without the API")
        }
    }
}

fn create(c: &Client, conn: &Conn, args: CreateArgs) -> Result<i32, ClientError> {
    let request = args.request()?;
    let bytes = artifact(&args.context)?;
    let started = c.build_image(&args.name, &bytes, request)?;
    follow(c, conn, &started, args.quiet, args.no_wait)
}

/// Follows a build that CreateMicrovmImage accepted (`started`: its answer) to its end.
fn follow(
    c: &Client,
    conn: &Conn,
    started: &CreateImageResponse,
    quiet: bool,
    no_wait: bool,
) -> Result<i32, ClientError> {
    let id = started.image_identifier.clone();
    let name = &started.name;
    if no_wait {
        if conn.json() {
            print_json(started);
        } else {
            println!("{id}");
        }
        return Ok(0);
    }
    let progress = Progress::new(quiet);
    progress.line(&format!("Building {name} as {id}"));
    // The log stream ends when the build does; if it breaks early, poll the record.
    if let Ok(reader) = c.image_logs(&id, true) {
        for line in BufReader::new(reader).lines() {
            match line {
                Ok(l) => progress.line(&l),
                Err(_) => break,
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3600);
    let record = loop {
        let v = c.get_image(&id)?;
        if v.status != ImageStatus::Creating || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let ok = record.status == ImageStatus::Successful;
    if conn.json() {
        print_json(&record);
    } else {
        println!(
            "{} {} {} ({:.0?})",
            record.name,
            id,
            record.status.as_str(),
            progress.started.elapsed()
        );
    }
    if !ok {
        eprintln!(
            "kiln: the build of {id} failed: {}",
            record
                .status_reason
                .as_deref()
                .unwrap_or("no reason recorded")
        );
        if quiet || !conn.json() {
            if let Some(tail) = &record.log_tail {
                eprintln!("last lines of the build log:");
                for l in tail.lines() {
                    eprintln!("  {l}");
                }
            }
        }
    }
    Ok(if ok { 0 } else { 1 })
}

/// The build log as it streams, on stderr: step headers stand out on a terminal, the
/// output of each step is dimmed; `--quiet` shows nothing.
struct Progress {
    quiet: bool,
    tty: bool,
    started: Instant,
}

impl Progress {
    fn new(quiet: bool) -> Progress {
        Progress {
            quiet,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    fn line(&self, l: &str) {
        if self.quiet {
            return;
        }
        if !self.tty {
            eprintln!("{l}");
        } else if l.starts_with("Step ") {
            let secs = self.started.elapsed().as_secs();
            eprintln!(
                "\x1b[1m{l}\x1b[0m \x1b[2m({}:{:02})\x1b[0m",
                secs / 60,
                secs % 60
            );
        } else if l.starts_with('[') {
            eprintln!("\x1b[2m  {l}\x1b[0m");
        } else {
            eprintln!("{l}");
        }
    }
}
