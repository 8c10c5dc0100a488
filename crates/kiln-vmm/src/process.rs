//! The QEMU process: spawned with its console captured into a size-capped log, watched for
//! exit, killed on request or (tests, the CLI) when the owning thread dies. kilnd's guests
//! outlive it: a [`ProcessRecord`] says which process to watch again after a restart, and
//! [`QemuProcess::adopt`] does (its console is a socket the new kilnd reconnects to).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

/// Console log size before it is rotated to `console.log.1` (so a guest that prints
/// forever uses at most twice this on the host disk).
pub const CONSOLE_LOG_CAP: u64 = 4 * 1024 * 1024;
/// Bytes of QEMU's own stderr kept for error reports.
const STDERR_CAP: usize = 64 * 1024;
/// What QEMU prints while it waits for the console's reader.
const CONSOLE_WAIT_NOTICE: &str = "QEMU waiting for connection on:";
/// What QEMU prints loading state that xen-save-devices-state wrote (kiln's diff resume).
const NO_VMDESCRIPTION_NOTICE: &str = "Expected vmdescription section";

/// How long the jailer may take to report (cgroups, ownership and mounts: milliseconds).
const JAIL_REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("Starting {} failed ({})", .what.name, .what.hint)]
    Spawn {
        what: Program,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Starting {} in its jail failed (jails need root; `--no-jail` is for development)",
        .what.name
    )]
    Jail {
        what: Program,
        #[source]
        source: kiln_jail::JailError,
    },
    #[error("Starting {} in its jail failed: kiln-jailer did not report within {after:?}", .what.name)]
    JailTimeout {
        what: Program,
        after: std::time::Duration,
    },
}

/// A program kiln starts per microVM: what errors call it and how to get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Program {
    pub name: &'static str,
    pub hint: &'static str,
}

pub(crate) const QEMU: Program = Program {
    name: "qemu-system-x86_64",
    hint: "scripts/setup.sh installs it",
};

/// How QEMU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Which program, as users know it ("QEMU", "the network backend").
    pub program: &'static str,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it: its jail's memory limit was reached.
    pub oom_killed: bool,
}

impl ExitInfo {
    fn unknown() -> ExitInfo {
        ExitInfo {
            program: "QEMU",
            code: None,
            signal: None,
            oom_killed: false,
        }
    }
}

/// A supervised program's name as users know it.
fn shown_name(what: &'static str) -> &'static str {
    match what {
        n if n == QEMU.name => "QEMU",
        n if n == crate::netproc::NET_BACKEND_NAME => "the network backend",
        other => other,
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let program = self.program;
        if self.oom_killed {
            return write!(
                f,
                "out of memory: {program} reached its jail's memory limit and the kernel killed it"
            );
        }
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "{program} exited with code {code}"),
            (None, Some(sig)) => write!(f, "{program} was killed by signal {sig}"),
            (None, None) => write!(f, "{program} ended for an unknown reason"),
        }
    }
}

/// What kiln keeps of a process it started, to watch it again after kilnd restarted:
/// kilnd writes it to its own store (never into the VM's directory, which a jailed QEMU
/// owns).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    /// The program's host pid.
    pub pid: u32,
    /// When it started (clock ticks after boot): a reused pid is not mistaken for it.
    pub start_time: u64,
    /// Its jail (`None` with `--no-jail`).
    pub jail: Option<kiln_jail::JailReport>,
    /// The directories its jail owns while it runs (given back to root when it ends).
    pub owned_dirs: Vec<PathBuf>,
}

pub struct QemuProcess {
    /// Its pid and jail (`None` with `--no-jail`), as a later kilnd needs them.
    record: ProcessRecord,
    supervisor: Supervisor,
    console: PathBuf,
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// A program kiln started, directly or through the jailer, before its report is read.
pub(crate) struct Started {
    what: Program,
    pub child: tokio::process::Child,
    pub stderr: tokio::io::BufReader<tokio::process::ChildStderr>,
    jail: Option<kiln_jail::JailSpec>,
}

/// Starts `program` with `args`: through the jailer under `jail` (the program and arguments
/// go into the spec), else directly. `pass` become its descriptors 3, 4, …; its standard
/// error is piped (the jailer's report comes first on it).
pub(crate) fn start(
    what: Program,
    program: &Path,
    args: &[String],
    jail: Option<kiln_jail::JailSpec>,
    pass: Vec<std::os::fd::OwnedFd>,
    die_with_parent: bool,
    stdin: Stdio,
) -> Result<Started, ProcessError> {
    let mut cmd = match &jail {
        Some(spec) => {
            let mut spec = spec.clone();
            spec.args = args.to_vec();
            spec.keep_fds = pass.len() as u32;
            let (jailer, jailer_args) = kiln_jail::invocation(&spec)
                .map_err(|source| ProcessError::Jail { what, source })?;
            let mut cmd = std::process::Command::new(jailer);
            cmd.args(jailer_args);
            cmd
        }
        None => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args);
            cmd
        }
    };
    // Nothing reads a program's standard output: QEMU's console and the network backend's
    // reports go to sockets that outlive kilnd.
    cmd.stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !pass.is_empty() {
        kiln_jail::pass_fds(&mut cmd, pass)
            .map_err(|source| ProcessError::Spawn { what, source })?;
    }
    if die_with_parent {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // prctl system call, which is async-signal-safe; it touches no shared state.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut cmd = Command::from(cmd);
    // A program meant to outlive kilnd must outlive its handle too (kilnd stopping).
    cmd.kill_on_drop(die_with_parent);
    let mut child = cmd
        .spawn()
        .map_err(|source| ProcessError::Spawn { what, source })?;
    let stderr = child
        .stderr
        .take()
        .map(tokio::io::BufReader::new)
        .ok_or_else(|| ProcessError::Spawn {
            what,
            source: std::io::Error::other("no stderr pipe"),
        })?;
    Ok(Started {
        what,
        child,
        stderr,
        jail,
    })
}

impl Started {
    /// Reads the jail's report (if jailed) and watches the program from then on: its host
    /// pid, its jail, and the handle that kills it and tells how it ended.
    pub async fn supervise(mut self) -> Result<Supervised, ProcessError> {
        let what = self.what;
        let report = match &self.jail {
            Some(_) => Some(read_report(what, &mut self.stderr, &mut self.child).await?),
            None => None,
        };
        let pid = report
            .as_ref()
            .map(|r| r.pid)
            .unwrap_or_else(|| self.child.id().unwrap_or(0));
        let owned_dirs = self.jail.map(|j| j.owned_dirs).unwrap_or_default();
        let record = ProcessRecord {
            pid,
            start_time: kiln_jail::process_start_time(pid).unwrap_or(0),
            jail: report.clone(),
            owned_dirs: owned_dirs.clone(),
        };
        let supervisor = Supervisor::watch(self.child, pid, report.clone(), owned_dirs, what.name);
        Ok(Supervised {
            supervisor,
            stderr: self.stderr,
            record,
        })
    }
}

/// A started program once its jail reported: what follows on its stderr is its own.
pub(crate) struct Supervised {
    pub supervisor: Supervisor,
    pub stderr: tokio::io::BufReader<tokio::process::ChildStderr>,
    pub record: ProcessRecord,
}

/// Watches one started program: kills it on request, reaps it, releases its jail, and
/// tells how it ended.
pub(crate) struct Supervisor {
    exit: watch::Receiver<Option<ExitInfo>>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
}

impl Supervisor {
    fn watch(
        mut child: tokio::process::Child,
        pid: u32,
        report: Option<kiln_jail::JailReport>,
        owned_dirs: Vec<PathBuf>,
        what: &'static str,
    ) -> Supervisor {
        let (exit_tx, exit) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let cgroups = report.as_ref().map(|r| r.cgroups.clone());
        let jailed_pid = report.as_ref().map(|r| r.pid);
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                // Only a kill asked for: a handle dropped leaves the program running.
                Ok(()) = kill_rx => kill_and_reap(&mut child, jailed_pid).await,
            };
            let info = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    ExitInfo {
                        program: shown_name(what),
                        code: s.code(),
                        signal: s.signal(),
                        oom_killed: false,
                    }
                }
                Err(_) => ExitInfo::unknown(),
            };
            ended(info, pid, cgroups, &owned_dirs, what, exit_tx).await;
        });
        Supervisor {
            exit,
            kill: Mutex::new(Some(kill_tx)),
        }
    }

    /// Watches again a process an earlier kilnd started (it is not this process's child:
    /// its end is seen through a pidfd, and how it ended is not known beyond the OOM
    /// killer's count). Fails when that process is gone.
    pub fn adopt(record: &ProcessRecord, what: &'static str) -> std::io::Result<Supervisor> {
        let handle = kiln_jail::ProcessHandle::open(record.pid, record.start_time)?;
        // SAFETY: the handle owns its pidfd, and the AsyncFd owns the handle until it is
        // dropped: nothing else closes or replaces the descriptor while it is registered.
        let handle = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(handle, tokio::io::Interest::READABLE)?
        };
        let (exit_tx, exit) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let cgroups = record.jail.as_ref().map(|r| r.cgroups.clone());
        let (pid, owned_dirs) = (record.pid, record.owned_dirs.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = handle.readable() => {}
                Ok(()) = kill_rx => {
                    let _ = handle.get_ref().kill();
                    let _ = handle.readable().await;
                }
            }
            ended(
                ExitInfo::unknown(),
                pid,
                cgroups,
                &owned_dirs,
                what,
                exit_tx,
            )
            .await;
        });
        Ok(Supervisor {
            exit,
            kill: Mutex::new(Some(kill_tx)),
        })
    }

    /// The end of the process, for tasks that follow it (the console's reader).
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    pub fn exited(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    pub async fn wait(&self) -> ExitInfo {
        let mut exit = self.exit.clone();
        let result = exit.wait_for(|e| e.is_some()).await.map(|e| e.clone());
        result.ok().flatten().unwrap_or_else(ExitInfo::unknown)
    }

    /// Asks for SIGKILL (once), without waiting.
    pub fn start_kill(&self) {
        if let Some(tx) = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
    }

    pub async fn kill(&self) -> ExitInfo {
        self.start_kill();
        self.wait().await
    }
}

impl ProcessRecord {
    /// Kills the recorded process if it still runs (a leftover of an interrupted start);
    /// a pid given to another process since is left alone. Says whether it killed.
    pub fn kill_if_running(&self) -> bool {
        kiln_jail::ProcessHandle::open(self.pid, self.start_time)
            .and_then(|h| h.kill())
            .is_ok()
    }

    /// Once the process has ended (killed, or found gone): removes its jail's cgroups (they
    /// empty as its jailer ends) and gives its directories back to root.
    pub async fn release_jail(&self) {
        if let Some(jail) = &self.jail {
            release_jail(&jail.cgroups, &self.owned_dirs).await;
        }
    }
}

/// What follows a watched process's end: the OOM killer's verdict, its jail released, the
/// news sent.
async fn ended(
    mut info: ExitInfo,
    pid: u32,
    cgroups: Option<kiln_jail::Cgroups>,
    owned_dirs: &[PathBuf],
    what: &'static str,
    exit_tx: watch::Sender<Option<ExitInfo>>,
) {
    info.program = shown_name(what);
    if let Some(cgroups) = cgroups {
        info.oom_killed = cgroups.oom_kills() > 0;
        release_jail(&cgroups, owned_dirs).await;
    }
    info!(pid, %info, "{what} process ended");
    let _ = exit_tx.send(Some(info));
}

/// A jailed program is killed itself: its jailer then reaps it and ends, so once the
/// jailer is reaped the program is gone too.
async fn kill_and_reap(
    child: &mut tokio::process::Child,
    jailed_pid: Option<u32>,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = jailed_pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let Ok(status) =
            tokio::time::timeout(std::time::Duration::from_secs(10), child.wait()).await
        {
            return status;
        }
    }
    let _ = child.start_kill();
    child.wait().await
}

impl QemuProcess {
    /// Starts QEMU, in the jail `jail` describes unless it is `None`. With
    /// `die_with_parent`, the kernel kills QEMU when the spawning thread exits, so a crashed
    /// or killed host process never leaves guests behind.
    /// `pass` become QEMU's descriptors 3, 4, … (the network link). QEMU serves its console
    /// on `console_socket` and waits for this reader before it starts the guest; the reader
    /// copies it into `console`.
    pub async fn spawn(
        args: &[OsString],
        console_socket: &Path,
        console: &Path,
        die_with_parent: bool,
        jail: Option<kiln_jail::JailSpec>,
        pass: Vec<std::os::fd::OwnedFd>,
    ) -> Result<QemuProcess, ProcessError> {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let program = Path::new(QEMU.name);
        let started = start(
            QEMU,
            program,
            &args,
            jail,
            pass,
            die_with_parent,
            Stdio::null(),
        )?;
        let s = started.supervise().await?;
        tokio::spawn(capture_console(
            console_socket.to_path_buf(),
            console.to_path_buf(),
            s.supervisor.exit_watch(),
        ));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(capture_stderr(s.stderr, stderr.clone(), "qemu"));
        Ok(QemuProcess {
            record: s.record,
            supervisor: s.supervisor,
            console: console.to_path_buf(),
            stderr,
        })
    }

    /// Watches again the QEMU an earlier kilnd started, and reads its console again (what
    /// it printed while nobody read is gone). Fails when that QEMU is gone.
    pub fn adopt(
        record: &ProcessRecord,
        console_socket: &Path,
        console: &Path,
    ) -> std::io::Result<QemuProcess> {
        let supervisor = Supervisor::adopt(record, QEMU.name)?;
        tokio::spawn(capture_console(
            console_socket.to_path_buf(),
            console.to_path_buf(),
            supervisor.exit_watch(),
        ));
        Ok(QemuProcess {
            record: record.clone(),
            supervisor,
            console: console.to_path_buf(),
            stderr: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// What a later kilnd needs to watch this QEMU again.
    pub fn record(&self) -> &ProcessRecord {
        &self.record
    }

    /// The jail QEMU runs in, if it is jailed.
    pub fn jail(&self) -> Option<&kiln_jail::JailReport> {
        self.record.jail.as_ref()
    }

    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// How QEMU ended, if it has.
    pub fn exited(&self) -> Option<ExitInfo> {
        self.supervisor.exited()
    }

    /// Waits for QEMU to end.
    pub async fn wait(&self) -> ExitInfo {
        self.supervisor.wait().await
    }

    /// Sends SIGKILL (once) and waits for the process to be reaped.
    pub async fn kill(&self) -> ExitInfo {
        self.supervisor.kill().await
    }

    /// Sends SIGKILL (once) without waiting (its supervisor reaps it and releases its jail).
    pub fn start_kill(&self) {
        self.supervisor.start_kill();
    }

    /// The last `max_bytes` of the guest console, then QEMU's own error output.
    pub fn diagnostics(&self, max_bytes: usize) -> String {
        let mut text = tail_of_file(&self.console, max_bytes);
        let stderr = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        if !stderr.is_empty() {
            text.push_str("\n--- qemu stderr ---\n");
            text.push_str(&String::from_utf8_lossy(&stderr));
        }
        text
    }
}

/// The jailer's first line: its report, or why it failed (then it has exited).
pub(crate) async fn read_report(
    what: Program,
    reader: &mut tokio::io::BufReader<tokio::process::ChildStderr>,
    child: &mut tokio::process::Child,
) -> Result<kiln_jail::JailReport, ProcessError> {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    let read = tokio::time::timeout(JAIL_REPORT_TIMEOUT, async {
        // A line is bounded: the report is a few hundred bytes.
        let mut limited = (&mut *reader).take(64 * 1024);
        limited.read_line(&mut line).await
    })
    .await;
    match read {
        Ok(Ok(_)) => kiln_jail::parse_first_line(&line).map_err(|e| {
            let _ = child.start_kill();
            ProcessError::Jail { what, source: e }
        }),
        Ok(Err(source)) => Err(ProcessError::Spawn { what, source }),
        Err(_) => {
            let _ = child.start_kill();
            Err(ProcessError::JailTimeout {
                what,
                after: JAIL_REPORT_TIMEOUT,
            })
        }
    }
}

/// After a jailed QEMU ended: its cgroups go, its directories go back to root.
async fn release_jail(cgroups: &kiln_jail::Cgroups, owned_dirs: &[PathBuf]) {
    let cgroups = cgroups.clone();
    let dirs = owned_dirs.to_vec();
    let done = tokio::task::spawn_blocking(move || {
        // The waiter's exit is reported before the kernel has always emptied the cgroup.
        for _ in 0..300 {
            match cgroups.remove() {
                Err(kiln_jail::cgroup::CgroupError::Busy(_)) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => {
                    warn!("removing a jail's cgroups: {e}");
                    break;
                }
                Ok(()) => break,
            }
        }
        for dir in dirs {
            if let Err(e) = kiln_jail::reclaim(&dir) {
                warn!(dir = %dir.display(), "giving a jail's directory back to root: {e}");
            }
        }
    });
    let _ = done.await;
}

/// Reads the last `max_bytes` of a file as text (lossy).
pub fn tail_of_file(path: &Path, max_bytes: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    // A link planted by a jailed QEMU in its directory is not followed (it could name a
    // secret of the host's, shown to clients in crash reports).
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max_bytes as u64)));
    let mut buf = Vec::new();
    let _ = f.take(max_bytes as u64).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Copies the console QEMU serves on `socket` into `path`, rotating at [`CONSOLE_LOG_CAP`],
/// connecting again whenever the connection drops, until QEMU has ended.
async fn capture_console(
    socket: PathBuf,
    path: PathBuf,
    mut exit: watch::Receiver<Option<ExitInfo>>,
) {
    // The VM's directory is its (jailed) QEMU's: never follow a link planted there.
    async fn open(p: &Path) -> std::io::Result<tokio::fs::File> {
        tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(p)
            .await
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let connected = tokio::select! {
            c = connect_when_served(&socket) => c,
            _ = exit.wait_for(|e| e.is_some()) => return,
        };
        let Ok(mut out) = connected else { return };
        let Ok(mut file) = open(&path).await else {
            warn!(path = %path.display(), "cannot open the console log");
            return;
        };
        let mut written = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        loop {
            let n = match out.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if written + n as u64 > CONSOLE_LOG_CAP {
                let _ = tokio::fs::rename(&path, path.with_extension("log.1")).await;
                match open(&path).await {
                    Ok(f) => file = f,
                    Err(_) => return,
                }
                written = 0;
            }
            if file.write_all(&buf[..n]).await.is_err() {
                return;
            }
            written += n as u64;
        }
        if exit.borrow().is_some() {
            return;
        }
    }
}

/// Connects to a socket QEMU is about to serve, trying every millisecond (QEMU waits for
/// this connection before it starts the guest, so the wait is part of every launch).
async fn connect_when_served(socket: &Path) -> std::io::Result<tokio::net::UnixStream> {
    loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await
            }
            Err(e) => return Err(e),
        }
    }
}

/// Logs a program's standard error line by line (lines cut at 4 KiB) and keeps its last
/// [`STDERR_CAP`] bytes for error reports.
pub(crate) async fn capture_stderr(
    err: impl AsyncRead + Unpin,
    keep: Arc<Mutex<Vec<u8>>>,
    what: &'static str,
) {
    use tokio::io::AsyncBufReadExt;
    let mut err = tokio::io::BufReader::new(err);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut err).take(4096).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        // QEMU says it waits for the console's reader on every start: not news.
        if text.trim().is_empty() || text.contains(CONSOLE_WAIT_NOTICE) {
            continue;
        }
        // A devices-only state (a diff resume) has no description section by design.
        if text.contains(NO_VMDESCRIPTION_NOTICE) {
            tracing::debug!("{what}: {text}");
            continue;
        }
        warn!("{what}: {text}");
        let mut keep = keep.lock().unwrap_or_else(|p| p.into_inner());
        keep.extend_from_slice(text.as_bytes());
        keep.push(b'\n');
        let excess = keep.len().saturating_sub(STDERR_CAP);
        keep.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_names_the_program_that_ended() {
        let backend = ExitInfo {
            program: shown_name(crate::netproc::NET_BACKEND_NAME),
            code: None,
            signal: Some(9),
            oom_killed: false,
        };
        assert_eq!(
            backend.to_string(),
            "the network backend was killed by signal 9"
        );
        let qemu = ExitInfo {
            program: shown_name(QEMU.name),
            oom_killed: true,
            ..backend
        };
        assert!(
            qemu.to_string().starts_with("out of memory: QEMU reached"),
            "{qemu}"
        );
    }

    #[test]
    fn links_planted_in_a_vm_directory_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "host secret").unwrap();
        let vm = dir.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let console = vm.join("console.log");
        std::os::unix::fs::symlink(&secret, &console).unwrap();
        assert_eq!(
            tail_of_file(&console, 100),
            "",
            "a crash report never shows it"
        );
        let pid = vm.join("qemu.pid");
        std::os::unix::fs::symlink(&secret, &pid).unwrap();
        crate::vm::write_new(&pid, b"42\n").unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host secret");
        assert_eq!(std::fs::read_to_string(&pid).unwrap(), "42\n");
    }
}
