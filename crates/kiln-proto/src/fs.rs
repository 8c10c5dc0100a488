//! Generation 5: the files API's messages. Every operation names the guest user it runs as
//! (root when absent); the agent performs it with that user's credentials, so the guest's
//! own permissions decide and a refusal is the guest's own error.

use serde::{Deserialize, Serialize};

/// A path in the guest, and who touches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Absolute.
    pub path: String,
    /// `name`, `uid` or `uid:gid`; root when absent.
    pub user: Option<String>,
}

/// One metadata operation. Replies: `List` → `Entries` frames then `End`; `Stat`, `Mkdir`
/// and `Rename` → `Entry` (of the path, the directory, the new name); `Remove` → `Ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsOp {
    /// A directory's entries (not `.` and `..`), at most `limit` of them, by name.
    List {
        path: String,
        limit: u32,
    },
    /// Does not follow a final symlink.
    Stat {
        path: String,
    },
    /// With `parents`, like `mkdir -p`: missing parents are made and an existing directory
    /// is not an error.
    Mkdir {
        path: String,
        mode: u32,
        parents: bool,
    },
    /// A directory only with `recursive`; `/` never.
    Remove {
        path: String,
        recursive: bool,
    },
    Rename {
        from: String,
        to: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRequest {
    pub op: FsOp,
    pub user: Option<String>,
}

/// Host then sends `Chunk`s totalling `size` bytes and `End`; reply `Entry` of the written
/// file, or `Error`. The file is written beside the target and renamed over it, so a reader
/// never sees half of it and a failed upload leaves the old one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    pub file: FileRef,
    /// Permission bits; when absent, an existing file's, else 0644.
    pub mode: Option<u32>,
    pub size: u64,
    pub create_parents: bool,
}

/// Host then sends a tar stream (`Chunk`s, `End`) that the agent unpacks under `dest` as
/// `user` (entries may not escape it; ownership is the user's). Reply `Ok` or `Error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackRequest {
    pub dest: FileRef,
    /// Most bytes of tar stream the agent accepts.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Milliseconds since the Unix epoch.
    pub modified_ms: i64,
    /// Where a symlink points.
    pub link_target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsEventKind {
    Create,
    Modify,
    Delete,
}

/// A change in a watched directory (inotify: create and moved-in are `Create`, writes are
/// `Modify`, delete and moved-out are `Delete`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    pub kind: FsEventKind,
    pub path: String,
    pub is_dir: bool,
}
