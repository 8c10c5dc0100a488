//! Exec: runs one process, streams its output, feeds its stdin, enforces its timeout.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::{
    ExecRequest, ExitStatus, FrameError, FramedStream, GuestFrame, HostFrame, Stream,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::reaper::Reaper;

/// After the process exits, how long to wait for output still held open by its children.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

pub async fn run(
    mut framed: FramedStream<Stream>,
    req: ExecRequest,
    reaper: &Reaper,
) -> Result<(), FrameError> {
    let mut cmd = match crate::process::command(&req.process) {
        Ok(cmd) => cmd,
        Err(e) => return framed.send(&GuestFrame::Error(e)).await,
    };
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let (mut child, exit) = match reaper.spawn(&mut cmd) {
        Ok(spawned) => spawned,
        Err(e) => {
            return framed
                .send(&GuestFrame::Error(crate::files::io_error(
                    "spawn",
                    &req.process.argv[0],
                    e,
                )))
                .await
        }
    };
    let pid = child.id();
    let pgid = Pid::from_raw(pid as i32);
    framed.send(&GuestFrame::Started { pid }).await?;

    let (out_tx, mut out_rx) = mpsc::channel::<GuestFrame>(8);
    for (fd, is_stdout) in [
        (child.stdout.take().map(OwnedFd::from), true),
        (child.stderr.take().map(OwnedFd::from), false),
    ] {
        if let Some(fd) = fd {
            tokio::spawn(pump(fd, is_stdout, out_tx.clone()));
        }
    }
    drop(out_tx);
    let stdin_tx = child
        .stdin
        .take()
        .map(|fd| spawn_stdin_writer(OwnedFd::from(fd)));
    let mut stdin_tx = stdin_tx;

    let deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut exit = exit;
    let mut status: Option<ExitStatus> = None;
    let mut timed_out = false;
    let mut drain_deadline = Instant::now();
    let mut pumps_done = false;
    let mut host_open = true;
    loop {
        if status.is_some() && pumps_done {
            break;
        }
        tokio::select! {
            frame = out_rx.recv(), if !pumps_done => match frame {
                Some(frame) => framed.send(&frame).await?,
                None => pumps_done = true,
            },
            result = &mut exit, if status.is_none() => {
                status = Some(result.unwrap_or(ExitStatus { code: None, signal: None, timed_out: false }));
                drain_deadline = Instant::now() + DRAIN_GRACE;
            }
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() && status.is_none() && !timed_out => {
                timed_out = true;
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            _ = sleep_until(drain_deadline), if status.is_some() => break,
            msg = framed.recv::<HostFrame>(), if host_open => match msg {
                Ok(Some(HostFrame::Stdin(data))) => {
                    if let Some(tx) = &stdin_tx {
                        let _ = tx.send(data.into_vec()).await;
                    }
                }
                Ok(Some(HostFrame::StdinEof)) => stdin_tx = None,
                Ok(Some(HostFrame::Signal(n))) => {
                    if let Ok(sig) = Signal::try_from(n) {
                        let _ = killpg(pgid, sig);
                    }
                }
                Ok(Some(_)) => {}
                // The host went away: the process keeps running, its output is dropped.
                Ok(None) | Err(_) => host_open = false,
            },
        }
    }
    let mut status = status.unwrap_or_default();
    status.timed_out = timed_out;
    framed.send(&GuestFrame::Exited(status)).await?;
    framed.close().await
}

async fn pump(fd: OwnedFd, is_stdout: bool, tx: mpsc::Sender<GuestFrame>) {
    let Ok(mut rx) = pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let data = ByteBuf::from(buf[..n].to_vec());
                let frame = if is_stdout {
                    GuestFrame::Stdout(data)
                } else {
                    GuestFrame::Stderr(data)
                };
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn spawn_stdin_writer(fd: OwnedFd) -> mpsc::Sender<Vec<u8>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
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
