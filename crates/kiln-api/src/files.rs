//! The files API: a RUNNING microVM's filesystem, as a guest user (root when `user` is
//! absent). The guest's kernel decides what that user may touch; its refusals come back
//! with its own words.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Most entries one ListFiles answers with.
pub const MAX_LIST_ENTRIES: u32 = 10_000;
/// Entries ListFiles answers with when `limit` is absent.
pub const DEFAULT_LIST_ENTRIES: u32 = 1_000;
/// Longest path kilnd passes on (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Watches one microVM may have open at once.
pub const MAX_WATCHES_PER_MICROVM: usize = 8;
/// Largest tar stream UploadArchive takes (64 GiB).
pub const MAX_ARCHIVE_BYTES: u64 = 64 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

/// One path's metadata (a final symlink is not followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits in octal, as `ls -l` and `chmod` count them.
    #[schema(example = "0644")]
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    /// Last modification, Unix milliseconds.
    pub modified_ms: i64,
    /// Where a symlink points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// A directory's entries, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileList {
    pub path: String,
    pub entries: Vec<FileEntry>,
    /// The directory has more entries than `limit`.
    pub truncated: bool,
}

/// A path and the guest user to touch it as.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FilePathQuery {
    /// Absolute path in the guest.
    #[param(max_length = 4096, pattern = "^/[^\\x00]*$", example = "/app/data.csv")]
    pub path: String,
    /// Guest user: `name`, `uid` or `uid:gid` (root when absent).
    #[param(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_.-]*:?[A-Za-z0-9_.-]*$"
    )]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListFilesQuery {
    /// Absolute path of a directory in the guest.
    #[param(max_length = 4096, pattern = "^/[^\\x00]*$", example = "/app")]
    pub path: String,
    /// Guest user: `name`, `uid` or `uid:gid` (root when absent).
    #[param(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_.-]*:?[A-Za-z0-9_.-]*$"
    )]
    pub user: Option<String>,
    /// Most entries (default 1000, at most 10000).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveFileQuery {
    /// Absolute path in the guest (never `/`).
    #[param(max_length = 4096, pattern = "^/[^\\x00]*$")]
    pub path: String,
    /// Guest user: `name`, `uid` or `uid:gid` (root when absent).
    #[param(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_.-]*:?[A-Za-z0-9_.-]*$"
    )]
    pub user: Option<String>,
    /// Remove a directory and everything in it; without it only an empty directory goes.
    pub recursive: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WriteFileQuery {
    /// Absolute path of the file in the guest.
    #[param(max_length = 4096, pattern = "^/[^\\x00]*$")]
    pub path: String,
    /// Guest user: `name`, `uid` or `uid:gid` (root when absent); the file is theirs.
    #[param(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_.-]*:?[A-Za-z0-9_.-]*$"
    )]
    pub user: Option<String>,
    /// Permission bits in octal (default: an existing file's, else 0644).
    #[param(max_length = 8, pattern = "^(0o)?0?[0-7]{1,4}$", example = "0644")]
    pub mode: Option<String>,
    /// Make missing parent directories (default true).
    pub create_parents: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MakeDirectoryRequest {
    /// Absolute path in the guest.
    #[schema(max_length = 4096, pattern = "^/[^\\x00]*$", example = "/app/out")]
    pub path: String,
    /// Guest user: `name`, `uid` or `uid:gid` (root when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_.-]*:?[A-Za-z0-9_.-]*$"
    )]
    pub user: Option<String>,
    /// Permission bits in octal (default 0755; the guest's umask applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 8, pattern = "^(0o)?0?[0-7]{1,4}$", example = "0755")]
    pub mode: Option<String>,
    /// Like `mkdir -p` (default true): parents made, an existing directory is no error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parents: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoveFileRequest {
    /// Absolute path in the guest.
    #[schema(max_length = 4096, pattern = "^/[^\\x00]*$")]
    pub from: String,
    /// Absolute path in the guest, on the same filesystem.
    #[schema(max_length = 4096, pattern = "^/[^\\x00]*$")]
    pub to: String,
    /// Guest user: `name`, `uid` or `uid:gid` (root when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_.-]*:?[A-Za-z0-9_.-]*$"
    )]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileEventKind {
    /// Created or moved in.
    Create,
    /// Written to.
    Modify,
    /// Removed or moved out.
    Delete,
}

/// One change in a watched directory: the `data` of a `file` event on the watch's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileEvent {
    pub kind: FileEventKind,
    pub path: String,
    pub is_dir: bool,
}

/// The events a WatchFiles stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileWatchEventName {
    /// A change: `data` is a FileEvent.
    File,
    /// The directory went away (`data` is `gone`). The last event.
    End,
    /// The watch broke (a suspend or stop): `data` says why, as text. The last event.
    Error,
}

/// One server-sent event of WatchFiles as an SSE parser reads it (the OpenAPI way of
/// describing `text/event-stream`: one schema per event, with the fields the HTML standard
/// names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileWatchSse {
    pub event: FileWatchEventName,
    /// JSON of a FileEvent (`file`); text (`end`, `error`).
    pub data: String,
}

/// A guest path as kilnd passes it on: absolute, without NUL, at most [`MAX_PATH_BYTES`].
pub fn check_path(name: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{name} {path:?} must be an absolute path (start with /)"
        ));
    }
    if path.contains('\0') {
        return Err(format!("{name} must not contain a NUL byte"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!(
            "{name} is {} bytes, over the {MAX_PATH_BYTES}-byte limit",
            path.len()
        ));
    }
    Ok(())
}

/// A guest user as kilnd passes it on: `name`, `uid` or `uid:gid`, at most 64 bytes of
/// letters, digits, `_`, `-`, `.` and one `:`.
pub fn check_user(user: Option<&str>) -> Result<(), String> {
    let Some(u) = user else { return Ok(()) };
    let ok = !u.is_empty()
        && u.len() <= 64
        && u.matches(':').count() <= 1
        && u.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "user {u:?} must be a name, a uid or uid:gid (letters, digits, _ - . and one :, \
             at most 64)"
        ))
    }
}

/// Octal permission bits: `644`, `0644` or `0o644`, at most `7777`.
pub fn parse_mode(mode: &str) -> Result<u32, String> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    let octal = digits.bytes().all(|b| matches!(b, b'0'..=b'7'));
    match u32::from_str_radix(digits, 8) {
        Ok(m) if octal && m <= 0o7777 && !digits.is_empty() && digits.len() <= 5 => Ok(m),
        _ => Err(format!(
            "mode {mode:?} must be octal permission bits such as 0644 (at most 7777)"
        )),
    }
}

/// Permission bits as [`FileEntry::mode`] shows them.
pub fn format_mode(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_paths_and_users_are_checked() {
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert_eq!(parse_mode("0o4755"), Ok(0o4755));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("17777").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("+644").is_err());
        assert_eq!(format_mode(0o100644), "0644");
        assert!(check_path("path", "/a/b").is_ok());
        assert!(check_path("path", "a/b").unwrap_err().contains("absolute"));
        assert!(check_path("path", "/a\0").is_err());
        assert!(check_path("path", &format!("/{}", "a".repeat(MAX_PATH_BYTES))).is_err());
        assert!(check_user(Some("app")).is_ok());
        assert!(check_user(Some("1000:1000")).is_ok());
        assert!(check_user(Some("a b")).is_err());
        assert!(check_user(Some("1:2:3")).is_err());
        assert!(check_user(None).is_ok());
    }
}
