//! The guest end of the agent channel: a virtio-serial character device used with
//! non-blocking I/O. While no host is connected, reads return EOF at once; the session
//! loop then polls until a host connects.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A cheaply cloned handle on the port; every session uses its own clone.
#[derive(Clone)]
pub struct Port {
    fd: Arc<AsyncFd<std::fs::File>>,
    path: PathBuf,
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
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
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
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
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
            match guard.try_io(|fd| fd.get_ref().write(buf)) {
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
