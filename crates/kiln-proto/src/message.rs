//! Messages carried on agent streams. Every stream the host opens starts with one
//! [`Request`]; what follows depends on the request and is documented on each variant.
//!
//! Wire compatibility: postcard encodes enum variants by index, so new variants go at the
//! end, tagged with the generation that introduced them ([`Tagged::since`]). Changing an
//! existing encoding requires a new generation; `tests/schema.rs` enforces it.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

pub use crate::fs::*;
pub use crate::proc::*;

/// The generation that introduced a message or variant.
pub trait Tagged {
    fn since(&self) -> u16;
}

/// First frame on every host-opened stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Reply: [`GuestFrame::Pong`].
    Ping,
    /// Reply: `Started`, then any of `Stdout`/`Stderr`, then `Exited` (or `Error`).
    /// The host may send `Stdin`, `StdinEof` and `Signal` frames meanwhile.
    Exec(ExecRequest),
    /// Host then sends `Chunk`s totalling `size` bytes and `End`; reply `Ok` or `Error`.
    PutFile(PutFileRequest),
    /// Reply: `FileMeta` then `Chunk`s and `End`, or `Error`.
    GetFile(GetFileRequest),
    /// Reply: `Http` or `Error`.
    Http(HttpRequest),
    /// Reply: `Connected`, after which the stream carries raw bytes to and from the guest
    /// TCP port; or `Error`.
    Connect { port: u16 },
    /// Starts the supervised app process. Reply: `App` or `Error`.
    StartApp(ProcessSpec),
    /// Reply: `App`.
    AppStatus,
    /// Reply: `Logs` with at most `max_bytes` of the tail of the app's output.
    AppLogs { max_bytes: u32 },
    /// The host is about to snapshot the VM or go away: the agent replies `Ok`, ends this
    /// session and waits for a new handshake.
    Detach,
    /// Host then sends a tar stream as `Chunk`s and `End`; the agent unpacks it under
    /// `dest` (entries may not escape it). Reply `Ok` or `Error`.
    PutArchive(PutArchiveRequest),
    /// Generation 2. Runs a process on a new pseudo-terminal. Reply: `Started`, then
    /// `Stdout` (the terminal's output), then `Exited`. The host may send `Stdin`, `Resize`
    /// and `Signal` meanwhile.
    Shell(ShellRequest),
    /// Generation 3. Takes the guest's NICs away (the `none` connector): the agent unbinds
    /// every virtio-net device from its driver, so no interface but `lo` is left. Reply `Ok`,
    /// or `Error` when an interface remains. The agent does it itself: an image needs no
    /// shell for it.
    DetachNic,
    /// Generation 4. The guest's own view of its memory and root disk. Reply: `Stats`.
    Stats,
    /// Generation 5. A metadata operation (list, stat, mkdir, remove, rename); replies on
    /// [`FsOp`].
    Fs(FsRequest),
    /// Generation 5. Reads a file as a user. Reply: `FileMeta`, `Chunk`s, `End`; or `Error`.
    ReadFile(FileRef),
    /// Generation 5. See [`WriteFileRequest`].
    WriteFile(WriteFileRequest),
    /// Generation 5. A directory as a tar stream: `Chunk`s then `End`; an `Error` at any point
    /// ends it.
    GetArchive(FileRef),
    /// Generation 5. See [`UnpackRequest`].
    UnpackArchive(UnpackRequest),
    /// Generation 5. Watches a directory: reply `Ok` once watching, then `FsEvent`s until
    /// the host closes the stream, or `End` when the directory itself went away.
    Watch(FileRef),
    /// Generation 6. See [`ProcStartRequest`].
    ProcStart(ProcStartRequest),
    /// Generation 6. Reply: `Processes`, every process the agent keeps, by pid.
    ProcList,
    /// Generation 6. See [`ProcAttachRequest`].
    ProcAttach(ProcAttachRequest),
    /// Generation 6. See [`ProcControlRequest`].
    ProcControl(ProcControlRequest),
    /// Generation 6. See [`ProcWaitRequest`].
    ProcWait(ProcWaitRequest),
}

impl Tagged for Request {
    fn since(&self) -> u16 {
        match self {
            Request::Ping
            | Request::Exec(_)
            | Request::PutFile(_)
            | Request::GetFile(_)
            | Request::Http(_)
            | Request::Connect { .. }
            | Request::StartApp(_)
            | Request::AppStatus
            | Request::AppLogs { .. }
            | Request::Detach
            | Request::PutArchive(_) => 1,
            Request::Shell(_) => 2,
            Request::DetachNic => 3,
            Request::Stats => 4,
            Request::Fs(_)
            | Request::ReadFile(_)
            | Request::WriteFile(_)
            | Request::GetArchive(_)
            | Request::UnpackArchive(_)
            | Request::Watch(_) => 5,
            Request::ProcStart(_)
            | Request::ProcList
            | Request::ProcAttach(_)
            | Request::ProcControl(_)
            | Request::ProcWait(_) => 6,
        }
    }
}

/// What to run and as whom. Used by exec and by the supervised app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    /// Added to (and overriding) the agent's base environment.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid`; root when absent.
    pub user: Option<String>,
}

impl ExecRequest {
    /// `/bin/sh -c script`, stdin closed, no timeout.
    pub fn shell(script: &str) -> ExecRequest {
        ExecRequest {
            process: ProcessSpec {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
            stdin: false,
            timeout_ms: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub process: ProcessSpec,
    /// When false the child's stdin is /dev/null.
    pub stdin: bool,
    /// Kill the process group after this long.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFileRequest {
    pub path: String,
    pub mode: u32,
    pub size: u64,
    /// Create missing parent directories.
    pub create_parents: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellRequest {
    pub process: ProcessSpec,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutArchiveRequest {
    /// Absolute directory to unpack into; created when missing.
    pub dest: String,
    /// `user[:group]` to own every unpacked entry (and `dest` if created); else as archived.
    pub chown: Option<String>,
    /// Mode for every unpacked file (directories keep theirs).
    pub chmod: Option<u32>,
    /// Most bytes of tar stream the agent accepts.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFileRequest {
    pub path: String,
    /// The agent refuses files larger than this.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// A port on the guest's loopback.
    pub port: u16,
    pub method: String,
    /// Path and query, starting with `/`.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: ByteBuf,
    pub timeout_ms: u64,
    /// Longest response body the host accepts; larger answers are an error.
    pub max_response_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: ByteBuf,
}

/// Frames the host sends after the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostFrame {
    Stdin(ByteBuf),
    StdinEof,
    /// Send this signal to the exec'd process group.
    Signal(i32),
    Chunk(ByteBuf),
    End,
    /// Generation 2: new terminal size for a shell.
    Resize {
        cols: u16,
        rows: u16,
    },
}

impl Tagged for HostFrame {
    fn since(&self) -> u16 {
        match self {
            HostFrame::Stdin(_)
            | HostFrame::StdinEof
            | HostFrame::Signal(_)
            | HostFrame::Chunk(_)
            | HostFrame::End => 1,
            HostFrame::Resize { .. } => 2,
        }
    }
}

/// Frames the guest sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestFrame {
    Ok,
    Error(GuestError),
    Pong(AgentInfo),
    Started {
        pid: u32,
    },
    Stdout(ByteBuf),
    Stderr(ByteBuf),
    Exited(ExitStatus),
    FileMeta {
        size: u64,
        mode: u32,
    },
    Chunk(ByteBuf),
    End,
    Http(HttpResponse),
    App(AppState),
    Logs(ByteBuf),
    Connected,
    /// Generation 4: the answer to `Stats`.
    Stats(GuestStats),
    /// Generation 5: one file's metadata.
    Entry(FileEntry),
    /// Generation 5: some of a directory's entries (a listing is several, then `End`).
    Entries(Vec<FileEntry>),
    /// Generation 5: a change in a watched directory.
    FsEvent(FsEvent),
    /// Generation 6: one process the agent keeps.
    Process(ProcInfo),
    /// Generation 6: the answer to `ProcList`.
    Processes(Vec<ProcInfo>),
    /// Generation 6: a process's output on an attached stream.
    Output(ProcOutput),
}

/// What the guest says of itself (`/proc/meminfo`, `statvfs("/")`); 0 where it could not
/// read a value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
}

impl Tagged for GuestFrame {
    fn since(&self) -> u16 {
        match self {
            GuestFrame::Ok
            | GuestFrame::Error(_)
            | GuestFrame::Pong(_)
            | GuestFrame::Started { .. }
            | GuestFrame::Stdout(_)
            | GuestFrame::Stderr(_)
            | GuestFrame::Exited(_)
            | GuestFrame::FileMeta { .. }
            | GuestFrame::Chunk(_)
            | GuestFrame::End
            | GuestFrame::Http(_)
            | GuestFrame::App(_)
            | GuestFrame::Logs(_)
            | GuestFrame::Connected => 1,
            GuestFrame::Stats(_) => 4,
            GuestFrame::Entry(_) | GuestFrame::Entries(_) | GuestFrame::FsEvent(_) => 5,
            GuestFrame::Process(_) | GuestFrame::Processes(_) | GuestFrame::Output(_) => 6,
        }
    }
}

impl GuestFrame {
    /// Short name for error messages ("peer sent Stdout while ... was expected").
    pub fn name(&self) -> &'static str {
        match self {
            GuestFrame::Ok => "Ok",
            GuestFrame::Error(_) => "Error",
            GuestFrame::Pong(_) => "Pong",
            GuestFrame::Started { .. } => "Started",
            GuestFrame::Stdout(_) => "Stdout",
            GuestFrame::Stderr(_) => "Stderr",
            GuestFrame::Exited(_) => "Exited",
            GuestFrame::FileMeta { .. } => "FileMeta",
            GuestFrame::Chunk(_) => "Chunk",
            GuestFrame::End => "End",
            GuestFrame::Http(_) => "Http",
            GuestFrame::App(_) => "App",
            GuestFrame::Logs(_) => "Logs",
            GuestFrame::Connected => "Connected",
            GuestFrame::Stats(_) => "Stats",
            GuestFrame::Entry(_) => "Entry",
            GuestFrame::Entries(_) => "Entries",
            GuestFrame::FsEvent(_) => "FsEvent",
            GuestFrame::Process(_) => "Process",
            GuestFrame::Processes(_) => "Processes",
            GuestFrame::Output(_) => "Output",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    InvalidRequest,
    NotFound,
    PermissionDenied,
    TooLarge,
    Timeout,
    Io,
    Unsupported,
    /// Generation 5 (only in replies to generation-5 requests): the path exists, or a
    /// directory is not empty.
    Conflict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({kind:?})")]
pub struct GuestError {
    pub kind: ErrorKind,
    pub message: String,
}

impl GuestError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        GuestError {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when the process was killed.
    pub signal: Option<i32>,
    /// True when the agent killed it because its timeout passed.
    pub timed_out: bool,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub generation: u16,
    /// Guest monotonic time since boot, in milliseconds (keeps counting across restores).
    pub uptime_ms: u64,
    /// Handshakes accepted since the guest booted.
    pub sessions: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppState {
    pub pid: Option<u32>,
    pub running: bool,
    pub exit: Option<ExitStatus>,
}
