//! `kiln-net-backend`: one microVM's network stack, in a process of its own. kilnd starts it
//! (in its jail) with the configuration on standard input and the guest's link as
//! descriptor 3; it reports counters and denials on descriptor 4 (a connected stream, or
//! with `--listen` a listening socket whose newest reader gets them) and logs on standard
//! error. `--check-seccomp` installs the filter and proves it denies what it should.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use kiln_net::backend::{self, BackendConfig, Reports};

/// DNS lookups (the C library's resolver) run on this many blocking threads at most.
const LOOKUP_THREADS: usize = 8;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => serve(false),
        [flag] if flag == "--listen" => serve(true),
        [flag] if flag == "--check-seccomp" => check_seccomp(),
        _ => {
            eprintln!(
                "usage: kiln-net-backend [--listen | --check-seccomp] (kilnd starts it; see \
                 kiln-net)"
            );
            ExitCode::from(2)
        }
    }
}

fn serve(listen: bool) -> ExitCode {
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
    // SAFETY: kilnd passes the guest's link as descriptor 3 and the reports' socket as
    // descriptor 4; nothing else in this process opened or owns them, so from here each
    // OwnedFd is its descriptor's only owner.
    let (link, reports) = unsafe { (OwnedFd::from_raw_fd(3), OwnedFd::from_raw_fd(4)) };
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
        let link = match tokio::net::UnixStream::from_std(link) {
            Ok(link) => link,
            Err(e) => return fail(&format!("descriptor 3 is not the guest's link: {e}")),
        };
        let reports = match reports_on(reports, listen) {
            Ok(r) => r,
            Err(e) => return fail(&format!("descriptor 4 is not the reports' socket: {e}")),
        };
        backend::run(link, config, reports).await;
        ExitCode::SUCCESS
    })
}

/// Descriptor 4 as the reports' destination: a listener with `--listen`, else a stream.
fn reports_on(fd: OwnedFd, listen: bool) -> std::io::Result<Reports> {
    if listen {
        let l = std::os::unix::net::UnixListener::from(fd);
        l.set_nonblocking(true)?;
        return Ok(Reports::Listener(tokio::net::UnixListener::from_std(l)?));
    }
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    Ok(Reports::Stream(Box::new(tokio::net::UnixStream::from_std(
        s,
    )?)))
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
