//! The link between QEMU and the stack: QEMU's `-netdev stream` sends Ethernet frames over a
//! Unix socket, each prefixed with its length as a 32-bit big-endian number. The guest
//! controls those bytes, so lengths are bounded before anything is read.

use std::collections::VecDeque;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::addressing::MTU;

/// Largest Ethernet frame accepted from the guest (MTU + header + a VLAN tag).
pub const MAX_FRAME: usize = MTU + 18;
/// Smallest: an Ethernet header.
pub const MIN_FRAME: usize = 14;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("guest link closed")]
    Closed,
    #[error("guest sent a {0}-byte frame (allowed: {MIN_FRAME}..={MAX_FRAME}); link dropped")]
    BadLength(usize),
    #[error("guest link failed")]
    Io(#[from] std::io::Error),
}

/// Reads one frame. A length outside the bounds ends the link: the framing is lost.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, LinkError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(LinkError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
        return Err(LinkError::BadLength(len));
    }
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame).await?;
    Ok(frame)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> std::io::Result<()> {
    w.write_all(&(frame.len() as u32).to_be_bytes()).await?;
    w.write_all(frame).await
}

/// smoltcp's view of the link: frames queued in and out by the stack's task.
#[derive(Default)]
pub struct QueueDevice {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: Vec<Vec<u8>>,
}

pub struct QueueRx(Vec<u8>);
pub struct QueueTx<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for QueueRx {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl TxToken for QueueTx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        self.0.push(frame);
        result
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = QueueRx;
    type TxToken<'a> = QueueTx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(QueueRx, QueueTx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((QueueRx(frame), QueueTx(&mut self.tx)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<QueueTx<'_>> {
        Some(QueueTx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_drop_the_link() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, &[7u8; 60]).await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), vec![7u8; 60]);
        for len in [0u32, 13, (MAX_FRAME + 1) as u32, u32::MAX] {
            a.write_all(&len.to_be_bytes()).await.unwrap();
            assert!(matches!(
                read_frame(&mut b).await,
                Err(LinkError::BadLength(_))
            ));
        }
        drop(a);
        assert!(matches!(read_frame(&mut b).await, Err(LinkError::Closed)));
    }
}
