//! Build logs: every line is appended to `build.log` (up to [`MAX_LOG_BYTES`] per build; past
//! that a marker says so and the last lines are written when the build ends), kept in a
//! bounded tail for error reports, and broadcast to anyone streaming the build while it runs.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tokio::sync::broadcast;

const TAIL_LINES: usize = 40;
/// The most a build writes to its `build.log` (a step printing forever fills this, not the
/// disk); the last [`TAIL_LINES`] lines are still written at the end.
pub const MAX_LOG_BYTES: u64 = 16 << 20;
/// Longest line kept (longer output lines are cut).
const MAX_LINE: usize = 4096;

/// Receives every log line as it is written (progress display).
pub type LogSink = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

pub struct BuildLog {
    sink: Option<LogSink>,
    file: Mutex<Option<LogFile>>,
    tail: Mutex<VecDeque<String>>,
    live: broadcast::Sender<String>,
    partial: Mutex<Vec<u8>>,
}

/// The file and how much of the cap it used.
struct LogFile {
    file: std::fs::File,
    written: u64,
    cap: u64,
    /// Lines not written since the cap was reached.
    dropped: u64,
}

impl LogFile {
    fn write_line(&mut self, text: &str) {
        let len = text.len() as u64 + 1;
        if self.written + len <= self.cap {
            self.written += len;
            let _ = writeln!(self.file, "{text}");
            return;
        }
        if self.dropped == 0 {
            let _ = writeln!(
                self.file,
                "… the build log reached its {} MiB cap here: later lines are not written; \
                 the last {TAIL_LINES} follow when the build ends",
                self.cap >> 20
            );
        }
        self.dropped += 1;
    }
}

impl BuildLog {
    pub fn create(path: &Path, sink: Option<LogSink>) -> std::io::Result<BuildLog> {
        Self::create_with_cap(path, sink, MAX_LOG_BYTES)
    }

    /// A log whose file holds at most `cap` bytes (plus the marker and the final tail).
    pub fn create_with_cap(
        path: &Path,
        sink: Option<LogSink>,
        cap: u64,
    ) -> std::io::Result<BuildLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(BuildLog {
            sink,
            file: Mutex::new(Some(LogFile {
                file,
                written,
                cap,
                dropped: 0,
            })),
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
            f.write_line(&text);
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

    /// Ends the file: if the cap cut it, how many lines were left out and the last ones.
    pub fn finish(&self) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let Some(f) = file.as_mut() else { return };
        if f.dropped > 0 {
            let _ = writeln!(
                f.file,
                "… {} lines were not written; the last {TAIL_LINES}:",
                f.dropped
            );
            for line in self.tail.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = writeln!(f.file, "{line}");
            }
        }
        let _ = f.file.sync_data();
        *file = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_over_its_cap_is_marked_and_ends_with_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        let log = BuildLog::create_with_cap(&path, None, 10_000).unwrap();
        for i in 0..100_000 {
            log.line(&format!("line {i:06} of a step that prints forever"));
        }
        log.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() < 10_000 + 4_096, "{} bytes", text.len());
        assert!(text.starts_with("line 000000"), "the start is kept");
        assert!(text.contains("reached its 0 MiB cap here"), "marked");
        assert!(text.contains("lines were not written; the last 40:"));
        assert!(
            text.trim_end()
                .ends_with("line 099999 of a step that prints forever"),
            "the end is kept"
        );
        assert_eq!(log.tail().lines().count(), TAIL_LINES);
    }
}
