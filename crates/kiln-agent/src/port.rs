//! The guest end of the agent channel: a virtio-serial character device used with
//! non-blocking I/O. While no host is connected, reads return EOF at once; the session
//! loop then waits for the port's SIGIO, which the kernel sends when a host connects.
//!
//! Each session reads through its own handle ([`Port::session_handle`]). Retiring the
//! sessions ([`Port::retire_sessions`]) stops every older handle from reading — it never
//! consumes another byte — while its writes still go out until [`Port::seal_retired`]. The agent retires a session
//! before it acknowledges a detach: the host may snapshot the guest the moment it hears the
//! acknowledgement, and after a restore a reader left over from the old session would
//! otherwise race the new session's handshake for the next host's hello.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A cheaply cloned handle on the port; every session uses its own clone.
#[derive(Clone)]
pub struct Port {
    fd: Arc<AsyncFd<std::fs::File>>,
    path: PathBuf,
    /// Which handles may read and write; I/O holds the lock, so none straddles a change.
    current: Arc<Mutex<Epochs>>,
    /// The epoch this handle reads in.
    epoch: u64,
}

impl Port {
    /// Finds `/dev/vportNpM` whose sysfs name is `name` and opens it.
    pub fn open_by_name(name: &str) -> io::Result<Port> {
        let path = find_port(Path::new("/sys/class/virtio-ports"), name)?;
        Self::open(&path)
    }

    pub fn open(path: &Path) -> io::Result<Port> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        // SAFETY: `file` owns its descriptor, and the AsyncFd owns `file` until it is
        // dropped: nothing else closes or replaces the descriptor while it is registered.
        let fd = unsafe { AsyncFd::register(file)? };
        Ok(Port {
            fd: Arc::new(fd),
            path: path.to_path_buf(),
            current: Arc::new(Mutex::new(Epochs::default())),
            epoch: 0,
        })
    }

    /// A handle for a new session: it reads until the sessions are next retired.
    pub fn session_handle(&self) -> Port {
        let epoch = self.current.lock().unwrap_or_else(|p| p.into_inner()).read;
        Port {
            epoch,
            ..self.clone()
        }
    }

    /// Stops every existing handle from reading. When this returns, no read through an
    /// older handle is in progress and none will start.
    pub fn retire_sessions(&self) {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).read += 1;
    }

    /// Stops retired handles from writing too (after their last frames went out), so a
    /// leftover task of an old session cannot put bytes into the next session's stream.
    pub fn seal_retired(&self) {
        let mut epochs = self.current.lock().unwrap_or_else(|p| p.into_inner());
        epochs.write = epochs.read;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks the kernel for SIGIO on this port: virtio-console signals each change of the
    /// host side (a host connecting), so the session loop waits for that instead of
    /// polling. SIGIO must be handled before this is called (its default ends the process).
    pub fn signal_on_connect(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: fcntl on a descriptor this port owns (the AsyncFd keeps it open); the
        // calls take integers only.
        unsafe {
            if libc::fcntl(fd, libc::F_SETOWN, libc::getpid()) < 0 {
                return Err(io::Error::last_os_error());
            }
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Session epochs: handles older than `read` no longer read; older than `write`, no longer
/// write.
#[derive(Debug, Default)]
struct Epochs {
    read: u64,
    write: u64,
}

fn find_port(sysfs: &Path, name: &str) -> io::Result<PathBuf> {
    for entry in std::fs::read_dir(sysfs)? {
        let entry = entry?;
        let Ok(found) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if found.trim() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio port named {name} under {}", sysfs.display()),
    ))
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if current.read != self.epoch {
                // Retired: never read again (the session is being dropped).
                return Poll::Pending;
            }
            let unfilled = buf.initialize_unfilled();
            let read = guard.try_io(|fd| fd.get_ref().read(unfilled));
            drop(current);
            match read {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if self.epoch < current.write {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "this agent session was retired",
                )));
            }
            let written = guard.try_io(|fd| fd.get_ref().write(buf));
            drop(current);
            match written {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retired_sessions_stop_reading_then_writing() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("port");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let port = Port::open(&fifo).unwrap();
        let mut old = port.session_handle();
        let mut buf = [0u8; 3];
        old.write_all(b"abc").await.unwrap();
        old.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"abc");

        port.retire_sessions();
        let mut new = port.session_handle();
        old.write_all(b"xyz").await.unwrap(); // last frames still go out
        let stolen = tokio::time::timeout(Duration::from_millis(100), old.read(&mut buf)).await;
        assert!(stolen.is_err(), "a retired handle must not read");
        new.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"xyz", "the new session gets every byte");

        port.seal_retired();
        let err = old.write_all(b"junk").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        new.write_all(b"ok!").await.unwrap();
        new.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ok!");
    }

    #[test]
    fn finds_the_port_by_its_sysfs_name() {
        let dir = tempfile::tempdir().unwrap();
        for (port, name) in [("vport1p1", "other"), ("vport2p1", "kiln.agent")] {
            std::fs::create_dir(dir.path().join(port)).unwrap();
            std::fs::write(dir.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port(dir.path(), "kiln.agent").unwrap(),
            Path::new("/dev/vport2p1")
        );
        assert!(find_port(dir.path(), "missing").is_err());
    }
}
