//! kiln's guest network backend. Each microVM's NIC is a QEMU `-netdev stream` connected to
//! a Unix socket served here; behind it a userspace TCP/IP stack (smoltcp) plays gateway and
//! resolver and applies the microVM's egress connectors before any host socket is opened.
//! No root, no tap device, no host firewall rules: a guest can only reach what the backend
//! chooses to connect to on its behalf.

pub mod addressing;
pub mod device;
pub mod dns;
pub mod observe;
pub mod policy;
pub mod stack;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tracing::{debug, warn, Instrument};

pub use observe::{CounterSnapshot, Denial, DenialSink, NetCounters};
pub use policy::{
    Connector, Destination, EgressPolicy, HostFacts, HostService, OperatorConfig, PolicyError,
};

/// Frames queued between QEMU and the stack, each way.
const LINK_QUEUE: usize = 256;

/// The backend of one running guest: serves the first QEMU that connects to `socket`.
/// Dropping it stops the stack and removes the socket.
pub struct NetworkBackend {
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl NetworkBackend {
    /// Binds `socket` (mode 0600) and serves it in the background.
    pub fn start(
        socket: &Path,
        policy: Arc<EgressPolicy>,
        counters: Arc<NetCounters>,
        denials: DenialSink,
    ) -> std::io::Result<NetworkBackend> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        let task = tokio::spawn(
            async move {
                // One QEMU per backend: the listener closes once it has connected.
                let link = match listener.accept().await {
                    Ok((link, _)) => link,
                    Err(e) => return warn!("network backend accept failed: {e}"),
                };
                drop(listener);
                serve(link, policy, counters, denials).await;
            }
            .instrument(tracing::Span::current()),
        );
        Ok(NetworkBackend {
            socket: socket.to_path_buf(),
            task,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for NetworkBackend {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn serve(
    link: tokio::net::UnixStream,
    policy: Arc<EgressPolicy>,
    counters: Arc<NetCounters>,
    denials: DenialSink,
) {
    let (read, write) = link.into_split();
    // Two reads and one write per frame would dominate the cost: buffer both ways.
    let mut read = tokio::io::BufReader::with_capacity(1 << 16, read);
    let mut write = tokio::io::BufWriter::with_capacity(1 << 16, write);
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(LINK_QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(LINK_QUEUE);
    let reader = tokio::spawn(async move {
        loop {
            match device::read_frame(&mut read).await {
                Ok(frame) => {
                    if in_tx.send(frame).await.is_err() {
                        return;
                    }
                }
                Err(device::LinkError::Closed) => return,
                Err(e) => return warn!("{e}"),
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if device::write_frame(&mut write, &frame).await.is_err() {
                return;
            }
            // Write whatever else is queued, then flush once.
            while let Ok(frame) = out_rx.try_recv() {
                if device::write_frame(&mut write, &frame).await.is_err() {
                    return;
                }
            }
            if write.flush().await.is_err() {
                return;
            }
        }
    });
    stack::Stack::new(policy, counters, denials)
        .run(in_rx, out_tx)
        .await;
    debug!("guest link closed");
    reader.abort();
    writer.abort();
}
