//! A microVM's network backend process (`kiln-net-backend`): started beside QEMU, jailed
//! like it (own uid, mount/PID/IPC/UTS namespaces, cgroups, kiln's seccomp filter) but in
//! the host's network namespace, since it makes the guest's outbound connections. The
//! guest's link is a socket pair: one end is QEMU's `-netdev stream` (descriptor 3), the
//! other the backend's (descriptor 3). Its reports (counters, denials) come on descriptor
//! 4 and land in the caller's [`NetCounters`] and [`DenialSink`]: a socket pair, or for
//! kilnd's microVMs a listening socket at a path of kilnd's (`control`), so that a kilnd
//! that restarts reads them again from the backend that kept serving the guest.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_jail::{JailSpec, Limits};
use kiln_net::backend::{BackendConfig, BackendEvent, MAX_EVENT_LINE};
use kiln_net::{DenialSink, EgressPolicy, NetCounters};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tracing::{warn, Instrument};

use crate::confine::Confinement;
use crate::process::{self, ProcessError, ProcessRecord, Program, Supervisor};

/// The network backend's program name.
pub(crate) const NET_BACKEND_NAME: &str = "kiln-net-backend";

pub(crate) const NET_BACKEND: Program = Program {
    name: NET_BACKEND_NAME,
    hint: "build it: cargo build -p kiln-net; or set KILN_NET_BACKEND",
};

/// The backend's memory: at most 256 connections with 64 KiB each way in the stack and
/// 64 KiB in flight each, the link queues, the runtime.
pub const NET_MEMORY_MIB: u64 = 160;
/// Its main thread, the resolver's threads, and the jailer waiting on it.
const NET_PIDS: u64 = 32;
/// Its CPU quota, in CPUs.
const NET_CPUS: f64 = 1.0;
/// How long a backend may take to end after its guest's link closed (it reports its last
/// counters first) before it is killed.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Files the C library's resolver reads (for names `internet` and allowlists resolve).
const RESOLVER_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
];

pub(crate) struct NetBackendProcess {
    supervisor: Supervisor,
    reports: Mutex<Option<tokio::task::JoinHandle<()>>>,
    record: ProcessRecord,
    /// The listening socket's path, removed once the backend has ended.
    control: Option<PathBuf>,
    /// Killed when dropped, unless left running for a later kilnd.
    kill_on_drop: bool,
}

/// Where the backend's reports come from: its descriptor 4, and kiln's end.
struct ReportChannel {
    backend_fd: OwnedFd,
    /// A socket-pair end, or `None` for a listener (kiln connects once it runs).
    reader: Option<std::os::unix::net::UnixStream>,
}

impl ReportChannel {
    fn new(control: Option<&Path>) -> std::io::Result<ReportChannel> {
        let Some(path) = control else {
            let (reader, backend) = std::os::unix::net::UnixStream::pair()?;
            return Ok(ReportChannel {
                backend_fd: backend.into(),
                reader: Some(reader),
            });
        };
        use std::os::unix::fs::PermissionsExt;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ReportChannel {
            backend_fd: listener.into(),
            reader: None,
        })
    }
}

impl NetBackendProcess {
    /// Starts the backend on `link` (its end of the guest's socket pair). With `control`,
    /// its reports are served at that path (kilnd's microVMs); else on a socket pair.
    #[allow(clippy::too_many_arguments)]
    pub async fn spawn(
        policy: &EgressPolicy,
        counters: &Arc<NetCounters>,
        denials: &DenialSink,
        link: OwnedFd,
        confinement: &Confinement,
        die_with_parent: bool,
        control: Option<&Path>,
    ) -> Result<NetBackendProcess, ProcessError> {
        let spawn_err = |source| ProcessError::Spawn {
            what: NET_BACKEND,
            source,
        };
        let program = kiln_jail::helper_path(NET_BACKEND.name, "kiln-net", "KILN_NET_BACKEND")
            .map_err(|source| ProcessError::Jail {
                what: NET_BACKEND,
                source,
            })?;
        let jail = confinement
            .is_jailed()
            .then(|| jail_spec(&program, die_with_parent, confinement.partition()));
        let channel = ReportChannel::new(control).map_err(spawn_err)?;
        let args: Vec<String> = control
            .map(|_| "--listen".to_string())
            .into_iter()
            .collect();
        let mut started = process::start(
            NET_BACKEND,
            &program,
            &args,
            jail,
            vec![link, channel.backend_fd],
            die_with_parent,
            Stdio::piped(),
        )?;
        let config = BackendConfig {
            policy: policy.clone(),
            counters: counters.snapshot(),
        };
        let json = serde_json::to_vec(&config).map_err(|e| spawn_err(e.into()))?;
        if let Some(mut stdin) = started.child.stdin.take() {
            // Written before the report is read: the pipe holds it while the jail is set up.
            tokio::spawn(async move {
                let _ = stdin.write_all(&json).await;
            });
        }
        let s = started.supervise().await?;
        tokio::spawn(
            process::capture_stderr(s.stderr, Arc::new(Mutex::new(Vec::new())), "net backend")
                .in_current_span(),
        );
        let reader = match (channel.reader, control) {
            (Some(pair), _) => {
                pair.set_nonblocking(true).map_err(spawn_err)?;
                tokio::net::UnixStream::from_std(pair).map_err(spawn_err)?
            }
            // The listener queues this connection until the backend accepts it.
            (None, Some(path)) => tokio::net::UnixStream::connect(path)
                .await
                .map_err(spawn_err)?,
            (None, None) => return Err(spawn_err(std::io::Error::other("no report channel"))),
        };
        let reports =
            tokio::spawn(read_reports(reader, counters.clone(), denials.clone()).in_current_span());
        Ok(NetBackendProcess {
            supervisor: s.supervisor,
            reports: Mutex::new(Some(reports)),
            record: s.record,
            control: control.map(Path::to_path_buf),
            kill_on_drop: true,
        })
    }

    /// Watches again the backend an earlier kilnd started and reads its reports again at
    /// `control` (it sends its totals first). Fails when that backend is gone.
    pub async fn adopt(
        record: &ProcessRecord,
        control: &Path,
        counters: &Arc<NetCounters>,
        denials: &DenialSink,
    ) -> std::io::Result<NetBackendProcess> {
        let supervisor = Supervisor::adopt(record, NET_BACKEND.name)?;
        let reader = match tokio::net::UnixStream::connect(control).await {
            Ok(r) => r,
            Err(e) => {
                supervisor.kill().await;
                return Err(e);
            }
        };
        let reports =
            tokio::spawn(read_reports(reader, counters.clone(), denials.clone()).in_current_span());
        Ok(NetBackendProcess {
            supervisor,
            reports: Mutex::new(Some(reports)),
            record: record.clone(),
            control: Some(control.to_path_buf()),
            kill_on_drop: true,
        })
    }

    /// What a later kilnd needs to watch this backend again.
    pub fn record(&self) -> &ProcessRecord {
        &self.record
    }

    /// Leaves the backend running when this handle goes (kilnd stops; a later one adopts).
    pub fn leave_running(mut self) {
        self.kill_on_drop = false;
    }

    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    pub fn jail(&self) -> Option<&kiln_jail::JailReport> {
        self.record.jail.as_ref()
    }

    /// Once QEMU has ended: lets the backend report its last counters and end, killing it
    /// if it does not within [`FINISH_TIMEOUT`].
    pub async fn finish(&self) {
        if tokio::time::timeout(FINISH_TIMEOUT, self.supervisor.wait())
            .await
            .is_err()
        {
            warn!(
                pid = self.record.pid,
                "the network backend outlived its guest's link: killed"
            );
        }
        self.supervisor.kill().await;
        let reports = self
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(reports) = reports {
            let _ = tokio::time::timeout(FINISH_TIMEOUT, reports).await;
        }
        if let Some(path) = &self.control {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for NetBackendProcess {
    fn drop(&mut self) {
        if self.kill_on_drop {
            self.supervisor.start_kill();
        }
    }
}

/// The backend's jail: nothing of `KILN_HOME`, only its program, the resolver's files and
/// the system's libraries; the host's network namespace.
fn jail_spec(program: &Path, die_with_parent: bool, partition: kiln_jail::Partition) -> JailSpec {
    JailSpec {
        program: program.to_path_buf(),
        args: Vec::new(),
        owned_dirs: Vec::new(),
        read_only: RESOLVER_FILES
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect(),
        devices: Vec::new(),
        limits: Limits::new(NET_MEMORY_MIB << 20, NET_PIDS, NET_CPUS),
        die_with_parent,
        host_network: true,
        keep_fds: 2,
        partition,
    }
}

/// Applies the backend's report lines: counters are totals, denials go to the sink. Lines
/// are bounded; anything else is dropped (the backend handles hostile traffic).
async fn read_reports(
    out: tokio::net::UnixStream,
    counters: Arc<NetCounters>,
    denials: DenialSink,
) {
    let mut out = tokio::io::BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = (MAX_EVENT_LINE + 1) as u64;
        match (&mut out).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            // Over-long: skip to its end, a bounded piece at a time.
            loop {
                line.clear();
                match (&mut out).take(limit).read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
            continue;
        }
        let Some(event) = std::str::from_utf8(&line)
            .ok()
            .and_then(BackendEvent::parse)
        else {
            continue;
        };
        match event {
            BackendEvent::Counters { counters: c } => {
                counters.bytes_out.store(c.bytes_out, Ordering::Relaxed);
                counters.bytes_in.store(c.bytes_in, Ordering::Relaxed);
                counters.connections.store(c.connections, Ordering::Relaxed);
                counters.denials.store(c.denials, Ordering::Relaxed);
                counters.dns_queries.store(c.dns_queries, Ordering::Relaxed);
            }
            denial @ BackendEvent::Denial { .. } => {
                if let Some(d) = denial.into_denial() {
                    denials(d);
                }
            }
        }
    }
}

/// Finds `kiln-net-backend` and has it prove its seccomp filter (`--check-seccomp`):
/// kilnd refuses to start without a working backend, `kiln doctor` shows the result.
pub fn check_net_backend() -> Result<PathBuf, String> {
    let program = kiln_jail::helper_path(NET_BACKEND.name, "kiln-net", "KILN_NET_BACKEND")
        .map_err(|e| e.to_string())?;
    let out = std::process::Command::new(&program)
        .arg("--check-seccomp")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", program.display()))?;
    if out.status.success() {
        return Ok(program);
    }
    let said = String::from_utf8_lossy(&out.stdout);
    let wrong: Vec<&str> = said.lines().filter(|l| l.ends_with("(WRONG)")).collect();
    Err(format!(
        "{} --check-seccomp ended with {}: {}{}",
        program.display(),
        out.status,
        wrong.join("; "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}
