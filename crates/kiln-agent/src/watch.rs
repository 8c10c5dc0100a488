//! Watch: a directory's changes as `FsEvent` frames (inotify), until the host closes the
//! stream or the directory goes away. The user must be able to list the directory; the
//! agent serves at most [`MAX_WATCHES`] at once.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_proto::{
    ErrorKind, FileRef, FrameError, FramedStream, FsEvent, FsEventKind, GuestError, GuestFrame,
    HostFrame, Stream,
};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent};
use tokio::io::unix::AsyncFd;

use crate::creds::{as_user, fs_error};

/// Watches the agent serves at once (each holds an inotify instance).
pub const MAX_WATCHES: usize = 64;

static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Counts a watch while it lives.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        let before = ACTIVE.fetch_add(1, Ordering::SeqCst);
        if before >= MAX_WATCHES {
            ACTIVE.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub async fn watch(mut framed: FramedStream<Stream>, req: FileRef) -> Result<(), FrameError> {
    let Some(_slot) = Slot::take() else {
        let e = GuestError::new(
            ErrorKind::TooLarge,
            format!("the guest agent already serves {MAX_WATCHES} watches"),
        );
        return framed.send(&GuestFrame::Error(e)).await;
    };
    let inotify = match start(&req).await {
        Ok(i) => i,
        Err(e) => return framed.send(&GuestFrame::Error(e)).await,
    };
    framed.send(&GuestFrame::Ok).await?;
    let base = req.path.trim_end_matches('/').to_string();
    loop {
        tokio::select! {
            ready = inotify.readable() => {
                let mut guard = ready.map_err(FrameError::Io)?;
                match guard.get_inner().0.read_events() {
                    Ok(events) => {
                        if !forward(&mut framed, &base, &events).await? {
                            framed.send(&GuestFrame::End).await?;
                            return framed.close().await;
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                    Err(e) => {
                        let e = fs_error("watch", &req.path, std::io::Error::from(e));
                        return framed.send(&GuestFrame::Error(e)).await;
                    }
                }
            }
            // The host ends a watch by closing the stream (or sending `End`).
            frame = framed.recv::<HostFrame>() => match frame {
                Ok(Some(HostFrame::End) | None) | Err(_) => return Ok(()),
                Ok(Some(_)) => {}
            },
        }
    }
}

/// Checks as the user that the directory can be listed, then watches it.
async fn start(req: &FileRef) -> Result<AsyncFd<Fd>, GuestError> {
    let path = req.path.clone();
    let dir = as_user(req.user.clone(), move || {
        let dir = crate::fsops::absolute(&path)?;
        std::fs::read_dir(&dir).map_err(|e| fs_error("watch", &path, e))?;
        Ok(dir)
    })
    .await?;
    let io = |e: nix::errno::Errno| fs_error("watch", &req.path, std::io::Error::from(e));
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(io)?;
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR;
    inotify.add_watch(&dir, flags).map_err(io)?;
    // SAFETY: `Fd` owns the inotify descriptor and always returns that same one; it is
    // closed only when the AsyncFd (its owner) drops it.
    unsafe { AsyncFd::register(Fd(inotify)) }.map_err(|e| fs_error("watch", &req.path, e.into()))
}

/// Sends a batch's events, a run of the same event once; false when the directory itself
/// went away (or its watch ended).
async fn forward(
    framed: &mut FramedStream<Stream>,
    base: &str,
    events: &[InotifyEvent],
) -> Result<bool, FrameError> {
    let mut last: Option<FsEvent> = None;
    for ev in events {
        let gone = AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF;
        if ev.mask.intersects(gone | AddWatchFlags::IN_IGNORED) {
            return Ok(false);
        }
        let Some(event) = translate(base, ev) else {
            continue;
        };
        if last.as_ref() == Some(&event) {
            continue;
        }
        framed.send(&GuestFrame::FsEvent(event.clone())).await?;
        last = Some(event);
    }
    Ok(true)
}

fn translate(base: &str, ev: &InotifyEvent) -> Option<FsEvent> {
    let name = ev.name.as_ref()?.to_string_lossy().into_owned();
    let kind = if ev
        .mask
        .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
    {
        FsEventKind::Create
    } else if ev
        .mask
        .intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM)
    {
        FsEventKind::Delete
    } else if ev.mask.contains(AddWatchFlags::IN_MODIFY) {
        FsEventKind::Modify
    } else {
        return None;
    };
    Some(FsEvent {
        kind,
        path: format!("{base}/{name}"),
        is_dir: ev.mask.contains(AddWatchFlags::IN_ISDIR),
    })
}
