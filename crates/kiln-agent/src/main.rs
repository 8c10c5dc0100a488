//! kiln-agent: the guest's PID 1.
//!
//! Started by the initramfs with `switch_root` into the image's root disk. It prepares the
//! guest (mounts, loopback), reaps every process, and serves the host over the
//! `kiln.agent` virtio-serial port: one session per host connection, each beginning with a
//! handshake that reseeds the RNG and sets the clock (so every restore gets fresh entropy
//! and the right time). See docs/ARCHITECTURE.md.

// A binary's output is its interface.
#![allow(clippy::print_stdout)]

mod app;
mod archive;
mod creds;
mod exec;
mod files;
mod forward;
mod fsops;
mod http;
mod init;
mod net;
mod port;
mod process;
mod procs;
mod pty;
mod reaper;
mod reseed;
mod resize;
mod server;
mod stats;
mod transfer;
mod user;
mod watch;

use std::time::Duration;

use tracing::{error, info, warn};

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .init();
    if std::process::id() == 1 {
        init::prepare_guest();
    } else {
        warn!("not running as PID 1: skipping guest set-up (test mode)");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(run());
}

async fn run() {
    let reaper = match reaper::Reaper::start() {
        Ok(reaper) => reaper,
        Err(e) => {
            error!("cannot install the SIGCHLD handler: {e}");
            std::process::exit(1);
        }
    };
    let state = server::AgentState::new(reaper);
    let port = loop {
        match port::Port::open_by_name(kiln_proto::AGENT_PORT_NAME) {
            Ok(port) => break port,
            Err(e) => {
                error!("cannot open the agent port yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    info!(
        "kiln-agent {} ready on {}",
        env!("CARGO_PKG_VERSION"),
        port.path().display()
    );
    server::serve_forever(port, state).await;
}
