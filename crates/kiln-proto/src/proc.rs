//! Generation 6: processes that outlive the stream that started them. The agent keeps a
//! table of the processes it started, each with a bounded ring of its output, so the host
//! can start one, go away (a suspend ends every session), and attach again later from the
//! byte offset where it left off.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::message::{ExitStatus, ProcessSpec};

/// A terminal's size, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermSize {
    pub cols: u16,
    pub rows: u16,
}

/// Starts a process the agent keeps track of. Reply: `Process` (its pid is its id), or
/// `Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcStartRequest {
    pub process: ProcessSpec,
    /// Run it on a new pseudo-terminal of this size (stdout and stderr are then one stream,
    /// and stdin is the terminal); else on pipes.
    pub pty: Option<TermSize>,
    /// On pipes: keep stdin open for `ProcControl` writes (else it is /dev/null).
    pub stdin: bool,
    /// A label of the caller's, returned in listings.
    pub tag: Option<String>,
}

/// Streams a process's output from byte `from` of it (output older than the ring holds is
/// skipped: the first `Output` frame's offset says where it resumes). Reply: `Process`, then
/// `Output` frames, then `Exited` once the process exited and all its output was sent. The
/// host may send `Stdin`, `StdinEof`, `Signal` and `Resize` frames meanwhile; closing the
/// stream detaches without touching the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcAttachRequest {
    pub pid: u32,
    pub from: u64,
}

/// One operation on a running process. Reply `Ok` or `Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcControlRequest {
    pub pid: u32,
    pub op: ProcOp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcOp {
    /// Bytes for its stdin (or its terminal).
    Stdin(ByteBuf),
    /// Closes a piped stdin; on a terminal, sends the EOF character.
    CloseStdin,
    /// A signal for its process group.
    Signal(i32),
    /// A new terminal size (terminal processes only).
    Resize(TermSize),
}

/// Waits for a process to exit, at most `timeout_ms`. Reply: `Process` (with `exit` set if
/// it exited in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcWaitRequest {
    pub pid: u32,
    pub timeout_ms: u64,
}

/// What the agent knows of one process it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub pid: u32,
    pub argv: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub tag: Option<String>,
    /// Its size when it runs on a terminal.
    pub pty: Option<TermSize>,
    /// Its stdin still takes bytes.
    pub stdin_open: bool,
    /// Wall-clock start, Unix milliseconds (the guest's clock).
    pub started_ms: i64,
    /// Set once it exited and was reaped.
    pub exit: Option<ExitStatus>,
    /// The oldest output byte the ring still holds.
    pub output_start: u64,
    /// Bytes of output so far.
    pub output_end: u64,
}

/// Which of a process's outputs bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Output bytes at `offset` of the process's output (stdout and stderr share one count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcOutput {
    pub stream: OutputStream,
    pub offset: u64,
    pub data: ByteBuf,
}
