//! What the files API's handlers share: the agent of a RUNNING microVM that speaks the
//! files protocol, guest errors as API errors, guards that keep a transfer counted as an
//! open request (no idle suspend under it) and watches within their quota, and channel
//! bodies that stream a guest's bytes or events to the client as they come.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use kiln_api::ErrorCode;
use kiln_proto::ErrorKind;
use kiln_vmm::AgentError;
use tokio::sync::mpsc;

use crate::error::{ApiError, ApiResult};
use crate::manager::{error_chain, Manager};

/// The protocol generation of the files API.
const FILES_GENERATION: u16 = 5;

/// The agent of a RUNNING microVM, if it speaks the files protocol.
pub fn agent(m: &Manager, id: &str) -> ApiResult<kiln_vmm::AgentClient> {
    agent_of_generation(m, id, "the files API", FILES_GENERATION)
}

/// The agent of a RUNNING microVM, if it speaks `generation` (what `api` needs).
pub fn agent_of_generation(
    m: &Manager,
    id: &str,
    api: &str,
    generation: u16,
) -> ApiResult<kiln_vmm::AgentClient> {
    m.row(id)?;
    let agent = m.running_agent(id, api)?;
    if agent.generation() < generation {
        return Err(ApiError::conflict(format!(
            "microVM {id}'s guest agent is from an older kiln (protocol generation {}); {api} \
             needs {generation}: rebuild its image with this kiln",
            agent.generation()
        )));
    }
    Ok(agent)
}

/// A failed file operation: the guest's refusals as 4xx with its own words, the rest 502.
pub fn error(e: AgentError) -> ApiError {
    guest_error(e, ErrorCode::FilesFailed)
}

/// A failed guest operation: the guest's refusals as 4xx with its own words, the rest
/// `failed` (a 502).
pub fn guest_error(e: AgentError, failed: ErrorCode) -> ApiError {
    if let AgentError::Session(kiln_proto::SessionError::Busy) = &e {
        return ApiError::quota(format!(
            "{}: too many requests to this microVM at once",
            error_chain(&e)
        ));
    }
    let AgentError::Guest(g) = &e else {
        return ApiError::new(failed, error_chain(&e));
    };
    let message = format!("in the guest: {}", g.message);
    let code = match g.kind {
        ErrorKind::NotFound => ErrorCode::ResourceNotFoundException,
        ErrorKind::PermissionDenied => ErrorCode::AccessDenied,
        ErrorKind::InvalidRequest => ErrorCode::ValidationException,
        ErrorKind::Conflict => ErrorCode::ConflictException,
        ErrorKind::TooLarge => ErrorCode::PayloadTooLarge,
        ErrorKind::Timeout | ErrorKind::Io | ErrorKind::Unsupported => failed,
    };
    ApiError::new(code, message)
}

/// A transfer in progress: counted as an open request of its microVM until dropped.
pub struct Busy {
    m: Arc<Manager>,
    id: String,
}

impl Busy {
    pub fn new(m: &Arc<Manager>, id: &str) -> Busy {
        m.begin_request(id);
        Busy {
            m: m.clone(),
            id: id.to_string(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.m.end_request(&self.id);
    }
}

/// Open streams of one kind per microVM (file watches, process output streams), each
/// holding an agent stream: bounded, so no client can take all of a guest's streams.
pub struct Watches {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
    what: &'static str,
}

impl Default for Watches {
    fn default() -> Self {
        Watches::new(kiln_api::files::MAX_WATCHES_PER_MICROVM, "watches")
    }
}

/// One open stream, counted until dropped.
pub struct WatchSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    id: String,
}

impl Watches {
    pub fn new(max: usize, what: &'static str) -> Watches {
        Watches {
            counts: Arc::default(),
            max,
            what,
        }
    }

    /// A slot, or 429 when the microVM has `max` open.
    pub fn take(&self, id: &str) -> ApiResult<WatchSlot> {
        let (max, what) = (self.max, self.what);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(id.to_string()).or_default();
        if *n >= max {
            return Err(ApiError::quota(format!(
                "microVM {id} already has {max} open {what}: close one (end its event \
                 stream) first"
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            counts: self.counts.clone(),
            id: id.to_string(),
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

/// A stream over a channel's receiver: what a task sends is what the client gets.
pub struct Channel<T>(pub mpsc::Receiver<T>);

impl<T> futures_core::Stream for Channel<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// A response body fed by `pump`, which gets the sending half: the bytes of a file or an
/// archive as the guest sends them. An error midway ends the body abruptly, so the client
/// sees a broken transfer rather than a short file.
pub fn body<F, Fut>(pump: F) -> axum::body::Body
where
    F: FnOnce(mpsc::Sender<Result<bytes::Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(pump(tx));
    axum::body::Body::from_stream(Channel(rx))
}

/// Sends a download's error down a body channel (the client's transfer breaks).
pub async fn fail(tx: &mpsc::Sender<Result<bytes::Bytes, std::io::Error>>, e: &AgentError) {
    tracing::warn!("download from the guest failed: {}", error_chain(e));
    let _ = tx.send(Err(std::io::Error::other(error_chain(e)))).await;
}
