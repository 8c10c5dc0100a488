//! Session loop and request dispatch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proto::handshake::{self, HandshakeError, HelloAck};
use kiln_proto::{
    AgentInfo, ErrorKind, FrameError, FramedStream, GuestError, GuestFrame, Request, Session,
    Stream, Tagged,
};
use tracing::{debug, info, warn, Instrument};

use crate::app::AppSupervisor;
use crate::port::Port;
use crate::reaper::Reaper;

/// How long a detaching session gets to flush its last frames.
const DETACH_FLUSH: Duration = Duration::from_secs(1);
/// How often the agent looks for a host while none is connected.
const HOST_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// With SIGIO, the longest wait before the port is read again anyway.
const HOST_SIGNAL_FALLBACK: Duration = Duration::from_millis(500);

pub struct AgentState {
    pub reaper: Reaper,
    pub app: AppSupervisor,
    pub procs: crate::procs::Procs,
    sessions: AtomicU64,
    started: Instant,
}

impl AgentState {
    pub fn new(reaper: Reaper) -> Arc<AgentState> {
        Arc::new(AgentState {
            app: AppSupervisor::new(reaper.clone()),
            procs: crate::procs::Procs::new(reaper.clone()),
            reaper,
            sessions: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    fn info(&self, generation: u16) -> AgentInfo {
        AgentInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            generation,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            sessions: self.sessions.load(Ordering::Relaxed),
        }
    }
}

/// The newest protocol generation this agent offers: its own, unless the kernel command
/// line says `kiln.agent_generation=N` (an agent that acts as an older one, so tests prove
/// a newer host still serves the guests an older kiln started).
fn generation_cap() -> u16 {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cap = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.agent_generation="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(kiln_proto::GENERATION_CURRENT);
    if cap < kiln_proto::GENERATION_CURRENT {
        tracing::warn!(cap, "offering protocol generations only up to {cap}");
    }
    cap
}

/// Serves one host session after another, forever.
pub async fn serve_forever(port: Port, state: Arc<AgentState>) {
    let mut quiet_failures = 0u32;
    let max_generation = generation_cap();
    let mut host_changed = host_signal(&port);
    loop {
        let ack = |nonce, generation| HelloAck {
            nonce,
            generation,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            sessions: state.sessions.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let result = handshake::server_up_to(port.session_handle(), ack, max_generation).await;
        match result {
            Ok((hello, generation, io)) => {
                quiet_failures = 0;
                crate::reseed::apply(&hello);
                let n = state.sessions.load(Ordering::Relaxed);
                info!(session = n, generation, "host connected");
                run_session(io, generation, state.clone(), port.clone())
                    .instrument(tracing::info_span!("session", n))
                    .await;
            }
            // No host connected: the port reads EOF until one is.
            Err(HandshakeError::Frame(FrameError::UnexpectedEof(_))) => {
                wait_for_host(&mut host_changed).await;
            }
            Err(e) => {
                quiet_failures += 1;
                if quiet_failures.is_power_of_two() {
                    warn!(failures = quiet_failures, "handshake failed: {e}");
                }
                tokio::time::sleep(HOST_POLL_INTERVAL).await;
            }
        }
    }
}

/// The port's SIGIO (a host connected), or None where it cannot be had: then the loop
/// polls every [`HOST_POLL_INTERVAL`].
fn host_signal(port: &Port) -> Option<tokio::signal::unix::Signal> {
    // The handler first: SIGIO's default action ends the process.
    let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::io()).ok()?;
    match port.signal_on_connect() {
        Ok(()) => Some(signal),
        Err(e) => {
            warn!("no SIGIO from the agent port ({e}): polling for the host");
            None
        }
    }
}

/// Waits until a host may have connected: its SIGIO (any since the last wait counts, so a
/// connection between the failed read and this wait is not missed), or at the latest
/// [`HOST_SIGNAL_FALLBACK`]; without the signal, [`HOST_POLL_INTERVAL`].
async fn wait_for_host(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            let _ = tokio::time::timeout(HOST_SIGNAL_FALLBACK, s.recv()).await;
        }
        None => tokio::time::sleep(HOST_POLL_INTERVAL).await,
    }
}

/// What a stream handler needs besides its stream.
#[derive(Clone)]
struct SessionCtx {
    session: Session,
    state: Arc<AgentState>,
    port: Port,
    /// Signalled when the host asked to detach: the session loop ends without waiting.
    detached: Arc<tokio::sync::Notify>,
}

async fn run_session<S>(io: S, generation: u16, state: Arc<AgentState>, port: Port)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (session, mut accepted) = Session::server(io, generation);
    let ctx = SessionCtx {
        session: session.clone(),
        state,
        port,
        detached: Arc::new(tokio::sync::Notify::new()),
    };
    loop {
        tokio::select! {
            stream = accepted.recv() => match stream {
                Some(stream) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move { handle_stream(stream, ctx).await });
                }
                None => break,
            },
            _ = ctx.detached.notified() => {
                info!("detached: ready for the next host");
                break;
            }
            end = session.wait_end() => {
                info!(%end, "host session ended");
                break;
            }
        }
    }
}

async fn handle_stream(stream: Stream, ctx: SessionCtx) {
    let (session, state) = (&ctx.session, &ctx.state);
    let mut framed = FramedStream::new(stream);
    let request: Request = match framed.expect("waiting for a request").await {
        Ok(r) => r,
        Err(e) => {
            debug!("stream without a valid request: {e}");
            return;
        }
    };
    if request.since() > session.generation() {
        let _ = framed
            .send(&GuestFrame::Error(GuestError::new(
                ErrorKind::Unsupported,
                format!(
                    "request needs generation {}, session speaks {}",
                    request.since(),
                    session.generation()
                ),
            )))
            .await;
        return;
    }
    let result = match request {
        Request::Ping => {
            framed
                .send(&GuestFrame::Pong(state.info(session.generation())))
                .await
        }
        Request::Exec(req) => crate::exec::run(framed, req, &state.reaper).await,
        Request::PutFile(req) => crate::files::put(framed, req).await,
        Request::GetFile(req) => crate::files::get(framed, req).await,
        Request::Http(req) => {
            let reply = match crate::http::call(req).await {
                Ok(resp) => GuestFrame::Http(resp),
                Err(e) => GuestFrame::Error(e),
            };
            framed.send(&reply).await
        }
        Request::Connect { port } => crate::forward::connect(framed, port).await,
        Request::StartApp(spec) => {
            let reply = match state.app.start(spec) {
                Ok(status) => GuestFrame::App(status),
                Err(e) => GuestFrame::Error(e),
            };
            framed.send(&reply).await
        }
        Request::AppStatus => framed.send(&GuestFrame::App(state.app.status())).await,
        Request::AppLogs { max_bytes } => {
            let tail = state.app.logs(max_bytes as usize);
            framed
                .send(&GuestFrame::Logs(serde_bytes::ByteBuf::from(tail)))
                .await
        }
        Request::PutArchive(req) => crate::archive::put(framed, req).await,
        Request::Shell(req) => crate::pty::run(framed, req, &state.reaper).await,
        Request::Stats => framed.send(&GuestFrame::Stats(crate::stats::read())).await,
        Request::Fs(req) => crate::fsops::serve(framed, req).await,
        Request::ReadFile(req) => crate::transfer::read(framed, req).await,
        Request::WriteFile(req) => crate::transfer::write(framed, req).await,
        Request::GetArchive(req) => crate::transfer::archive(framed, req).await,
        Request::UnpackArchive(req) => crate::archive::unpack_as(framed, req).await,
        Request::Watch(req) => crate::watch::watch(framed, req).await,
        Request::ProcStart(req) => {
            let reply = match state.procs.start(req) {
                Ok(info) => GuestFrame::Process(info),
                Err(e) => GuestFrame::Error(e),
            };
            framed.send(&reply).await
        }
        Request::ProcList => {
            framed
                .send(&GuestFrame::Processes(state.procs.list()))
                .await
        }
        Request::ProcAttach(req) => match state.procs.get(req.pid) {
            Ok(proc) => crate::procs::attach(framed, proc, req.from).await,
            Err(e) => framed.send(&GuestFrame::Error(e)).await,
        },
        Request::ProcControl(req) => {
            let result = match state.procs.get(req.pid) {
                Ok(proc) => proc.control(req.op).await,
                Err(e) => Err(e),
            };
            let reply = result.map_or_else(GuestFrame::Error, |()| GuestFrame::Ok);
            framed.send(&reply).await
        }
        Request::ProcWait(req) => {
            let reply = match state.procs.get(req.pid) {
                Ok(proc) => {
                    let timeout = std::time::Duration::from_millis(req.timeout_ms);
                    GuestFrame::Process(proc.wait(timeout).await)
                }
                Err(e) => GuestFrame::Error(e),
            };
            framed.send(&reply).await
        }
        Request::DetachNic => {
            let reply = match crate::net::detach_nics() {
                Ok(()) => GuestFrame::Ok,
                Err(e) => GuestFrame::Error(GuestError::new(ErrorKind::Io, e.to_string())),
            };
            framed.send(&reply).await
        }
        Request::Detach => {
            // No reading after this point: once the host hears Ok it may snapshot the
            // guest, and this session must not eat the next host's hello after a restore.
            ctx.port.retire_sessions();
            let sent = framed.send(&GuestFrame::Ok).await;
            let _ = framed.close().await;
            info!("host asked to detach: ending the session");
            let _ = tokio::time::timeout(DETACH_FLUSH, session.close()).await;
            ctx.port.seal_retired();
            ctx.detached.notify_one();
            sent
        }
    };
    if let Err(e) = result {
        debug!("stream ended with an error: {e}");
    }
}
