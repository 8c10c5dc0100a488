//! Shell: a process on a new pseudo-terminal (its own session, the terminal as its
//! controlling tty), output streamed, input and resizes from the host, exit status at the end.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::{
    ExitStatus, FrameError, FramedStream, GuestError, GuestFrame, HostFrame, ShellRequest, Stream,
    TermSize,
};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_bytes::ByteBuf;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::files::io_error;
use crate::reaper::Reaper;

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_size(master: &OwnedFd, cols: u16, rows: u16) {
    let ws = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads one winsize struct, which lives for the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// Spawns `spec` on a new terminal of `size`: its own session, the terminal's slave side
/// as its stdio and controlling tty. Returns the child, its exit, and the master side.
pub fn spawn(
    spec: &kiln_proto::ProcessSpec,
    size: TermSize,
    reaper: &Reaper,
) -> Result<(Child, oneshot::Receiver<ExitStatus>, OwnedFd), GuestError> {
    let mut cmd = crate::process::base_command(spec)?;
    let pty = openpty(Some(&winsize(size.cols, size.rows)), None)
        .map_err(|e| io_error("openpty", "/dev/ptmx", e.into()))?;
    let slave = pty.slave;
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    let (i, o, e) = (stdio(&slave), stdio(&slave), stdio(&slave));
    let dup_err = |e: std::io::Error| io_error("dup", "pty", e);
    cmd.stdin(i.map_err(dup_err)?)
        .stdout(o.map_err(dup_err)?)
        .stderr(e.map_err(dup_err)?);
    // SAFETY: runs in the forked child before exec; setsid and ioctl are async-signal-safe
    // and touch only the child's own state (stdin is the terminal's slave side).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (child, exit) = reaper
        .spawn(&mut cmd)
        .map_err(|e| io_error("spawn", &spec.argv[0], e))?;
    drop(cmd);
    drop(slave);
    Ok((child, exit, pty.master))
}

/// Sets a terminal's size (the session's foreground group gets SIGWINCH).
pub fn resize(master: &OwnedFd, size: TermSize) {
    set_size(master, size.cols, size.rows)
}

/// Writes all of `data` to a non-blocking terminal master, waiting while it is full.
pub async fn write_all(master: &OwnedFd, data: &[u8]) -> std::io::Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        match nix::unistd::write(master, rest) {
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EAGAIN) => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub async fn run(
    mut framed: FramedStream<Stream>,
    req: ShellRequest,
    reaper: &Reaper,
) -> Result<(), FrameError> {
    let size = TermSize {
        cols: req.cols,
        rows: req.rows,
    };
    let (child, exit, master) = match spawn(&req.process, size, reaper) {
        Ok(s) => s,
        Err(e) => return framed.send(&GuestFrame::Error(e)).await,
    };
    let pid = child.id();
    framed.send(&GuestFrame::Started { pid }).await?;
    let _ = nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    // SAFETY: `master` owns its descriptor and stays alive (borrowed by the AsyncFd) until
    // this function returns; nothing else closes it meanwhile.
    let async_master =
        match unsafe { AsyncFd::register(master.try_clone().map_err(FrameError::Io)?) } {
            Ok(fd) => fd,
            Err(e) => return Err(FrameError::Io(e.into())),
        };
    let mut exit = exit;
    let mut status: Option<ExitStatus> = None;
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    let mut host_open = true;
    loop {
        tokio::select! {
            ready = async_master.readable() => {
                let mut guard = ready.map_err(FrameError::Io)?;
                match guard.try_io(|fd| nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf).map_err(std::io::Error::from)) {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        // EIO: every slave end is closed, the session is over.
                        if status.is_none() {
                            status = Some(exit.await.unwrap_or_default());
                        }
                        break;
                    }
                    Ok(Ok(n)) => framed.send(&GuestFrame::Stdout(ByteBuf::from(buf[..n].to_vec()))).await?,
                    Err(_would_block) => {}
                }
            }
            result = &mut exit, if status.is_none() => {
                status = Some(result.unwrap_or_default());
                // Drain what is left, then stop.
                loop {
                    match nix::unistd::read(master.as_raw_fd(), &mut buf) {
                        Ok(n) if n > 0 => framed.send(&GuestFrame::Stdout(ByteBuf::from(buf[..n].to_vec()))).await?,
                        _ => break,
                    }
                }
                break;
            }
            msg = framed.recv::<HostFrame>(), if host_open => match msg {
                Ok(Some(HostFrame::Stdin(data))) => {
                    let _ = write_all(&master, &data).await;
                }
                Ok(Some(HostFrame::Resize { cols, rows })) => set_size(&master, cols, rows),
                Ok(Some(HostFrame::Signal(n))) => {
                    if let Ok(sig) = Signal::try_from(n) {
                        let _ = killpg(Pid::from_raw(pid as i32), sig);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    // The host went away: hang up the terminal's session.
                    host_open = false;
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGHUP);
                }
            },
        }
    }
    framed
        .send(&GuestFrame::Exited(status.unwrap_or_default()))
        .await?;
    framed.close().await
}
