//! The supervised app: one long-running process (the image's CMD/ENTRYPOINT) whose output
//! is kept in a bounded ring buffer and whose exit is recorded.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use kiln_proto::{AppState, ErrorKind, GuestError, ProcessSpec};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::reaper::Reaper;

/// Bytes of app output kept.
const LOG_CAPACITY: usize = 1024 * 1024;

pub struct AppSupervisor {
    reaper: Reaper,
    state: Arc<Mutex<AppState>>,
    logs: Arc<Mutex<VecDeque<u8>>>,
}

impl AppSupervisor {
    pub fn new(reaper: Reaper) -> Self {
        AppSupervisor {
            reaper,
            state: Arc::default(),
            logs: Arc::new(Mutex::new(VecDeque::with_capacity(4096))),
        }
    }

    pub fn start(&self, spec: ProcessSpec) -> Result<AppState, GuestError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.running {
            return Err(GuestError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "the app is already running as pid {}",
                    state.pid.unwrap_or(0)
                ),
            ));
        }
        let mut cmd = crate::process::command(&spec)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, exit) = self
            .reaper
            .spawn(&mut cmd)
            .map_err(|e| crate::files::io_error("spawn", &spec.argv[0], e))?;
        for fd in [
            child.stdout.take().map(OwnedFd::from),
            child.stderr.take().map(OwnedFd::from),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(collect(fd, self.logs.clone()));
        }
        *state = AppState {
            pid: Some(child.id()),
            running: true,
            exit: None,
        };
        let watched = self.state.clone();
        tokio::spawn(async move {
            let status = exit.await.unwrap_or_default();
            let mut state = watched.lock().unwrap_or_else(|p| p.into_inner());
            state.running = false;
            state.exit = Some(status);
            tracing::warn!(?status, "app exited");
        });
        Ok(state.clone())
    }

    pub fn status(&self) -> AppState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn logs(&self, max_bytes: usize) -> Vec<u8> {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let skip = logs.len().saturating_sub(max_bytes);
        logs.iter().skip(skip).copied().collect()
    }
}

async fn collect(fd: OwnedFd, logs: Arc<Mutex<VecDeque<u8>>>) {
    let Ok(mut rx) = pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = rx.read(&mut buf).await {
        if n == 0 {
            return;
        }
        let mut logs = logs.lock().unwrap_or_else(|p| p.into_inner());
        logs.extend(&buf[..n]);
        let excess = logs.len().saturating_sub(LOG_CAPACITY);
        logs.drain(..excess);
    }
}
