//! kiln's guest network backend. Each microVM's NIC is a QEMU `-netdev stream` connected to
//! a Unix socket served here; behind it a userspace TCP/IP stack (smoltcp) plays gateway and
//! resolver and applies the microVM's egress connectors before any host socket is opened.
//! No root, no tap device, no host firewall rules: a guest can only reach what the backend
//! chooses to connect to on its behalf. It runs as a process of its own per microVM
//! (`kiln-net-backend`, see [`backend`]), outside kilnd and jailed.

pub mod addressing;
pub mod backend;
pub mod device;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod hostaddrs;
pub mod observe;
pub mod policy;
pub mod stack;

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

pub use observe::{CounterSnapshot, Denial, DenialSink, NetCounters};
pub use policy::{
    Connector, Destination, EgressPolicy, HostFacts, HostService, OperatorConfig, PolicyError,
};

/// Frames queued between QEMU and the stack, each way.
const LINK_QUEUE: usize = 256;

/// Serves one guest link (QEMU's `-netdev stream`) under `policy` until it closes.
pub async fn serve(
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
