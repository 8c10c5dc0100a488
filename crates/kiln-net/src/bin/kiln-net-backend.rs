//! `kiln-net-backend`: one microVM's network stack, in a process of its own. kilnd starts it
//! (in its jail) with the configuration on standard input and the guest's link as
//! descriptor 3; it reports counters and denials on standard output and logs on standard
//! error. `--check-seccomp` installs the filter and proves it denies what it should.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use kiln_net::backend::{self, BackendConfig};

/// DNS lookups (the C library's resolver) run on this many blocking threads at most.
const LOOKUP_THREADS: usize = 8;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => serve(),
        [flag] if flag == "--check-seccomp" => check_seccomp(),
        _ => {
            eprintln!("usage: kiln-net-backend [--check-seccomp] (kilnd starts it; see kiln-net)");
            ExitCode::from(2)
        }
    }
}

fn serve() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let config = match BackendConfig::read(std::io::stdin().lock()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    // Before the runtime: every thread it starts inherits the filter.
    if let Err(e) = kiln_jail::seccomp::confine_helper() {
        return fail(&e);
    }
    // SAFETY: kilnd passes the guest's link as descriptor 3 and nothing else in this
    // process opened or owns it; from here the OwnedFd is its only owner.
    let link = unsafe { OwnedFd::from_raw_fd(3) };
    let link = std::os::unix::net::UnixStream::from(link);
    if let Err(e) = link.set_nonblocking(true) {
        return fail(&format!("descriptor 3 is not the guest's link: {e}"));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(LOOKUP_THREADS)
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async move {
        match tokio::net::UnixStream::from_std(link) {
            Ok(link) => {
                backend::run(link, config, tokio::io::stdout()).await;
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("descriptor 3 is not the guest's link: {e}")),
        }
    })
}

fn check_seccomp() -> ExitCode {
    if let Err(e) = kiln_jail::seccomp::confine_helper() {
        return fail(&e);
    }
    let report = kiln_jail::seccomp::probe_helper_filter();
    let mut out = std::io::stdout().lock();
    for line in &report.lines {
        let _ = writeln!(out, "{line}");
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("kiln-net-backend: {e}");
    ExitCode::FAILURE
}
