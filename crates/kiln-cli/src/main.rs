//! `kiln`: the command line. For now: `doctor`, `sandbox` (run a command in a fresh
//! microVM launched from a cached template) and `bench`.

// A binary's output is its interface.
#![allow(clippy::print_stdout)]

mod bench;
mod bench_api;
mod bench_cluster;
mod bench_cmdline;
mod bench_net;
mod bench_report;
mod bench_snapshot;
mod doctor;
mod files_cli;
mod image;
mod image_api;
mod mcp;
mod node_cli;
mod proc_cli;
mod remote;
mod sandbox;
mod shell;
mod webhook_cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Self-hostable microVM sandboxes")]
struct Cli {
    #[command(flatten)]
    conn: remote::Conn,
    /// Start guests (sandbox, image local, bench) unjailed, as this user in the host's
    /// namespaces: development only.
    #[arg(long, global = true)]
    no_jail: bool,
    #[command(subcommand)]
    command: Command,
}

/// The jail of every guest this process starts (`--no-jail` turns it off).
static CONFINEMENT: std::sync::OnceLock<kiln_vmm::Confinement> = std::sync::OnceLock::new();

/// The jail of every guest this process starts.
pub fn confinement() -> kiln_vmm::Confinement {
    CONFINEMENT
        .get_or_init(kiln_vmm::Confinement::default)
        .clone()
}

#[derive(Subcommand)]
enum Command {
    /// Report guest assets, QEMU, which accelerator kiln will use and why, and kilnd's health.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a fresh sandbox launched from the base image's template snapshot.
    Sandbox(sandbox::SandboxArgs),
    /// Measure cold boot vs launch from template, suspend/resume, and clone memory.
    Bench(bench::BenchArgs),
    /// Build and inspect images (through kilnd; `image local` bakes without it).
    #[command(subcommand)]
    Image(image_api::ImageCommand),
    /// Webhooks: lifecycle events POSTed to your URLs, signed (through kilnd).
    #[command(subcommand)]
    Webhook(webhook_cli::WebhookCommand),
    /// The kilnd nodes sharing one database (a cluster), or this one.
    #[command(subcommand)]
    Node(node_cli::NodeCommand),
    /// Copy between here and a microVM: `kiln cp ./src mvm-…:/app`, `kiln cp mvm-…:/out.csv .`
    /// (directories travel as tar; `-` is stdin/stdout).
    Cp(files_cli::CpArgs),
    /// A microVM's files: stat, cat, mkdir, rm, mv, watch (`kiln ls ID:/path` lists).
    Fs {
        /// The guest user to act as (default: the image's user).
        #[arg(long)]
        user: Option<String>,
        #[command(subcommand)]
        cmd: files_cli::FsCommand,
    },
    /// Processes that run on in a microVM: start (and follow), ls, attach, wait, kill,
    /// stdin, resize.
    #[command(subcommand)]
    Proc(proc_cli::ProcCommand),
    #[command(flatten)]
    Remote(remote::Remote),
    /// Serve the Model Context Protocol on stdin/stdout: sandbox tools for AI agents.
    Mcp,
    /// Print a shell completion script: `source <(kiln completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if cli.no_jail {
        let _ = CONFINEMENT.set(kiln_vmm::Confinement::from_no_jail(true));
    }
    if let Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "kiln", &mut std::io::stdout());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let code = runtime.block_on(async {
        match cli.command {
            Command::Doctor { json } => {
                doctor::run(json, cli.conn.endpoint.clone()).map(|ok| if ok { 0 } else { 1 })
            }
            Command::Sandbox(args) => sandbox::run(args).await,
            Command::Bench(args) => bench::run(args).await.map(|()| 0),
            Command::Image(image_api::ImageCommand::Local(cmd)) => image::run(cmd).await,
            Command::Image(image_api::ImageCommand::Import { name, tarball }) => {
                image::import(&name, &tarball).await
            }
            Command::Image(cmd) => {
                let conn = cli.conn;
                Ok(tokio::task::spawn_blocking(move || image_api::run(conn, cmd)).await?)
            }
            Command::Completions { .. } => Ok(0),
            Command::Mcp => {
                let client = kiln_client::Client::from_env(
                    cli.conn.endpoint.clone(),
                    cli.conn.api_key.clone(),
                )?;
                mcp::serve(client).await
            }
            Command::Node(cmd) => {
                let conn = cli.conn;
                Ok(tokio::task::spawn_blocking(move || node_cli::run(conn, cmd)).await?)
            }
            Command::Webhook(cmd) => {
                let conn = cli.conn;
                Ok(tokio::task::spawn_blocking(move || webhook_cli::run(conn, cmd)).await?)
            }
            Command::Cp(args) => {
                let conn = cli.conn;
                Ok(tokio::task::spawn_blocking(move || files_cli::cp(conn, args)).await?)
            }
            Command::Fs { user, cmd } => {
                let conn = cli.conn;
                Ok(tokio::task::spawn_blocking(move || files_cli::fs(conn, cmd, user)).await?)
            }
            Command::Proc(cmd) => {
                let conn = cli.conn;
                Ok(tokio::task::spawn_blocking(move || proc_cli::run(conn, cmd)).await?)
            }
            Command::Remote(command) => {
                let conn = cli.conn;
                Ok(tokio::task::spawn_blocking(move || remote::run(conn, command)).await?)
            }
        }
    })?;
    std::process::exit(code);
}
