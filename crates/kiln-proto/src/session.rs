//! A multiplexed session over one transport connection (yamux), driven by one task.
//!
//! The host is the yamux client and opens every stream; the agent is the server and only
//! accepts. A host session refuses streams the guest tries to open.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tracing::{debug, warn};

use crate::frame::FramedStream;

/// Most concurrent streams in one session.
pub const MAX_STREAMS: usize = 256;
/// Bound on the memory one session may buffer for the peer (yamux receive windows).
const MAX_RECEIVE_WINDOW: usize = MAX_STREAMS * 256 * 1024;

/// Streams ordinary requests may hold at once. The rest of [`MAX_STREAMS`] is kept for
/// control ([`Session::open_control`]: detach, ping), so a flood of requests is refused one
/// by one and never takes the session down (yamux ends a connection whose peer opens more
/// than its maximum) or keeps a suspend from detaching.
pub const MAX_OPEN_REQUESTS: usize = MAX_STREAMS - 16;

/// One multiplexed stream, usable with tokio I/O. A host's stream holds one of the
/// session's [`MAX_OPEN_REQUESTS`] slots until it is dropped.
pub struct Stream {
    inner: Compat<yamux::Stream>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Stream {
    fn new(stream: yamux::Stream, slot: Option<OwnedSemaphorePermit>) -> Stream {
        Stream {
            inner: stream.compat(),
            _slot: slot,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Closed by either side in an orderly way, or the transport reached EOF.
    Closed,
    /// The transport or the peer's multiplexing frames failed.
    Failed(String),
    /// This side aborted it, e.g. after a protocol violation on one stream.
    Aborted(String),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Closed => f.write_str("closed"),
            SessionEnd::Failed(why) => write!(f, "failed: {why}"),
            SessionEnd::Aborted(why) => write!(f, "aborted: {why}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("Agent session has ended ({0})")]
    Ended(SessionEnd),
    #[error("Opening a stream failed")]
    Open(#[source] yamux::ConnectionError),
    #[error(
        "The agent session already carries {MAX_OPEN_REQUESTS} requests at once: retry when \
         some have ended"
    )]
    Busy,
}

enum Command {
    Open(oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>),
    Close,
    Abort(String),
}

/// Handle to a running session. Cheap to clone; the session ends when every handle is
/// dropped, when either side closes it, or when the transport fails.
#[derive(Clone)]
pub struct Session {
    commands: mpsc::UnboundedSender<Command>,
    end: watch::Receiver<Option<SessionEnd>>,
    generation: u16,
    slots: Arc<Semaphore>,
    _driver: Arc<DriverGuard>,
}

struct DriverGuard(tokio::task::AbortHandle);
impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    // Lower the stream count first: yamux checks the window against it on every set.
    cfg.set_max_num_streams(MAX_STREAMS);
    cfg.set_max_connection_receive_window(Some(MAX_RECEIVE_WINDOW));
    cfg
}

impl Session {
    /// Host side: opens streams, refuses inbound ones.
    pub fn client<S>(io: S, generation: u16) -> Session
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::start(io, generation, yamux::Mode::Client, None)
    }

    /// Agent side: accepted streams arrive on the returned receiver.
    pub fn server<S>(io: S, generation: u16) -> (Session, mpsc::Receiver<Stream>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(MAX_STREAMS);
        (
            Self::start(io, generation, yamux::Mode::Server, Some(tx)),
            rx,
        )
    }

    fn start<S>(
        io: S,
        generation: u16,
        mode: yamux::Mode,
        inbound: Option<mpsc::Sender<Stream>>,
    ) -> Session
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = yamux::Connection::new(io.compat(), config(), mode);
        let (commands, rx) = mpsc::unbounded_channel();
        let (end_tx, end) = watch::channel(None);
        let task = tokio::spawn(async move {
            let end = drive(conn, rx, inbound).await;
            match &end {
                SessionEnd::Closed => debug!("agent session closed"),
                other => warn!(reason = %other, "agent session ended"),
            }
            let _ = end_tx.send(Some(end));
        });
        Session {
            commands,
            end,
            generation,
            slots: Arc::new(Semaphore::new(MAX_OPEN_REQUESTS)),
            _driver: Arc::new(DriverGuard(task.abort_handle())),
        }
    }

    /// The protocol generation negotiated for this session.
    pub fn generation(&self) -> u16 {
        self.generation
    }

    /// Opens a new stream, framed.
    pub async fn open(&self) -> Result<FramedStream<Stream>, SessionError> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| SessionError::Busy)?;
        self.open_with(Some(slot)).await
    }

    /// Opens a stream outside the requests' slots: for detach and ping, which must get
    /// through however busy the session is.
    pub async fn open_control(&self) -> Result<FramedStream<Stream>, SessionError> {
        self.open_with(None).await
    }

    async fn open_with(
        &self,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<FramedStream<Stream>, SessionError> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Open(tx)).is_err() {
            return Err(SessionError::Ended(self.wait_end().await));
        }
        match rx.await {
            Ok(Ok(stream)) => Ok(FramedStream::new(Stream::new(stream, slot))),
            Ok(Err(e)) => Err(SessionError::Open(e)),
            Err(_) => Err(SessionError::Ended(self.wait_end().await)),
        }
    }

    /// Closes the session in an orderly way and waits until it has ended.
    pub async fn close(&self) -> SessionEnd {
        let _ = self.commands.send(Command::Close);
        self.wait_end().await
    }

    /// Tears the session down at once, e.g. after the peer broke the protocol on a stream.
    pub fn abort(&self, reason: impl Into<String>) {
        let _ = self.commands.send(Command::Abort(reason.into()));
    }

    /// How the session ended, if it has.
    pub fn ended(&self) -> Option<SessionEnd> {
        self.end.borrow().clone()
    }

    /// Waits until the session ends.
    pub async fn wait_end(&self) -> SessionEnd {
        let mut end = self.end.clone();
        let result = match end.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone().unwrap_or(SessionEnd::Closed),
            Err(_) => SessionEnd::Aborted("session driver stopped".into()),
        };
        result
    }
}

async fn drive<S>(
    mut conn: yamux::Connection<S>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    inbound: Option<mpsc::Sender<Stream>>,
) -> SessionEnd
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut pending_open: Option<oneshot::Sender<_>> = None;
    let mut closing = false;
    let mut refused_inbound = 0u64;
    let outcome = poll_fn(|cx| {
        if closing {
            return match conn.poll_close(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(SessionEnd::Closed),
                Poll::Ready(Err(e)) => Poll::Ready(SessionEnd::Failed(e.to_string())),
                Poll::Pending => Poll::Pending,
            };
        }
        loop {
            if pending_open.is_none() {
                match commands.poll_recv(cx) {
                    Poll::Ready(Some(Command::Open(tx))) => pending_open = Some(tx),
                    Poll::Ready(Some(Command::Abort(reason))) => {
                        return Poll::Ready(SessionEnd::Aborted(reason))
                    }
                    Poll::Ready(Some(Command::Close)) | Poll::Ready(None) => {
                        closing = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    Poll::Pending => break,
                }
            }
            let Some(tx) = pending_open.take() else { break };
            match conn.poll_new_outbound(cx) {
                Poll::Ready(result) => {
                    let _ = tx.send(result);
                }
                Poll::Pending => {
                    pending_open = Some(tx);
                    break;
                }
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => match &inbound {
                    Some(tx) if tx.try_send(Stream::new(stream, None)).is_ok() => {}
                    _ => {
                        refused_inbound += 1;
                        if refused_inbound == 1 || refused_inbound.is_power_of_two() {
                            warn!(refused_inbound, "refused a stream opened by the peer");
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(SessionEnd::Failed(e.to_string())),
                Poll::Ready(None) => return Poll::Ready(SessionEnd::Closed),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{GuestFrame, Request};

    #[tokio::test]
    async fn many_streams_in_both_directions() {
        let (h, g) = tokio::io::duplex(1 << 16);
        let host = Session::client(h, 1);
        let (_agent, mut accepted) = Session::server(g, 1);
        tokio::spawn(async move {
            while let Some(stream) = accepted.recv().await {
                tokio::spawn(async move {
                    let mut s = FramedStream::new(stream);
                    let req: Request = s.expect("request").await.unwrap();
                    assert_eq!(req, Request::Ping);
                    s.send(&GuestFrame::Ok).await.unwrap();
                });
            }
        });
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let host = host.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = host.open().await.unwrap();
                s.send(&Request::Ping).await.unwrap();
                s.expect::<GuestFrame>("reply").await.unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), GuestFrame::Ok);
        }
        assert_eq!(host.close().await, SessionEnd::Closed);
    }

    #[tokio::test]
    async fn a_flood_of_requests_is_refused_and_control_still_opens() {
        let (h, g) = tokio::io::duplex(1 << 16);
        let host = Session::client(h, 1);
        let (_agent, mut accepted) = Session::server(g, 1);
        let held = tokio::spawn(async move {
            let mut streams = Vec::new();
            while let Some(s) = accepted.recv().await {
                streams.push(s);
            }
        });
        let mut open = Vec::new();
        for _ in 0..MAX_OPEN_REQUESTS {
            let mut s = host.open().await.unwrap();
            s.send(&Request::Ping).await.unwrap();
            open.push(s);
        }
        assert!(matches!(host.open().await, Err(SessionError::Busy)));
        let mut control = host.open_control().await.unwrap();
        control.send(&Request::Ping).await.unwrap();
        assert!(host.ended().is_none(), "the session survived the flood");
        open.pop();
        assert!(host.open().await.is_ok(), "a slot came back");
        held.abort();
    }

    #[tokio::test]
    async fn garbage_from_peer_ends_the_session_with_a_reason() {
        use tokio::io::AsyncWriteExt;
        let (h, mut g) = tokio::io::duplex(1 << 16);
        let host = Session::client(h, 1);
        g.write_all(&[0xff; 64]).await.unwrap();
        match host.wait_end().await {
            SessionEnd::Failed(why) => assert!(!why.is_empty()),
            other => panic!("expected failure, got {other:?}"),
        }
        assert!(matches!(host.open().await, Err(SessionError::Ended(_))));
    }
}
