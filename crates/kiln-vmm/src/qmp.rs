//! An async QMP client: commands with ids, responses matched to callers, events broadcast.
//! QEMU runs next to a hostile guest, so its lines are bounded too.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tracing::debug;

/// Longest QMP line accepted.
const MAX_LINE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Connecting to the QMP socket {path} failed")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP connection failed")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not valid JSON")]
    Json(#[from] serde_json::Error),
    #[error("QMP greeting missing or malformed")]
    Greeting,
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection closed (QEMU has exited)")]
    Closed,
    #[error("QMP command {0} got no answer in time")]
    Timeout(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Value>,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = read_line(&mut reader).await?.ok_or(QmpError::Greeting)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting);
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(64);
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            events: events.clone(),
        };
        tokio::spawn(async move {
            while let Ok(Some(msg)) = read_line(&mut reader).await {
                match classify(msg) {
                    Incoming::Event(msg) => {
                        debug!(event = %msg["event"], "qmp event");
                        let _ = events.send(msg);
                    }
                    Incoming::Answer(id, result) => {
                        let waiter = pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        if let Some(tx) = waiter {
                            let _ = tx.send(result);
                        }
                    }
                    Incoming::Other => {}
                }
            }
            // Closed: fail every waiter.
            pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let mut line =
            serde_json::to_vec(&json!({"execute": command, "arguments": arguments, "id": id}))?;
        line.push(b'\n');
        {
            let mut w = self.writer.lock().await;
            if let Err(e) = w.write_all(&line).await {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                    QmpError::Closed
                } else {
                    e.into()
                });
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(QmpError::Timeout(command.to_string()))
            }
        }
    }

    /// Subscribes to QMP events (each a JSON object with `event` and `data`).
    pub fn events(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }
}

/// What one QMP message is.
pub(crate) enum Incoming {
    Event(Value),
    /// The answer to command `id`: its `return`, or its error's class and description.
    Answer(u64, Result<Value, (String, String)>),
    /// Anything else (no id, not an object): ignored.
    Other,
}

pub(crate) fn classify(msg: Value) -> Incoming {
    if msg.get("event").is_some() {
        return Incoming::Event(msg);
    }
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        return Incoming::Other;
    };
    let result = match msg.get("error") {
        Some(err) => Err((
            err["class"].as_str().unwrap_or("Error").to_string(),
            err["desc"].as_str().unwrap_or("").to_string(),
        )),
        None => Ok(msg.get("return").cloned().unwrap_or(Value::Null)),
    };
    Incoming::Answer(id, result)
}

/// Each line of `data` as the reader takes it (bounded, JSON, classified): for the fuzz
/// target. Returns how many lines were messages.
pub fn parse_lines(data: &[u8]) -> usize {
    data.split(|b| *b == b'\n')
        .filter(|line| line.len() < MAX_LINE)
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .map(classify)
        .filter(|m| !matches!(m, Incoming::Other))
        .count()
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<Option<Value>, QmpError> {
    let mut line = Vec::new();
    loop {
        let n = (&mut *reader)
            .take(MAX_LINE as u64 - line.len() as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        if line.ends_with(b"\n") {
            return Ok(Some(serde_json::from_slice(&line)?));
        }
        if line.len() >= MAX_LINE {
            return Err(QmpError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "QMP line too long",
            )));
        }
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_events_answers_or_ignored() {
        let lines = concat!(
            r#"{"event":"STOP","data":{}}"#,
            "\n",
            r#"{"return":{"status":"running"},"id":7}"#,
            "\n",
            r#"{"error":{"class":"GenericError","desc":"no"},"id":8}"#,
            "\n",
            r#"{"id":-1}"#,
            "\n",
            "[1,2]\nnot json\n"
        );
        assert_eq!(parse_lines(lines.as_bytes()), 3);
        let Incoming::Answer(8, Err((class, desc))) = classify(
            serde_json::from_str(r#"{"error":{"class":"GenericError","desc":"no"},"id":8}"#)
                .unwrap(),
        ) else {
            panic!("an error answer")
        };
        assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "no"));
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_an_error_not_unbounded_memory() {
        let long = vec![b'a'; MAX_LINE + 10];
        let mut reader = BufReader::new(&long[..]);
        assert!(read_line(&mut reader).await.is_err());
        let mut reader = BufReader::new(&b"{\"QMP\":{}}\n"[..]);
        assert!(read_line(&mut reader).await.unwrap().is_some());
    }
}
