//! Host-side client of the guest agent. Every answer from the guest is validated: a frame
//! that breaks the protocol aborts the whole session (the guest is hostile), is logged,
//! and surfaces as [`AgentError::Protocol`].

use std::path::Path;
use std::time::{Duration, SystemTime};

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::handshake::{self, HandshakeError, Hello, HelloAck, ENTROPY_LEN};
use kiln_proto::{
    AgentInfo, AppState, ExecRequest, ExitStatus, FrameError, FramedStream, GetFileRequest,
    GuestError, GuestFrame, HostFrame, HttpRequest, HttpResponse, ProcessSpec, PutArchiveRequest,
    PutFileRequest, Request, Rewind, Session, SessionEnd, SessionError, ShellRequest, Stream,
};
use rand::RngCore;
use serde_bytes::ByteBuf;
use tokio::net::UnixStream;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Connecting to the agent socket {path} failed")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Agent handshake failed")]
    Handshake(#[from] HandshakeError),
    #[error("Agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Agent session is unusable")]
    Session(#[from] SessionError),
    #[error("Agent stream failed")]
    Stream(#[source] FrameError),
    #[error("Guest broke the agent protocol: {0}")]
    Protocol(String),
    #[error("Guest refused the request")]
    Guest(#[from] GuestError),
    #[error("Output over the {limit}-byte limit")]
    OutputTooLarge { limit: usize },
}

/// Collected result of a finished exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

impl ExecOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// One event of a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(ExitStatus),
}

/// How much longer than a guest-enforced timeout the host waits before giving up itself.
const HOST_GRACE: Duration = Duration::from_secs(5);
/// Longest the host waits for a guest's answer to a request that does no work of its own
/// (Started, Connected, the app's state or logs): a guest that never answers costs a
/// request this long, never a task forever.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first hello waits for its answer before it is sent again (see `connect`).
const FIRST_HELLO_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct AgentClient {
    session: Session,
    ack: HelloAck,
}

impl AgentClient {
    /// Connects to the agent socket and runs the handshake, which also reseeds the guest RNG
    /// and sets its clock. Waits up to `timeout` for the agent to answer.
    ///
    /// A hello that gets no answer within a few seconds is sent again on a new connection
    /// (waiting twice as long each time, until `timeout`): a cold boot's agent is not up for
    /// seconds, and a guest whose port state went astray gets a clean close and open from
    /// QEMU. Measured on QEMU 10 while `detach` still closed the host's side: 4 clones in 14
    /// answered only on the third connection (the first answer never reached the socket);
    /// with `detach` fixed, 0 in 14 needed a second one.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut attempt = FIRST_HELLO_WAIT;
        loop {
            let stream = loop {
                match UnixStream::connect(socket).await {
                    Ok(s) => break s,
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        return Err(AgentError::Connect {
                            path: socket.display().to_string(),
                            source: e,
                        })
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match Self::handshake(stream, attempt.min(left)).await {
                Err(AgentError::Timeout(waited)) if waited < left => {
                    tracing::debug!(?waited, "no answer to the hello: connecting again");
                    attempt *= 2;
                }
                result => return result,
            }
        }
    }

    /// Runs the handshake over an already connected transport.
    pub async fn handshake<S>(io: S, timeout: Duration) -> Result<AgentClient, AgentError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut entropy = vec![0u8; ENTROPY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut entropy);
        let hello = Hello::new(rand::random(), entropy, SystemTime::now());
        let (ack, io) = tokio::time::timeout(timeout, handshake::client(io, &hello))
            .await
            .map_err(|_| AgentError::Timeout(timeout))??;
        Ok(AgentClient {
            session: Session::client(io, ack.generation),
            ack,
        })
    }

    pub fn hello_ack(&self) -> &HelloAck {
        &self.ack
    }

    /// How the session ended, if it has.
    pub fn ended(&self) -> Option<SessionEnd> {
        self.session.ended()
    }

    pub async fn wait_end(&self) -> SessionEnd {
        self.session.wait_end().await
    }

    pub(crate) async fn open(&self, request: &Request) -> Result<FramedStream<Stream>, AgentError> {
        let mut stream = self.session.open().await?;
        stream.send(request).await.map_err(AgentError::Stream)?;
        Ok(stream)
    }

    /// [`AgentClient::open`] for control (ping, detach): it gets through however many
    /// requests are open.
    async fn open_control(&self, request: &Request) -> Result<FramedStream<Stream>, AgentError> {
        let mut stream = self.session.open_control().await?;
        stream.send(request).await.map_err(AgentError::Stream)?;
        Ok(stream)
    }

    /// [`AgentClient::recv`] under [`REPLY_TIMEOUT`].
    pub(crate) async fn recv_within(
        &self,
        stream: &mut FramedStream<Stream>,
        what: &'static str,
    ) -> Result<GuestFrame, AgentError> {
        tokio::time::timeout(REPLY_TIMEOUT, self.recv(stream, what))
            .await
            .map_err(|_| AgentError::Timeout(REPLY_TIMEOUT))?
    }

    /// The protocol generation this session speaks (the lower of the host's and the agent's).
    pub fn generation(&self) -> u16 {
        self.session.generation()
    }

    /// Receives the next guest frame; a malformed or oversized one aborts the session.
    pub(crate) async fn recv(
        &self,
        stream: &mut FramedStream<Stream>,
        what: &'static str,
    ) -> Result<GuestFrame, AgentError> {
        match stream.expect::<GuestFrame>(what).await {
            Ok(frame) => Ok(frame),
            Err(FrameError::Io(e)) => Err(AgentError::Stream(FrameError::Io(e))),
            Err(FrameError::UnexpectedEof(w)) => {
                Err(self.violation(format!("stream closed while {w}")))
            }
            Err(e) => Err(self.violation(e.to_string())),
        }
    }

    /// Records a protocol violation: the session is aborted, and the error says why.
    pub(crate) fn violation(&self, why: String) -> AgentError {
        warn!(reason = %why, "guest broke the agent protocol: aborting the session");
        self.session.abort(format!("protocol violation: {why}"));
        AgentError::Protocol(why)
    }

    pub(crate) fn unexpected(&self, got: &GuestFrame, expected: &str) -> AgentError {
        match got {
            GuestFrame::Error(e) => AgentError::Guest(e.clone()),
            other => self.violation(format!(
                "sent {} while {expected} was expected",
                other.name()
            )),
        }
    }

    pub async fn ping(&self) -> Result<AgentInfo, AgentError> {
        let mut s = self.open_control(&Request::Ping).await?;
        match self.recv(&mut s, "waiting for Pong").await? {
            GuestFrame::Pong(info) => Ok(info),
            other => Err(self.unexpected(&other, "Pong")),
        }
    }

    /// Starts a process; events arrive through [`ExecStream::next`].
    pub async fn exec_stream(&self, req: ExecRequest) -> Result<ExecStream, AgentError> {
        self.start_process(Request::Exec(req)).await
    }

    /// Opens a stream for an Exec or Shell request and waits for `Started`.
    async fn start_process(&self, request: Request) -> Result<ExecStream, AgentError> {
        let mut stream = self.open(&request).await?;
        match self.recv_within(&mut stream, "waiting for Started").await? {
            GuestFrame::Started { pid } => Ok(ExecStream {
                client: self.clone(),
                stream,
                pid,
                done: false,
            }),
            other => Err(self.unexpected(&other, "Started")),
        }
    }

    /// Starts a process on a new pseudo-terminal (protocol generation 2). Output arrives as
    /// `Stdout` events; send input with `send_stdin` and sizes with `resize`.
    pub async fn shell_stream(&self, req: ShellRequest) -> Result<ExecStream, AgentError> {
        if self.session.generation() < 2 {
            return Err(AgentError::Protocol(format!(
                "the guest agent speaks generation {}; shells need 2",
                self.session.generation()
            )));
        }
        self.start_process(Request::Shell(req)).await
    }

    /// Runs a process to completion and collects at most `max_output` bytes of output. With
    /// a timeout in the request, the host gives up [`HOST_GRACE`] after it (the agent kills
    /// the process at the timeout; one that never says so does not hold the host).
    pub async fn exec(
        &self,
        req: ExecRequest,
        stdin: Option<&[u8]>,
        max_output: usize,
    ) -> Result<ExecOutput, AgentError> {
        match req.timeout_ms {
            Some(ms) => {
                let deadline = Duration::from_millis(ms) + HOST_GRACE;
                tokio::time::timeout(deadline, self.exec_unbounded(req, stdin, max_output))
                    .await
                    .map_err(|_| AgentError::Timeout(deadline))?
            }
            None => self.exec_unbounded(req, stdin, max_output).await,
        }
    }

    async fn exec_unbounded(
        &self,
        req: ExecRequest,
        stdin: Option<&[u8]>,
        max_output: usize,
    ) -> Result<ExecOutput, AgentError> {
        let mut exec = self
            .exec_stream(ExecRequest {
                stdin: stdin.is_some(),
                ..req
            })
            .await?;
        if let Some(input) = stdin {
            for chunk in input.chunks(MAX_CHUNK_LEN) {
                exec.send_stdin(chunk).await?;
            }
            exec.close_stdin().await?;
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match exec.next().await? {
                ExecEvent::Stdout(d) => stdout.extend_from_slice(&d),
                ExecEvent::Stderr(d) => stderr.extend_from_slice(&d),
                ExecEvent::Exited(status) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        status,
                    })
                }
            }
            if stdout.len() + stderr.len() > max_output {
                let _ = exec.signal(9).await;
                return Err(AgentError::OutputTooLarge { limit: max_output });
            }
        }
    }

    /// Convenience: `sh -c script`, output collected (16 MiB at most).
    pub async fn sh(&self, script: &str) -> Result<ExecOutput, AgentError> {
        self.exec(ExecRequest::shell(script), None, 16 << 20).await
    }

    pub async fn put_file(&self, path: &str, contents: &[u8], mode: u32) -> Result<(), AgentError> {
        let req = PutFileRequest {
            path: path.into(),
            mode,
            size: contents.len() as u64,
            create_parents: true,
        };
        let mut s = self.open(&Request::PutFile(req)).await?;
        for chunk in contents.chunks(MAX_CHUNK_LEN) {
            s.send(&HostFrame::Chunk(ByteBuf::from(chunk.to_vec())))
                .await
                .map_err(AgentError::Stream)?;
        }
        s.send(&HostFrame::End).await.map_err(AgentError::Stream)?;
        match self.recv(&mut s, "waiting for the upload result").await? {
            GuestFrame::Ok => Ok(()),
            other => Err(self.unexpected(&other, "Ok")),
        }
    }

    /// Sends a tar archive that the agent unpacks under `req.dest`.
    pub async fn put_archive(&self, req: PutArchiveRequest, tar: &[u8]) -> Result<(), AgentError> {
        let mut s = self.open(&Request::PutArchive(req)).await?;
        for chunk in tar.chunks(MAX_CHUNK_LEN) {
            s.send(&HostFrame::Chunk(ByteBuf::from(chunk.to_vec())))
                .await
                .map_err(AgentError::Stream)?;
        }
        s.send(&HostFrame::End).await.map_err(AgentError::Stream)?;
        match self.recv(&mut s, "waiting for the unpack result").await? {
            GuestFrame::Ok => Ok(()),
            other => Err(self.unexpected(&other, "Ok")),
        }
    }

    pub async fn get_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, AgentError> {
        let mut s = self
            .open(&Request::GetFile(GetFileRequest {
                path: path.into(),
                max_bytes,
            }))
            .await?;
        let size = match self.recv(&mut s, "waiting for FileMeta").await? {
            GuestFrame::FileMeta { size, .. } if size <= max_bytes => size,
            GuestFrame::FileMeta { size, .. } => {
                return Err(self.violation(format!(
                    "announced {size} bytes, over the {max_bytes} asked for"
                )))
            }
            other => return Err(self.unexpected(&other, "FileMeta")),
        };
        let mut data = Vec::with_capacity(size.min(1 << 20) as usize);
        loop {
            match self.recv(&mut s, "receiving file contents").await? {
                GuestFrame::Chunk(c) if data.len() as u64 + c.len() as u64 <= size => {
                    data.extend_from_slice(&c)
                }
                GuestFrame::Chunk(_) => {
                    return Err(self.violation(format!("sent more than the announced {size} bytes")))
                }
                GuestFrame::End if data.len() as u64 == size => return Ok(data),
                GuestFrame::End => {
                    return Err(AgentError::Stream(FrameError::UnexpectedEof(
                        "the file shrank while it was read",
                    )))
                }
                other => return Err(self.unexpected(&other, "Chunk or End")),
            }
        }
    }

    /// One HTTP request to a guest loopback port (the lifecycle hooks use this).
    /// Calls an HTTP endpoint on the guest's loopback. The guest enforces `timeout_ms`; the
    /// host gives up a little later on its own, so a guest that never answers cannot hold
    /// the caller.
    pub async fn http(&self, req: HttpRequest) -> Result<HttpResponse, AgentError> {
        let limit = req.max_response_bytes as usize;
        let deadline = Duration::from_millis(req.timeout_ms) + HOST_GRACE;
        let mut s = self.open(&Request::Http(req)).await?;
        let frame =
            tokio::time::timeout(deadline, self.recv(&mut s, "waiting for the HTTP response"))
                .await
                .map_err(|_| AgentError::Timeout(deadline))??;
        match frame {
            GuestFrame::Http(resp) if resp.body.len() <= limit => Ok(resp),
            GuestFrame::Http(resp) => Err(self.violation(format!(
                "HTTP body of {} bytes over the {limit} limit",
                resp.body.len()
            ))),
            other => Err(self.unexpected(&other, "Http")),
        }
    }

    /// Opens a raw byte stream to a TCP port on the guest's loopback.
    pub async fn connect_port(&self, port: u16) -> Result<Rewind<Stream>, AgentError> {
        let mut s = self.open(&Request::Connect { port }).await?;
        match self.recv_within(&mut s, "waiting for Connected").await? {
            GuestFrame::Connected => Ok(s.into_raw()),
            other => Err(self.unexpected(&other, "Connected")),
        }
    }

    pub async fn start_app(&self, spec: ProcessSpec) -> Result<AppState, AgentError> {
        let mut s = self.open(&Request::StartApp(spec)).await?;
        match self.recv(&mut s, "waiting for the app state").await? {
            GuestFrame::App(state) => Ok(state),
            other => Err(self.unexpected(&other, "App")),
        }
    }

    pub async fn app_status(&self) -> Result<AppState, AgentError> {
        let mut s = self.open(&Request::AppStatus).await?;
        match self
            .recv_within(&mut s, "waiting for the app state")
            .await?
        {
            GuestFrame::App(state) => Ok(state),
            other => Err(self.unexpected(&other, "App")),
        }
    }

    pub async fn app_logs(&self, max_bytes: u32) -> Result<Vec<u8>, AgentError> {
        let mut s = self.open(&Request::AppLogs { max_bytes }).await?;
        match self.recv_within(&mut s, "waiting for the app logs").await? {
            GuestFrame::Logs(l) if l.len() <= max_bytes as usize => Ok(l.into_vec()),
            GuestFrame::Logs(l) => {
                Err(self.violation(format!("sent {} bytes of logs, {max_bytes} asked", l.len())))
            }
            other => Err(self.unexpected(&other, "Logs")),
        }
    }

    /// Asks the agent to end this session (before a snapshot), then closes it.
    /// Takes the guest's NICs away (the `none` connector), done by the agent itself
    /// (generation 3; an older agent answers `Unsupported`).
    pub async fn detach_nic(&self) -> Result<(), AgentError> {
        if self.session.generation() < 3 {
            return Err(AgentError::Protocol(format!(
                "the guest agent speaks generation {}; taking the NIC away needs 3",
                self.session.generation()
            )));
        }
        let mut s = self.open(&Request::DetachNic).await?;
        match self.recv(&mut s, "waiting for the NIC to go").await? {
            GuestFrame::Ok => Ok(()),
            other => Err(self.unexpected(&other, "Ok")),
        }
    }

    /// The guest's own view of its memory and root disk (generation 4; an older agent
    /// cannot say: a protocol error, and the caller goes without).
    pub async fn stats(&self) -> Result<kiln_proto::GuestStats, AgentError> {
        if self.session.generation() < 4 {
            return Err(AgentError::Protocol(format!(
                "the guest agent speaks generation {}; its stats need 4",
                self.session.generation()
            )));
        }
        let mut s = self.open(&Request::Stats).await?;
        match self
            .recv_within(&mut s, "waiting for the guest's stats")
            .await?
        {
            GuestFrame::Stats(stats) => Ok(stats),
            other => Err(self.unexpected(&other, "Stats")),
        }
    }

    pub async fn detach(&self, timeout: Duration) -> Result<(), AgentError> {
        let result = tokio::time::timeout(timeout, async {
            let mut s = self.open_control(&Request::Detach).await?;
            match self.recv(&mut s, "waiting for the detach answer").await? {
                GuestFrame::Ok => Ok(()),
                other => Err(self.unexpected(&other, "Ok")),
            }
        })
        .await
        .unwrap_or(Err(AgentError::Timeout(timeout)));
        // The host's side of the session is not closed here: closing shuts the socket down,
        // QEMU then drops the chardev connection while the guest is being stopped, and the
        // snapshot can catch the port half-closed (a clone's first answer is lost). The
        // socket closes with QEMU.
        result
    }
}

/// A running exec.
pub struct ExecStream {
    client: AgentClient,
    stream: FramedStream<Stream>,
    pid: u32,
    done: bool,
}

impl ExecStream {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next output chunk or the exit status (after which the stream is finished).
    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        if self.done {
            return Err(AgentError::Protocol("exec already finished".into()));
        }
        match self
            .client
            .recv(&mut self.stream, "waiting for exec output")
            .await?
        {
            GuestFrame::Stdout(d) => Ok(ExecEvent::Stdout(d.into_vec())),
            GuestFrame::Stderr(d) => Ok(ExecEvent::Stderr(d.into_vec())),
            GuestFrame::Exited(status) => {
                self.done = true;
                Ok(ExecEvent::Exited(status))
            }
            other => Err(self.client.unexpected(&other, "exec output")),
        }
    }

    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        self.send(HostFrame::Stdin(ByteBuf::from(data.to_vec())))
            .await
    }

    pub async fn close_stdin(&mut self) -> Result<(), AgentError> {
        self.send(HostFrame::StdinEof).await
    }

    /// New terminal size (shells only).
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<(), AgentError> {
        self.send(HostFrame::Resize { cols, rows }).await
    }

    pub async fn signal(&mut self, signal: i32) -> Result<(), AgentError> {
        self.send(HostFrame::Signal(signal)).await
    }

    async fn send(&mut self, frame: HostFrame) -> Result<(), AgentError> {
        self.stream.send(&frame).await.map_err(AgentError::Stream)
    }
}
