//! The jail every microVM's QEMU runs in, as Firecracker's jailer does for Firecracker: its
//! own uid and gid from a reserved range, new mount, PID, IPC, UTS, network and cgroup
//! namespaces, a root holding only that VM's files, cgroup limits on memory, pids and CPU,
//! no capabilities, `no_new_privs`, no inherited descriptors but those the spec passes.
//! QEMU's own seccomp filter (`-sandbox on,…,spawn=deny`) comes on top. Each microVM's
//! network backend gets the same jail with a uid of its own, except that it keeps the
//! host's network namespace, and [`seccomp`]'s filter instead of QEMU's.
//!
//! The set-up runs in a separate, single-threaded root process (`kiln-jailer`) that drops
//! before `exec`, so QEMU is unprivileged from its first instruction. [`sys`] holds every
//! system call; the rest of kiln asks for "this program with these files" ([`JailSpec`]).

pub mod cgroup;
pub mod jailer;
pub mod seccomp;
pub mod spec;
mod sys;
pub mod uids;

use std::path::{Path, PathBuf};

pub use cgroup::Cgroups;
pub use spec::{
    JailReport, JailSpec, Limits, Partition, ERROR_PREFIX, READY_PREFIX, UID_BASE, UID_SLOTS,
};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "{name} was not found next to {exe} (build it: cargo build -p {package}; or set {env})"
    )]
    NoHelper {
        name: &'static str,
        package: &'static str,
        env: &'static str,
        exe: PathBuf,
    },
    #[error("the jail could not be set up: {0}")]
    Failed(String),
    #[error("kiln-jailer said something unexpected before its report: {0:?}")]
    Garbled(String),
}

/// The `kiln-jailer` binary: `KILN_JAILER`, else next to the running program, else one
/// directory up (a test binary in `target/*/deps`).
pub fn jailer_path() -> Result<PathBuf, JailError> {
    helper_path("kiln-jailer", "kiln-jail", "KILN_JAILER")
}

/// One of kiln's own programs (`name`, built by cargo package `package`): the path in the
/// environment variable `env`, else next to the running program, else one directory up.
/// Canonical, since a jail binds it at that path.
pub fn helper_path(
    name: &'static str,
    package: &'static str,
    env: &'static str,
) -> Result<PathBuf, JailError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("/"));
    [dir.join(name), dir.join("..").join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
        .ok_or(JailError::NoHelper {
            name,
            package,
            env,
            exe,
        })
}

/// Makes `fds` descriptors 3, 4, … of the program `cmd` starts (directly, or through
/// the jailer with `keep_fds` set to their number).
pub fn pass_fds(
    cmd: &mut std::process::Command,
    fds: Vec<std::os::fd::OwnedFd>,
) -> std::io::Result<()> {
    sys::pass_fds(cmd, fds)
}

/// The jailer's command line for `spec`.
pub fn invocation(spec: &JailSpec) -> Result<(PathBuf, Vec<String>), JailError> {
    let json = serde_json::to_string(spec).map_err(|e| JailError::Failed(e.to_string()))?;
    Ok((jailer_path()?, vec!["--spec".into(), json]))
}

/// Reads the jailer's first line of standard error: the report, or why it failed.
pub fn parse_first_line(line: &str) -> Result<JailReport, JailError> {
    let line = line.trim_end();
    if let Some(json) = line.strip_prefix(READY_PREFIX) {
        return serde_json::from_str(json).map_err(|e| JailError::Garbled(format!("{e}: {json}")));
    }
    if let Some(reason) = line.strip_prefix(ERROR_PREFIX) {
        return Err(JailError::Failed(reason.to_string()));
    }
    Err(JailError::Garbled(line.chars().take(200).collect()))
}

/// Gives a jail's directories back to root once its program has ended, so no file of kiln's
/// stays owned by a uid another jail may get next.
pub fn reclaim(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    jailer::chown_tree(dir, 0, 0, false).map_err(std::io::Error::other)
}

/// Cleans what jails left behind when kilnd was killed: cgroups of uid slots nobody holds,
/// under `partition`'s cgroup root.
pub fn sweep(partition: &Partition) -> usize {
    cgroup::sweep(&partition.cgroup_root, uids::is_free)
}

/// Starts one throw-away jail (running `true`) and says whether every part of it worked:
/// kilnd refuses to start without it, naming the part that failed (unless `--no-jail`).
pub fn preflight(partition: &Partition) -> Result<JailReport, JailError> {
    use std::os::unix::fs::DirBuilderExt;
    let run_dir = uids::lock_path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/run/kiln/jail"));
    let dir = run_dir.join(format!("check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| JailError::Failed(format!("creating {}: {e}", dir.display())))?;
    let program = ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| JailError::Failed("no `true` program to start in a test jail".into()))?;
    let spec = JailSpec {
        program,
        args: Vec::new(),
        owned_dirs: vec![dir.clone()],
        read_only: Vec::new(),
        devices: Vec::new(),
        limits: Limits::new(64 << 20, 16, 0.5),
        die_with_parent: true,
        host_network: false,
        keep_fds: 0,
        partition: partition.clone(),
    };
    let (jailer, args) = invocation(&spec)?;
    let out = std::process::Command::new(&jailer)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| JailError::Failed(format!("running {}: {e}", jailer.display())));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = parse_first_line(stderr.lines().next().unwrap_or_default());
    if let Ok(r) = &report {
        let _ = r.cgroups.remove();
    }
    let report = report?;
    if !out.status.success() {
        return Err(JailError::Failed(format!(
            "a test jail ended with {}: {}",
            out.status,
            stderr.lines().skip(1).collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(report)
}

/// What this host's jail is made of, for `kiln doctor` and `/health`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JailFacts {
    pub uid_range: String,
    pub uids_in_use: usize,
    pub namespaces: Vec<&'static str>,
    /// `memory: v1 (/sys/fs/cgroup/memory/…/kiln)`, per controller.
    pub cgroups: Vec<String>,
    pub seccomp: String,
}

/// Describes the jail this host gives a kilnd using `partition` (without starting one).
pub fn facts(partition: &Partition) -> JailFacts {
    let cgroups = match cgroup::hierarchies() {
        Ok(hs) => hs
            .iter()
            .map(|h| {
                let v = if h.v2 { "v2" } else { "v1" };
                format!(
                    "{}: {v} ({})",
                    h.controller,
                    h.jails_dir(&partition.cgroup_root).display()
                )
            })
            .collect(),
        Err(e) => vec![format!("unavailable: {e}")],
    };
    let seccomp = if Path::new("/proc/sys/kernel/seccomp/actions_avail").exists() {
        format!(
            "QEMU: -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,\
             resourcecontrol=deny; network backend: {}",
            seccomp::HELPER_FILTER
        )
    } else {
        "unavailable: the kernel has no seccomp filter support".to_string()
    };
    JailFacts {
        uid_range: partition.uid_range(),
        uids_in_use: uids::in_use(1024).len(),
        namespaces: vec!["mount", "pid", "ipc", "uts", "net", "cgroup"],
        cgroups,
        seccomp,
    }
}

/// A process kiln started earlier and watches again (after kilnd restarted): a handle that
/// refers to that very process, whatever pid reuse happens later.
pub struct ProcessHandle {
    pidfd: std::os::fd::OwnedFd,
}

impl ProcessHandle {
    /// The process `pid`, if it is the one that started at `start_time` (clock ticks after
    /// boot, as `/proc/<pid>/stat` says): a pid the kernel has given to another process
    /// since is refused.
    pub fn open(pid: u32, start_time: u64) -> std::io::Result<ProcessHandle> {
        let pidfd = sys::pidfd_open(pid)?;
        // Checked after the handle is taken, so the handle is the process checked.
        if process_start_time(pid) != Some(start_time) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("process {pid} is not the one kiln started (its pid was reused)"),
            ));
        }
        Ok(ProcessHandle { pidfd })
    }

    pub fn kill(&self) -> std::io::Result<()> {
        sys::pidfd_send_signal(&self.pidfd, libc::SIGKILL)
    }
}

/// Readable once the process has ended.
impl std::os::fd::AsRawFd for ProcessHandle {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.pidfd.as_raw_fd()
    }
}

/// When process `pid` started (field 22 of `/proc/<pid>/stat`), to tell it from a later
/// process with the same pid.
pub fn process_start_time(pid: u32) -> Option<u64> {
    stat_field(pid, 22)?.parse().ok()
}

/// User + system CPU time of a process, in seconds, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    let utime: f64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: f64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime + stime) / sys::clock_ticks() as f64)
}

/// Field `n` (1-based, as proc(5) numbers them; 3 or more) of `/proc/<pid>/stat`.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    stat_fields(pid)?.into_iter().nth(n.checked_sub(3)?)
}

/// The fields of `/proc/<pid>/stat` from the third (state) on. The command name (field 2)
/// may hold spaces and parentheses, so the fields are those after its last ')'.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<Vec<String>> {
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(String::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and parentheses does not shift the fields.
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 1 0 7777 0 0";
        let f = parse_stat(stat).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[14 - 3], "250");
        assert_eq!(f[15 - 3], "50");
        assert_eq!(f[22 - 3], "7777");
        assert!(parse_stat("no parenthesis").is_none());
        let me = std::process::id();
        assert!(process_start_time(me).is_some());
        assert!(process_cpu_seconds(me).is_some());
    }

    #[test]
    fn the_first_line_is_the_report_or_the_reason() {
        let err = parse_first_line("kiln-jailer: error: cgroups: no memory controller\n");
        assert!(matches!(err, Err(JailError::Failed(r)) if r == "cgroups: no memory controller"));
        assert!(matches!(
            parse_first_line("qemu: something"),
            Err(JailError::Garbled(_))
        ));
        let c = cgroup::Controller {
            dir: "/sys/fs/cgroup/memory/kiln/vm-1".into(),
            v2: false,
        };
        let report = JailReport {
            uid: UID_BASE,
            gid: UID_BASE,
            pid: 42,
            cgroups: Cgroups {
                memory: c.clone(),
                pids: c.clone(),
                cpu: c.clone(),
                cpuacct: c,
            },
        };
        let line = format!(
            "{READY_PREFIX}{}\n",
            serde_json::to_string(&report).unwrap()
        );
        assert_eq!(parse_first_line(&line).unwrap(), report);
    }
}
