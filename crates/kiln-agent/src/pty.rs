//! Shell: a process on a new pseudo-terminal (its own session, the terminal as its
//! controlling tty), output streamed, input and resizes from the host, exit status at the end.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::{
    ExitStatus, FrameError, FramedStream, GuestFrame, HostFrame, ShellRequest, Stream,
};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_bytes::ByteBuf;
use tokio::io::unix::AsyncFd;

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

pub async fn run(
    mut framed: FramedStream<Stream>,
    req: ShellRequest,
    reaper: &Reaper,
) -> Result<(), FrameError> {
    let mut cmd = match crate::process::base_command(&req.process) {
        Ok(c) => c,
        Err(e) => return framed.send(&GuestFrame::Error(e)).await,
    };
    let pty = match openpty(Some(&winsize(req.cols, req.rows)), None) {
        Ok(p) => p,
        Err(e) => {
            return framed
                .send(&GuestFrame::Error(io_error(
                    "openpty",
                    "/dev/ptmx",
                    e.into(),
                )))
                .await
        }
    };
    let slave = pty.slave;
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    match (stdio(&slave), stdio(&slave), stdio(&slave)) {
        (Ok(i), Ok(o), Ok(e)) => {
            cmd.stdin(i).stdout(o).stderr(e);
        }
        _ => {
            return framed
                .send(&GuestFrame::Error(io_error(
                    "dup",
                    "pty",
                    std::io::Error::last_os_error(),
                )))
                .await
        }
    }
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
    let (child, exit) = match reaper.spawn(&mut cmd) {
        Ok(s) => s,
        Err(e) => {
            return framed
                .send(&GuestFrame::Error(io_error(
                    "spawn",
                    &req.process.argv[0],
                    e,
                )))
                .await
        }
    };
    drop(cmd);
    drop(slave);
    let pid = child.id();
    framed.send(&GuestFrame::Started { pid }).await?;
    let master = pty.master;
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
                    let mut rest: &[u8] = &data;
                    while !rest.is_empty() {
                        match nix::unistd::write(&master, rest) {
                            Ok(n) => rest = &rest[n..],
                            Err(nix::errno::Errno::EAGAIN) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                            Err(_) => break,
                        }
                    }
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
