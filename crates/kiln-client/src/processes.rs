//! The processes API: start a process that runs on its own, follow its output from any
//! offset (an iterator over the server-sent events), write its stdin, signal it, resize its
//! terminal, wait for it.

use std::time::Duration;

use base64::Engine;
use kiln_api::{
    ListProcessesQuery, OutputStreamName, Process, ProcessList, ProcessOutputEvent,
    SignalProcessRequest, StartProcessRequest, TerminalSize,
};

use crate::sse::SseReader;
use crate::{seg, with_query, Client, ClientError};

fn procs_path(id: &str, rest: &str, query: &[String]) -> String {
    with_query(&format!("/v1/microvms/{}/processes{rest}", seg(id)), query)
}

impl Client {
    pub fn start_process(
        &self,
        id: &str,
        req: &StartProcessRequest,
    ) -> Result<Process, ClientError> {
        self.call("POST", &procs_path(id, "", &[]), Some(req))
    }

    /// One page of processes, by pid.
    pub fn list_processes(
        &self,
        id: &str,
        q: &ListProcessesQuery,
    ) -> Result<ProcessList, ClientError> {
        let mut query = Vec::new();
        if let Some(r) = q.running {
            query.push(format!("running={r}"));
        }
        if let Some(t) = &q.tag {
            query.push(format!("tag={}", seg(t)));
        }
        if let Some(l) = q.limit {
            query.push(format!("limit={l}"));
        }
        if let Some(c) = &q.cursor {
            query.push(format!("cursor={}", seg(c)));
        }
        self.call("GET", &procs_path(id, "", &query), None::<&()>)
    }

    /// Every process, all pages.
    pub fn list_all_processes(
        &self,
        id: &str,
        q: &ListProcessesQuery,
    ) -> Result<Vec<Process>, ClientError> {
        let mut q = q.clone();
        let mut all = Vec::new();
        loop {
            let page = self.list_processes(id, &q)?;
            all.extend(page.processes);
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => return Ok(all),
            }
        }
    }

    /// The process; with `wait`, once it exited or the wait (at most 300 s) is over.
    pub fn get_process(&self, id: &str, pid: u32, wait: Duration) -> Result<Process, ClientError> {
        let q = [format!("waitSeconds={}", wait.as_secs())];
        self.call("GET", &procs_path(id, &format!("/{pid}"), &q), None::<&()>)
    }

    /// The process once it exited, waiting as long as it takes.
    pub fn wait_process(&self, id: &str, pid: u32) -> Result<Process, ClientError> {
        loop {
            let p = self.get_process(id, pid, Duration::from_secs(60))?;
            if !p.running {
                return Ok(p);
            }
        }
    }

    /// The process's output from byte `from` on, as it comes, then its exit.
    pub fn process_output(
        &self,
        id: &str,
        pid: u32,
        from: u64,
    ) -> Result<ProcessOutput, ClientError> {
        let path = procs_path(id, &format!("/{pid}/output"), &[format!("from={from}")]);
        let stream = self.get_stream(&path)?;
        Ok(ProcessOutput {
            events: SseReader::new(stream),
            endpoint: self.endpoint.clone(),
            position: from,
        })
    }

    /// Writes `data` (at most 1 MiB) to the process's stdin; with `eof`, then closes it.
    pub fn write_process_stdin(
        &self,
        id: &str,
        pid: u32,
        data: &[u8],
        eof: bool,
    ) -> Result<(), ClientError> {
        let q: Vec<String> = eof.then(|| "eof=true".to_string()).into_iter().collect();
        self.request("POST", &procs_path(id, &format!("/{pid}/stdin"), &q))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data)
            .map(drop)
            .map_err(|e| self.error(e))
    }

    /// Sends a signal (a name such as `TERM` or a number) to the process's group.
    pub fn signal_process(&self, id: &str, pid: u32, signal: &str) -> Result<(), ClientError> {
        let body = SignalProcessRequest {
            signal: signal.to_string(),
        };
        self.request("POST", &procs_path(id, &format!("/{pid}/signal"), &[]))
            .send_json(&body)
            .map(drop)
            .map_err(|e| self.error(e))
    }

    pub fn resize_process(
        &self,
        id: &str,
        pid: u32,
        size: TerminalSize,
    ) -> Result<(), ClientError> {
        self.request("POST", &procs_path(id, &format!("/{pid}/resize"), &[]))
            .send_json(size)
            .map(drop)
            .map_err(|e| self.error(e))
    }
}

/// What a process's output stream brings.
#[derive(Debug, PartialEq, Eq)]
pub enum OutputItem {
    /// Bytes of stdout or stderr at `offset` of the process's output.
    Output {
        stream: OutputStreamName,
        offset: u64,
        data: Vec<u8>,
    },
    /// The process as it exited: the last item.
    Exit(Process),
}

/// A process's output: `Ok` items until the exit; an `Err` once if kilnd ended the stream
/// (a suspend or stop: resume at [`ProcessOutput::position`]), then `None`.
pub struct ProcessOutput {
    events: SseReader,
    endpoint: String,
    position: u64,
}

impl ProcessOutput {
    /// The offset after the last output received: where to resume.
    pub fn position(&self) -> u64 {
        self.position
    }

    fn unexpected(&self, what: &str, detail: String) -> ClientError {
        ClientError::Unexpected {
            endpoint: self.endpoint.clone(),
            what: what.into(),
            detail,
        }
    }

    fn item(&mut self, event: &str, data: &str) -> Option<Result<OutputItem, ClientError>> {
        Some(match event {
            "output" => {
                let ev: ProcessOutputEvent = match serde_json::from_str(data) {
                    Ok(ev) => ev,
                    Err(e) => return Some(Err(self.unexpected("an output event", e.to_string()))),
                };
                match base64::engine::general_purpose::STANDARD.decode(ev.data) {
                    Ok(bytes) => {
                        self.position = ev.offset + bytes.len() as u64;
                        Ok(OutputItem::Output {
                            stream: ev.stream,
                            offset: ev.offset,
                            data: bytes,
                        })
                    }
                    Err(e) => Err(self.unexpected("output bytes", e.to_string())),
                }
            }
            "exit" => serde_json::from_str(data)
                .map(OutputItem::Exit)
                .map_err(|e| self.unexpected("an exit event", e.to_string())),
            "error" => Err(ClientError::Api {
                status: 409,
                code: "OutputEnded".into(),
                message: data.to_string(),
            }),
            _ => return None,
        })
    }
}

impl Iterator for ProcessOutput {
    type Item = Result<OutputItem, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let ev = self.events.next_event()?;
            if let Some(item) = self.item(&ev.event, &ev.data) {
                return Some(item);
            }
        }
    }
}
