//! The host side of the processes API (agent protocol generation 6): start, list, control
//! and wait for processes the guest agent keeps, and attach to one's output. An attachment
//! checks what the guest sends: offsets only move forward, and the exit comes last.

use std::time::Duration;

use kiln_proto::{
    ExitStatus, FrameError, FramedStream, GuestFrame, ProcAttachRequest, ProcControlRequest,
    ProcInfo, ProcOp, ProcOutput, ProcStartRequest, ProcWaitRequest, Request, Stream,
};

use crate::agent::{AgentClient, AgentError, REPLY_TIMEOUT};

/// The protocol generation the processes API needs.
pub const PROCESSES_GENERATION: u16 = 6;

impl AgentClient {
    fn processes_supported(&self) -> Result<(), AgentError> {
        if self.generation() < PROCESSES_GENERATION {
            return Err(AgentError::Protocol(format!(
                "the guest agent speaks generation {}; the processes API needs \
                 {PROCESSES_GENERATION} (rebuild the image with this kiln)",
                self.generation()
            )));
        }
        Ok(())
    }

    async fn process_reply(&self, request: Request) -> Result<ProcInfo, AgentError> {
        self.processes_supported()?;
        let mut s = self.open(&request).await?;
        self.expect_process(&mut s).await
    }

    async fn expect_process(&self, s: &mut FramedStream<Stream>) -> Result<ProcInfo, AgentError> {
        match self.recv_within(s, "waiting for the process").await? {
            GuestFrame::Process(info) => Ok(info),
            other => Err(self.unexpected(&other, "Process")),
        }
    }

    pub async fn start_tracked(&self, req: ProcStartRequest) -> Result<ProcInfo, AgentError> {
        self.process_reply(Request::ProcStart(req)).await
    }

    pub async fn list_processes(&self) -> Result<Vec<ProcInfo>, AgentError> {
        self.processes_supported()?;
        let mut s = self.open(&Request::ProcList).await?;
        match self
            .recv_within(&mut s, "waiting for the processes")
            .await?
        {
            GuestFrame::Processes(list) => Ok(list),
            other => Err(self.unexpected(&other, "Processes")),
        }
    }

    /// One process; with a `wait`, once it exited or the wait is over.
    pub async fn process(&self, pid: u32, wait: Duration) -> Result<ProcInfo, AgentError> {
        self.processes_supported()?;
        let req = ProcWaitRequest {
            pid,
            timeout_ms: wait.as_millis() as u64,
        };
        let mut s = self.open(&Request::ProcWait(req)).await?;
        let reply = tokio::time::timeout(
            wait + REPLY_TIMEOUT,
            self.recv(&mut s, "waiting for the exit"),
        );
        match reply.await.map_err(|_| AgentError::Timeout(wait))?? {
            GuestFrame::Process(info) => Ok(info),
            other => Err(self.unexpected(&other, "Process")),
        }
    }

    pub async fn control_process(&self, pid: u32, op: ProcOp) -> Result<(), AgentError> {
        self.processes_supported()?;
        let mut s = self
            .open(&Request::ProcControl(ProcControlRequest { pid, op }))
            .await?;
        match self.recv_within(&mut s, "waiting for the result").await? {
            GuestFrame::Ok => Ok(()),
            other => Err(self.unexpected(&other, "Ok")),
        }
    }

    /// Streams a process's output from byte `from` on.
    pub async fn attach_process(&self, pid: u32, from: u64) -> Result<Attached, AgentError> {
        self.processes_supported()?;
        let mut stream = self
            .open(&Request::ProcAttach(ProcAttachRequest { pid, from }))
            .await?;
        let info = self.expect_process(&mut stream).await?;
        Ok(Attached {
            client: self.clone(),
            stream,
            cursor: from,
            info,
            done: false,
        })
    }
}

/// What an attached stream brings.
#[derive(Debug, PartialEq, Eq)]
pub enum ProcEvent {
    Output(ProcOutput),
    Exited(ExitStatus),
}

/// A process's output as it comes; dropping it detaches (the process runs on).
pub struct Attached {
    client: AgentClient,
    stream: FramedStream<Stream>,
    cursor: u64,
    /// The process as it was when attached.
    pub info: ProcInfo,
    done: bool,
}

impl Attached {
    /// The next output or the exit; `None` after the exit.
    pub async fn next(&mut self) -> Result<Option<ProcEvent>, AgentError> {
        if self.done {
            return Ok(None);
        }
        // The session ending (a suspend detaches it) closes the stream: not a violation.
        let frame = match self.stream.expect::<GuestFrame>("waiting for output").await {
            Err(e @ (FrameError::UnexpectedEof(_) | FrameError::Io(_))) => {
                return Err(AgentError::Stream(e))
            }
            Err(e) => return Err(self.client.violation(e.to_string())),
            Ok(frame) => frame,
        };
        match frame {
            GuestFrame::Output(out) if out.offset >= self.cursor && !out.data.is_empty() => {
                self.cursor = out.offset + out.data.len() as u64;
                Ok(Some(ProcEvent::Output(out)))
            }
            GuestFrame::Output(out) => Err(self.client.violation(format!(
                "sent output at offset {} after offset {}",
                out.offset, self.cursor
            ))),
            GuestFrame::Exited(status) => {
                self.done = true;
                Ok(Some(ProcEvent::Exited(status)))
            }
            other => Err(self.client.unexpected(&other, "Output or Exited")),
        }
    }
}
