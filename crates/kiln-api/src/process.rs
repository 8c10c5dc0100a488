//! The processes API: programs started in a RUNNING microVM that keep running on their own
//! (across suspend and resume too), whose output is kept by the guest (the newest 1 MiB
//! each) and streamed as it comes, and which take stdin, signals and terminal resizes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Most arguments in a command.
pub const MAX_ARGS: usize = 1024;
/// Longest argument, shell line, environment value or working directory (bytes).
pub const MAX_ARG_BYTES: usize = 64 << 10;
/// Most environment variables a process is started with.
pub const MAX_ENV: usize = 256;
/// Most bytes of arguments and environment together (the guest's kernel takes about 2 MiB;
/// this keeps a start within one agent frame).
pub const MAX_COMMAND_BYTES: usize = 256 << 10;
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 256;
/// Most stdin bytes one WriteProcessStdin takes.
pub const MAX_STDIN_BYTES: usize = 1 << 20;
/// Largest terminal side, in cells.
pub const MAX_TERM_CELLS: u16 = 1000;
/// ProcessOutput streams one microVM may have open at once.
pub const MAX_OUTPUT_STREAMS_PER_MICROVM: usize = 32;
/// Processes one microVM's agent keeps (running or exited).
pub const MAX_PROCESSES: usize = 128;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TerminalSize {
    #[schema(minimum = 1, maximum = 1000, example = 80)]
    pub cols: u16,
    #[schema(minimum = 1, maximum = 1000, example = 24)]
    pub rows: u16,
}

impl TerminalSize {
    pub fn check(&self) -> Result<(), String> {
        let ok = |n: u16| (1..=MAX_TERM_CELLS).contains(&n);
        if ok(self.cols) && ok(self.rows) {
            Ok(())
        } else {
            Err(format!(
                "a terminal of {}x{} cells: cols and rows must be 1 to {MAX_TERM_CELLS}",
                self.cols, self.rows
            ))
        }
    }
}

/// StartProcess's request: `command` (a program and its arguments) or `shell` (a line for
/// `/bin/sh -c`), not both.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StartProcessRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_items = 1, max_items = 1024, example = json!(["python3", "train.py"]))]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 65536,
        example = "npm run dev > /tmp/dev.log"
    )]
    pub shell: Option<String>,
    /// Added to the base environment (PATH, HOME, HOSTNAME), overriding it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096, pattern = "^/[^\\x00]*$")]
    pub cwd: Option<String>,
    /// Guest user: `name`, `uid` or `uid:gid` (root when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_.-]*:?[A-Za-z0-9_.-]*$"
    )]
    pub user: Option<String>,
    /// Run it on a pseudo-terminal of this size: one output stream (`stdout`), stdin is
    /// the terminal, and it can be resized. Without it: pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<TerminalSize>,
    /// On pipes, keep stdin open for WriteProcessStdin (else it reads /dev/null). A
    /// terminal always takes input.
    #[serde(default)]
    pub stdin: bool,
    /// A label of yours, returned with the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub tag: Option<String>,
}

impl StartProcessRequest {
    /// The argv to run, or what is wrong with the request.
    pub fn argv(&self) -> Result<Vec<String>, String> {
        let argv = match (&self.command, &self.shell) {
            (Some(_), Some(_)) => return Err("give command or shell, not both".into()),
            (None, None) => {
                return Err(
                    "give command (a program and its arguments) or shell (a line \
                            for /bin/sh -c)"
                        .into(),
                )
            }
            (Some(c), None) if c.is_empty() || c[0].is_empty() => {
                return Err("command must start with the program to run".into())
            }
            (Some(c), None) => c.clone(),
            (None, Some(s)) if s.is_empty() => return Err("shell is empty".into()),
            (None, Some(s)) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        };
        if argv.len() > MAX_ARGS {
            return Err(format!("{} arguments; at most {MAX_ARGS}", argv.len()));
        }
        let nul = |s: &str| s.contains('\0');
        if let Some(a) = argv.iter().find(|a| a.len() > MAX_ARG_BYTES || nul(a)) {
            return Err(format!(
                "an argument of {} bytes{}: at most {MAX_ARG_BYTES}, and no NUL bytes",
                a.len(),
                if nul(a) { " with a NUL byte" } else { "" }
            ));
        }
        if self.env.len() > MAX_ENV {
            return Err(format!(
                "{} environment variables; at most {MAX_ENV}",
                self.env.len()
            ));
        }
        for (k, v) in &self.env {
            let key_ok = !k.is_empty() && k.len() <= 256 && !k.contains(['=', '\0']);
            if !key_ok || v.len() > MAX_ARG_BYTES || nul(v) {
                return Err(format!(
                    "environment variable {k:?}: names are 1 to 256 bytes without = or NUL, \
                     values at most {MAX_ARG_BYTES} bytes without NUL"
                ));
            }
        }
        if let Some(cwd) = &self.cwd {
            crate::files::check_path("cwd", cwd)?;
        }
        crate::files::check_user(self.user.as_deref())?;
        if let Some(size) = &self.pty {
            size.check()?;
        }
        check_tag(self.tag.as_deref())?;
        let total: usize = argv.iter().map(String::len).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>();
        if total > MAX_COMMAND_BYTES {
            return Err(format!(
                "the arguments and environment are {total} bytes together; at most \
                 {MAX_COMMAND_BYTES} (pass large input on stdin or in a file instead)"
            ));
        }
        Ok(argv)
    }
}

/// A tag as a request may give it: at most [`MAX_TAG_BYTES`].
pub fn check_tag(tag: Option<&str>) -> Result<(), String> {
    match tag {
        Some(t) if t.len() > MAX_TAG_BYTES => {
            Err(format!("tag is {} bytes; at most {MAX_TAG_BYTES}", t.len()))
        }
        _ => Ok(()),
    }
}

/// A process started through the processes API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// Its pid in the guest: its id in this API.
    pub pid: u32,
    /// Its command line (cut at 2 KiB).
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Its terminal's size, when it runs on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<TerminalSize>,
    pub running: bool,
    /// Its stdin (or terminal) still takes input.
    pub stdin_open: bool,
    /// When it started, Unix milliseconds (the guest's clock).
    pub started_ms: i64,
    /// Set once it exited normally.
    pub exit_code: Option<i32>,
    /// Set once a signal ended it.
    pub signal: Option<i32>,
    /// The oldest output byte still kept (older output was dropped to stay within 1 MiB).
    pub output_start: u64,
    /// Bytes of output (stdout and stderr together) so far.
    pub output_end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessList {
    /// By pid.
    pub processes: Vec<Process>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListProcessesQuery {
    /// Only running (`true`) or only exited (`false`) processes.
    pub running: Option<bool>,
    /// Only processes with this tag.
    #[param(max_length = 256)]
    pub tag: Option<String>,
    /// At most this many per page (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The previous page's `nextCursor`.
    #[param(pattern = "^[a-z0-9.-]{1,160}$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GetProcessQuery {
    /// Answer once the process exited, or after this many seconds with it as it is then
    /// (default 0: at once).
    #[param(minimum = 0, maximum = 300)]
    pub wait_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ProcessOutputQuery {
    /// The output offset to start from (default 0, the oldest kept); an SSE client's
    /// `Last-Event-ID` header does the same.
    pub from: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WriteStdinQuery {
    /// Close stdin after these bytes (on a terminal: send ^D).
    pub eof: Option<bool>,
}

/// Which output bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputStreamName {
    Stdout,
    Stderr,
}

/// An `output` event of ProcessOutput: bytes at `offset` of the process's output. The
/// event's SSE id is the offset after them (what `from` or `Last-Event-ID` resume at).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessOutputEvent {
    pub stream: OutputStreamName,
    pub offset: u64,
    /// The bytes, base64 (standard alphabet, padded).
    pub data: String,
}

/// The events a ProcessOutput stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProcessOutputEventName {
    /// Output bytes: `data` is a ProcessOutputEvent.
    Output,
    /// The process exited and all its output was sent: `data` is the Process. The last event.
    Exit,
    /// The stream broke (a suspend or stop): `data` says why, as text. The last event.
    Error,
}

/// One server-sent event of ProcessOutput as an SSE parser reads it (the OpenAPI way of
/// describing `text/event-stream`: one schema per event, with the fields the HTML standard
/// names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessOutputSse {
    pub event: ProcessOutputEventName,
    /// The output offset after the last `output` event's bytes: resume there with `from` or
    /// `Last-Event-ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[0-9]+$", nullable = false)]
    pub id: Option<String>,
    /// JSON of a ProcessOutputEvent (`output`) or of the Process (`exit`); text (`error`).
    pub data: String,
}

/// SignalProcess's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignalProcessRequest {
    /// A name (`TERM`, `SIGTERM`, `INT`, `KILL`, `HUP`, …) or a number (1 to 64). It goes
    /// to the process's whole process group.
    #[schema(min_length = 1, max_length = 16, example = "TERM")]
    pub signal: String,
}

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ABRT", 6),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("WINCH", 28),
];

/// A signal name or number as Linux numbers it.
pub fn parse_signal(text: &str) -> Result<i32, String> {
    if let Ok(n) = text.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("signal {n}: numbers are 1 to 64"))
        };
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let known: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown signal {text:?}: give a number or one of {}",
                known.join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("sigkill"), Ok(9));
        assert_eq!(parse_signal("2"), Ok(2));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("BOGUS").unwrap_err().contains("TERM"));
    }

    #[test]
    fn a_request_needs_exactly_one_way_to_name_the_program() {
        let mut r = StartProcessRequest::default();
        assert!(r.argv().is_err());
        r.shell = Some("echo hi".into());
        assert_eq!(r.argv().unwrap(), ["/bin/sh", "-c", "echo hi"]);
        r.command = Some(vec!["ls".into()]);
        assert!(r.argv().unwrap_err().contains("not both"));
        r.shell = None;
        assert_eq!(r.argv().unwrap(), ["ls"]);
        r.command = Some(vec![]);
        assert!(r.argv().is_err());
    }

    #[test]
    fn bad_parts_are_named() {
        let base = StartProcessRequest {
            command: Some(vec!["sh".into()]),
            ..Default::default()
        };
        let mut r = base.clone();
        r.env.insert("A=B".into(), "x".into());
        assert!(r.argv().unwrap_err().contains("A=B"));
        let mut r = base.clone();
        r.cwd = Some("relative".into());
        assert!(r.argv().is_err());
        let mut r = base.clone();
        r.pty = Some(TerminalSize { cols: 0, rows: 24 });
        assert!(r.argv().unwrap_err().contains("0x24"));
        let mut r = base.clone();
        r.command = Some(vec!["a\0b".into()]);
        assert!(r.argv().unwrap_err().contains("NUL"));
        let mut r = base.clone();
        r.tag = Some("t".repeat(MAX_TAG_BYTES + 1));
        assert!(r.argv().unwrap_err().contains("257"));
        // Each argument within its limit, all of them over the total.
        let mut r = base;
        r.command = Some(vec!["a".repeat(MAX_ARG_BYTES); 5]);
        assert!(r.argv().unwrap_err().contains("at most 262144"));
        r.command = Some(vec!["a".repeat(MAX_ARG_BYTES); 3]);
        assert!(r.argv().is_ok());
    }
}
