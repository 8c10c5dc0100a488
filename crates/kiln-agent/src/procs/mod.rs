//! Processes that outlive their stream: the agent keeps each one it started (with
//! `ProcStart`) in a table, with its output in a bounded ring, until the table needs room
//! and it has exited. A host may attach, detach, control and wait for them at any time; a
//! suspend ends the host's session, not the processes.

mod attach;
mod ring;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::{
    ErrorKind, ExitStatus, GuestError, OutputStream, ProcInfo, ProcOp, ProcStartRequest, TermSize,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use attach::attach;
use ring::{Ring, RING_CAPACITY};

use crate::files::io_error;
use crate::reaper::Reaper;

/// Processes the table keeps, running or exited.
pub const MAX_PROCESSES: usize = 128;
/// After a process exits, how long output still held open by its children is read.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// The longest a stdin write waits for a process that does not read.
const STDIN_STALL: Duration = Duration::from_secs(5);
/// Bytes of a command line kept for listings.
const ARGV_SHOWN: usize = 2048;

pub struct Procs {
    reaper: Reaper,
    table: Mutex<BTreeMap<u32, Arc<Proc>>>,
}

/// One process the agent started.
pub struct Proc {
    pid: u32,
    argv: Vec<String>,
    cwd: Option<String>,
    user: Option<String>,
    tag: Option<String>,
    started_ms: i64,
    state: Mutex<State>,
    /// Bumped on new output and at the exit.
    changed: watch::Sender<u64>,
}

struct State {
    ring: Ring,
    exit: Option<ExitStatus>,
    size: Option<TermSize>,
    input: Input,
}

#[derive(Clone)]
enum Input {
    Closed,
    Pipe(mpsc::Sender<Vec<u8>>),
    Pty(Arc<OwnedFd>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_found(pid: u32) -> GuestError {
    GuestError::new(
        ErrorKind::NotFound,
        format!("no process {pid} started through the processes API"),
    )
}

impl Procs {
    pub fn new(reaper: Reaper) -> Procs {
        Procs {
            reaper,
            table: Mutex::default(),
        }
    }

    pub fn get(&self, pid: u32) -> Result<Arc<Proc>, GuestError> {
        lock(&self.table).get(&pid).cloned().ok_or(not_found(pid))
    }

    pub fn list(&self) -> Vec<ProcInfo> {
        lock(&self.table).values().map(|p| p.info()).collect()
    }

    pub fn start(&self, req: ProcStartRequest) -> Result<ProcInfo, GuestError> {
        if req.tag.as_ref().is_some_and(|t| t.len() > 256) {
            return Err(GuestError::new(
                ErrorKind::InvalidRequest,
                "a tag is at most 256 bytes",
            ));
        }
        self.make_room()?;
        let spawned = match req.pty {
            Some(size) => spawn_pty(&req, size, &self.reaper)?,
            None => spawn_piped(&req, &self.reaper)?,
        };
        let proc = Arc::new(Proc {
            pid: spawned.pid,
            argv: shown(&req.process.argv),
            cwd: req.process.cwd,
            user: req.process.user,
            tag: req.tag,
            started_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            state: Mutex::new(State {
                ring: Ring::new(RING_CAPACITY),
                exit: None,
                size: req.pty,
                input: spawned.input,
            }),
            changed: watch::Sender::new(0),
        });
        let readers = spawned
            .outputs
            .into_iter()
            .map(|source| tokio::spawn(read_output(source, proc.clone())))
            .collect();
        tokio::spawn(supervise(proc.clone(), spawned.exit, readers));
        // A pid reused by the kernel replaces the exited process that had it.
        lock(&self.table).insert(proc.pid, proc.clone());
        Ok(proc.info())
    }

    /// Forgets the oldest exited process when the table is full.
    fn make_room(&self) -> Result<(), GuestError> {
        let mut table = lock(&self.table);
        if table.len() < MAX_PROCESSES {
            return Ok(());
        }
        let oldest_exited = table
            .values()
            .filter(|p| lock(&p.state).exit.is_some())
            .min_by_key(|p| p.started_ms)
            .map(|p| p.pid);
        match oldest_exited {
            Some(pid) => {
                table.remove(&pid);
                Ok(())
            }
            None => Err(GuestError::new(
                ErrorKind::TooLarge,
                format!("{MAX_PROCESSES} processes are running: wait for or kill one first"),
            )),
        }
    }
}

/// A command line cut to [`ARGV_SHOWN`] bytes for listings.
fn shown(argv: &[String]) -> Vec<String> {
    let mut left = ARGV_SHOWN;
    let mut out = Vec::new();
    for arg in argv {
        if arg.len() > left {
            let mut cut = left;
            while !arg.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push(format!("{}…", &arg[..cut]));
            break;
        }
        left -= arg.len();
        out.push(arg.clone());
    }
    out
}

impl Proc {
    pub fn info(&self) -> ProcInfo {
        let st = lock(&self.state);
        let (output_start, output_end) = st.ring.bounds();
        ProcInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            tag: self.tag.clone(),
            pty: st.size,
            stdin_open: !matches!(st.input, Input::Closed),
            started_ms: self.started_ms,
            exit: st.exit,
            output_start,
            output_end,
        }
    }

    fn exited(&self) -> GuestError {
        GuestError::new(
            ErrorKind::Conflict,
            format!("process {} has exited", self.pid),
        )
    }

    pub async fn control(&self, op: ProcOp) -> Result<(), GuestError> {
        let input = {
            let st = lock(&self.state);
            match (&op, st.exit) {
                // Closing the stdin of a process that exited (perhaps as it read the bytes
                // written just before) asks for what already holds.
                (ProcOp::CloseStdin, Some(_)) => return Ok(()),
                (_, Some(_)) => return Err(self.exited()),
                (_, None) => st.input.clone(),
            }
        };
        match op {
            ProcOp::Signal(n) => {
                let sig = Signal::try_from(n).map_err(|_| {
                    GuestError::new(ErrorKind::InvalidRequest, format!("no signal number {n}"))
                })?;
                killpg(Pid::from_raw(self.pid as i32), sig)
                    .map_err(|e| io_error("kill", &self.pid.to_string(), e.into()))
            }
            ProcOp::Resize(size) => match input {
                Input::Pty(master) => {
                    crate::pty::resize(&master, size);
                    lock(&self.state).size = Some(size);
                    Ok(())
                }
                _ => Err(GuestError::new(
                    ErrorKind::InvalidRequest,
                    format!("process {} has no terminal to resize", self.pid),
                )),
            },
            ProcOp::Stdin(data) => self.write(input, &data).await,
            ProcOp::CloseStdin => match input {
                // The terminal's EOF character (^D): a reading program sees end of input.
                Input::Pty(master) => crate::pty::write_all(&master, b"\x04")
                    .await
                    .map_err(|e| io_error("write", "the terminal", e)),
                _ => {
                    lock(&self.state).input = Input::Closed;
                    Ok(())
                }
            },
        }
    }

    async fn write(&self, input: Input, data: &[u8]) -> Result<(), GuestError> {
        let closed = || {
            GuestError::new(
                ErrorKind::Conflict,
                format!(
                    "process {}'s stdin is closed (start it with stdin to write to it)",
                    self.pid
                ),
            )
        };
        let write = async {
            match input {
                Input::Closed => Err(closed()),
                Input::Pipe(tx) => tx.send(data.to_vec()).await.map_err(|_| closed()),
                Input::Pty(master) => crate::pty::write_all(&master, data)
                    .await
                    .map_err(|e| io_error("write", "the terminal", e)),
            }
        };
        tokio::time::timeout(STDIN_STALL, write)
            .await
            .unwrap_or_else(|_| {
                Err(GuestError::new(
                    ErrorKind::Conflict,
                    format!(
                        "process {} is not reading its input (it stayed full for {} s)",
                        self.pid,
                        STDIN_STALL.as_secs()
                    ),
                ))
            })
    }

    /// Waits for the exit, at most `timeout`.
    pub async fn wait(&self, timeout: Duration) -> ProcInfo {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            loop {
                rx.borrow_and_update();
                if lock(&self.state).exit.is_some() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.info()
    }

    fn push(&self, stream: OutputStream, data: &[u8]) {
        lock(&self.state).ring.push(stream, data);
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Where a process's output comes from.
enum Source {
    Pipe(OutputStream, OwnedFd),
    Pty(OwnedFd),
}

struct Spawned {
    pid: u32,
    input: Input,
    outputs: Vec<Source>,
    exit: oneshot::Receiver<ExitStatus>,
}

fn spawn_piped(req: &ProcStartRequest, reaper: &Reaper) -> Result<Spawned, GuestError> {
    let mut cmd = crate::process::command(&req.process)?;
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let (mut child, exit) = reaper
        .spawn(&mut cmd)
        .map_err(|e| io_error("spawn", &req.process.argv[0], e))?;
    let mut outputs = Vec::new();
    if let Some(fd) = child.stdout.take() {
        outputs.push(Source::Pipe(OutputStream::Stdout, fd.into()));
    }
    if let Some(fd) = child.stderr.take() {
        outputs.push(Source::Pipe(OutputStream::Stderr, fd.into()));
    }
    let input = match child.stdin.take() {
        Some(fd) => Input::Pipe(stdin_writer(fd.into())),
        None => Input::Closed,
    };
    Ok(Spawned {
        pid: child.id(),
        input,
        outputs,
        exit,
    })
}

fn spawn_pty(
    req: &ProcStartRequest,
    size: TermSize,
    reaper: &Reaper,
) -> Result<Spawned, GuestError> {
    let (child, exit, master) = crate::pty::spawn(&req.process, size, reaper)?;
    let _ = nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let reader = master
        .try_clone()
        .map_err(|e| io_error("dup", "the terminal", e))?;
    Ok(Spawned {
        pid: child.id(),
        input: Input::Pty(Arc::new(master)),
        outputs: vec![Source::Pty(reader)],
        exit,
    })
}

/// Writes queued stdin to the pipe; one write waits at most (a process that does not read
/// holds the agent to one write in the pipe and one queued).
fn stdin_writer(fd: OwnedFd) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
    tokio::spawn(async move {
        let Ok(mut pipe) = pipe::Sender::from_owned_fd(fd) else {
            return;
        };
        while let Some(data) = rx.recv().await {
            if pipe.write_all(&data).await.is_err() {
                return;
            }
        }
    });
    tx
}

async fn read_output(source: Source, proc: Arc<Proc>) {
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    match source {
        Source::Pipe(stream, fd) => {
            let Ok(mut rx) = pipe::Receiver::from_owned_fd(fd) else {
                return;
            };
            while let Ok(n @ 1..) = rx.read(&mut buf).await {
                proc.push(stream, &buf[..n]);
            }
        }
        Source::Pty(fd) => {
            // SAFETY: the AsyncFd owns this descriptor (a dup of the master), so nothing else
            // can close it while it is registered.
            let Ok(master) = (unsafe { AsyncFd::register(fd) }) else {
                return;
            };
            loop {
                let Ok(mut guard) = master.readable().await else {
                    return;
                };
                let read = guard.try_io(|fd| {
                    nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf)
                        .map_err(std::io::Error::from)
                });
                match read {
                    // EIO once every slave end is closed: the session is over.
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => proc.push(OutputStream::Stdout, &buf[..n]),
                    Err(_would_block) => {}
                }
            }
        }
    }
}

/// Records the exit once the process is reaped and its output drained (or the grace for
/// output held open by its children passed).
async fn supervise(
    proc: Arc<Proc>,
    exit: oneshot::Receiver<ExitStatus>,
    readers: Vec<JoinHandle<()>>,
) {
    let status = exit.await.unwrap_or_default();
    let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    let drained = async {
        for r in readers {
            let _ = r.await;
        }
    };
    let _ = tokio::time::timeout(DRAIN_GRACE, drained).await;
    aborts.iter().for_each(|a| a.abort());
    {
        let mut st = lock(&proc.state);
        st.exit = Some(status);
        st.input = Input::Closed;
    }
    proc.changed.send_modify(|n| *n += 1);
    tracing::debug!(pid = proc.pid, ?status, "process exited");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_command_lines_are_cut_for_listings() {
        let argv = vec!["sh".to_string(), "-c".to_string(), "é".repeat(2000)];
        let cut = shown(&argv);
        assert_eq!(cut.len(), 3);
        assert!(cut[2].ends_with('…'));
        assert!(cut.iter().map(String::len).sum::<usize>() <= ARGV_SHOWN + 4);
        assert_eq!(shown(&argv[..2]), argv[..2]);
    }
}
