//! Build logs: every line is appended to `build.log`, kept in a bounded tail for error
//! reports, and broadcast to anyone streaming the build while it runs.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tokio::sync::broadcast;

const TAIL_LINES: usize = 40;
/// Longest line kept (longer output lines are cut).
const MAX_LINE: usize = 4096;

/// Receives every log line as it is written (progress display).
pub type LogSink = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

pub struct BuildLog {
    sink: Option<LogSink>,
    file: Mutex<Option<std::fs::File>>,
    tail: Mutex<VecDeque<String>>,
    live: broadcast::Sender<String>,
    partial: Mutex<Vec<u8>>,
}

impl BuildLog {
    pub fn create(path: &Path, sink: Option<LogSink>) -> std::io::Result<BuildLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(BuildLog {
            sink,
            file: Mutex::new(Some(file)),
            tail: Mutex::new(VecDeque::new()),
            live: broadcast::channel(1024).0,
            partial: Mutex::new(Vec::new()),
        })
    }

    /// Streams lines as they are logged.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.live.subscribe()
    }

    pub fn line(&self, text: &str) {
        let mut text = text.to_string();
        if text.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(" …");
        }
        if let Some(f) = self.file.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = writeln!(f, "{text}");
        }
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.push_back(text.clone());
        if tail.len() > TAIL_LINES {
            tail.pop_front();
        }
        if let Some(sink) = &self.sink {
            sink(&text);
        }
        let _ = self.live.send(text);
    }

    /// Output bytes from a step: split into lines, prefixed with the step number.
    pub fn output(&self, step: usize, bytes: &[u8]) {
        let mut partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
        partial.extend_from_slice(bytes);
        while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            self.line(&format!("[{step}] {text}"));
        }
        if partial.len() > MAX_LINE {
            let text = String::from_utf8_lossy(&partial).into_owned();
            partial.clear();
            self.line(&format!("[{step}] {text}"));
        }
    }

    /// Flushes a trailing partial line.
    pub fn end_output(&self, step: usize) {
        let rest: Vec<u8> =
            std::mem::take(&mut *self.partial.lock().unwrap_or_else(|p| p.into_inner()));
        if !rest.is_empty() {
            self.line(&format!("[{step}] {}", String::from_utf8_lossy(&rest)));
        }
    }

    pub fn tail(&self) -> String {
        self.tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}
