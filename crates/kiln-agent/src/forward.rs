//! Forwards a stream's bytes to and from a TCP port on the guest's loopback.

use kiln_proto::{ErrorKind, FrameError, FramedStream, GuestError, GuestFrame, Stream};
use tokio::net::TcpStream;

pub async fn connect(mut framed: FramedStream<Stream>, port: u16) -> Result<(), FrameError> {
    let mut tcp = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let err = GuestError::new(ErrorKind::Io, format!("connect to guest port {port}: {e}"));
            return framed.send(&GuestFrame::Error(err)).await;
        }
    };
    let _ = tcp.set_nodelay(true);
    framed.send(&GuestFrame::Connected).await?;
    let mut raw = framed.into_raw();
    let _ = tokio::io::copy_bidirectional(&mut raw, &mut tcp).await;
    Ok(())
}
