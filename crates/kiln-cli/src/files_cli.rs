//! `kiln cp`, `kiln ls ID:/path` and `kiln fs …`: a microVM's files through kilnd's files
//! API. A remote path is written `MICROVM_ID:/absolute/path`; `-` is stdin or stdout.
//! Directories travel as tar streams; what comes back from a guest is unpacked with the
//! tar crate's checks (no entry lands outside the destination) and without its owners.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use kiln_client::api::{FileEntry, FileKind, MakeDirectoryRequest, MoveFileRequest};
use kiln_client::{Client, ClientError, WriteOptions};

use crate::remote::{print_json, Conn};

#[derive(Args)]
pub struct CpArgs {
    /// What to copy: a local path, `-` (stdin), or `MICROVM_ID:/path`.
    src: String,
    /// Where to: a local path, `-` (stdout), or `MICROVM_ID:/path`.
    dst: String,
    /// The guest user to act as (default: the image's user).
    #[arg(long)]
    user: Option<String>,
    /// Mode of a file written into the guest, in octal (default 0644).
    #[arg(long)]
    mode: Option<String>,
}

#[derive(Subcommand)]
pub enum FsCommand {
    /// A path's metadata.
    Stat { target: String },
    /// Print a file.
    Cat { target: String },
    /// Make a directory and its missing parents.
    Mkdir {
        target: String,
        #[arg(long)]
        mode: Option<String>,
    },
    /// Remove a file, or a directory with --recursive.
    Rm {
        target: String,
        #[arg(short, long)]
        recursive: bool,
    },
    /// Rename within the microVM: `kiln fs mv ID:/from /to`.
    Mv { target: String, to: String },
    /// Print changes under a directory as they happen (create, modify, delete).
    Watch { target: String },
}

#[derive(Debug, thiserror::Error)]
enum FilesError {
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Local {
        what: String,
        source: std::io::Error,
    },
}

fn local(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FilesError {
    let what = what.into();
    move |source| FilesError::Local { what, source }
}

/// `MICROVM_ID:/path` split in two; `None` for a local path.
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    let id_like = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    (id_like && path.starts_with('/')).then_some((id, path))
}

fn target(s: &str) -> Result<(&str, &str), FilesError> {
    remote(s).ok_or_else(|| {
        FilesError::Usage(format!(
            "'{s}' is not MICROVM_ID:/absolute/path (e.g. mvm-0123abcd:/data)"
        ))
    })
}

fn finish(r: Result<i32, FilesError>) -> i32 {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e}");
            match e {
                FilesError::Api(e) => e.exit_code(),
                FilesError::Usage(_) => 2,
                FilesError::Local { .. } => 1,
            }
        }
    }
}

fn client(conn: &Conn) -> Result<Client, FilesError> {
    Ok(Client::from_env(
        conn.endpoint.clone(),
        conn.api_key.clone(),
    )?)
}

pub fn cp(conn: Conn, args: CpArgs) -> i32 {
    finish(copy(&conn, &args))
}

pub fn fs(conn: Conn, cmd: FsCommand, user: Option<String>) -> i32 {
    finish(fs_command(&conn, cmd, user.as_deref()))
}

/// `kiln ls ID:/path`: a directory's entries (or one file's).
pub fn ls(conn: Conn, spec: &str, user: Option<String>) -> i32 {
    finish(list(&conn, spec, user.as_deref()))
}

fn list(conn: &Conn, spec: &str, user: Option<&str>) -> Result<i32, FilesError> {
    let (id, path) = target(spec)?;
    let c = client(conn)?;
    let entry = c.stat_file(id, path, user)?;
    if entry.kind != FileKind::Directory {
        show(conn, &[entry]);
        return Ok(0);
    }
    let list = c.list_files(
        id,
        path,
        user,
        Some(kiln_client::api::files::MAX_LIST_ENTRIES),
    )?;
    if conn.json() {
        print_json(&list);
    } else {
        show(conn, &list.entries);
        if list.truncated {
            eprintln!("kiln: more entries than shown ({})", list.entries.len());
        }
    }
    Ok(0)
}

fn show(conn: &Conn, entries: &[FileEntry]) {
    if conn.json() {
        return print_json(&entries);
    }
    for e in entries {
        let kind = match e.kind {
            FileKind::Directory => 'd',
            FileKind::Symlink => 'l',
            FileKind::File => '-',
            FileKind::Other => '?',
        };
        let name = match &e.link_target {
            Some(t) => format!("{} -> {t}", e.name),
            None => e.name.clone(),
        };
        println!(
            "{kind}{} {:>6} {:>6} {:>12} {name}",
            e.mode, e.uid, e.gid, e.size
        );
    }
}

fn fs_command(conn: &Conn, cmd: FsCommand, user: Option<&str>) -> Result<i32, FilesError> {
    let c = client(conn)?;
    match cmd {
        FsCommand::Stat { target: t } => {
            let (id, path) = target(&t)?;
            let e = c.stat_file(id, path, user)?;
            if conn.json() {
                print_json(&e);
            } else {
                show(conn, &[e]);
            }
        }
        FsCommand::Cat { target: t } => {
            let (id, path) = target(&t)?;
            let mut body = c.read_file(id, path, user)?;
            std::io::copy(&mut body, &mut std::io::stdout().lock()).map_err(local("stdout"))?;
        }
        FsCommand::Mkdir { target: t, mode } => {
            let (id, path) = target(&t)?;
            let e = c.make_directory(
                id,
                &MakeDirectoryRequest {
                    path: path.into(),
                    user: user.map(Into::into),
                    mode,
                    parents: Some(true),
                },
            )?;
            print_path(conn, &e);
        }
        FsCommand::Rm {
            target: t,
            recursive,
        } => {
            let (id, path) = target(&t)?;
            c.remove_file(id, path, user, recursive)?;
        }
        FsCommand::Mv { target: t, to } => {
            let (id, from) = target(&t)?;
            let to = remote(&to).map_or(to.as_str(), |(_, p)| p);
            let e = c.move_file(
                id,
                &MoveFileRequest {
                    from: from.into(),
                    to: to.into(),
                    user: user.map(Into::into),
                },
            )?;
            print_path(conn, &e);
        }
        FsCommand::Watch { target: t } => {
            let (id, path) = target(&t)?;
            for event in c.watch_files(id, path, user)? {
                let event = event?;
                if conn.json() {
                    println!("{}", serde_json::to_string(&event).unwrap_or_default());
                } else {
                    let kind = serde_json::to_value(event.kind).unwrap_or_default();
                    println!("{} {}", kind.as_str().unwrap_or("?"), event.path);
                }
                std::io::stdout().flush().map_err(local("stdout"))?;
            }
        }
    }
    Ok(0)
}

fn print_path(conn: &Conn, e: &FileEntry) {
    if conn.json() {
        print_json(e);
    } else {
        println!("{}", e.path);
    }
}

fn copy(conn: &Conn, a: &CpArgs) -> Result<i32, FilesError> {
    let c = client(conn)?;
    let user = a.user.as_deref();
    match (remote(&a.src), remote(&a.dst)) {
        (Some(_), Some(_)) => Err(FilesError::Usage(
            "both sides are in microVMs: copy through a local path, or use `kiln fs mv` \
             within one"
                .into(),
        )),
        (None, None) => Err(FilesError::Usage(format!(
            "neither '{}' nor '{}' is MICROVM_ID:/path",
            a.src, a.dst
        ))),
        (None, Some((id, path))) => upload(&c, id, path, &a.src, user, a.mode.as_deref()),
        (Some((id, path)), None) => download(&c, id, path, &a.dst, user),
    }
}

/// A local file, stdin or directory into the guest. A file copied onto an existing
/// directory (or a path ending in `/`) keeps its name inside it.
fn upload(
    c: &Client,
    id: &str,
    path: &str,
    src: &str,
    user: Option<&str>,
    mode: Option<&str>,
) -> Result<i32, FilesError> {
    if src != "-" && Path::new(src).is_dir() {
        let mut tar = tempfile::tempfile().map_err(local("a temporary file"))?;
        let mut b = tar::Builder::new(&mut tar);
        b.follow_symlinks(false);
        b.append_dir_all(".", src).map_err(local(src))?;
        b.finish().map_err(local(src))?;
        drop(b);
        let len = tar.stream_position().map_err(local("a temporary file"))?;
        tar.rewind().map_err(local("a temporary file"))?;
        let e = c.upload_archive(id, path, user, tar, len)?;
        println!("{}", e.path);
        return Ok(0);
    }
    let (body, len): (Box<dyn Read>, u64) = if src == "-" {
        let mut tmp = tempfile::tempfile().map_err(local("a temporary file"))?;
        let len = std::io::copy(&mut std::io::stdin().lock(), &mut tmp).map_err(local("stdin"))?;
        tmp.rewind().map_err(local("a temporary file"))?;
        (Box::new(tmp), len)
    } else {
        let f = File::open(src).map_err(local(src))?;
        let len = f.metadata().map_err(local(src))?.len();
        (Box::new(f), len)
    };
    let mut dest = path.to_string();
    let into_dir = path.ends_with('/')
        || matches!(c.stat_file(id, path, user), Ok(e) if e.kind == FileKind::Directory);
    if into_dir && src != "-" {
        let name = Path::new(src)
            .file_name()
            .ok_or_else(|| FilesError::Usage(format!("'{src}' has no file name")))?;
        dest = format!("{}/{}", path.trim_end_matches('/'), name.to_string_lossy());
    }
    let opts = WriteOptions {
        user,
        mode,
        create_parents: false,
    };
    let e = c.write_file(id, &dest, &opts, body, len)?;
    println!("{}", e.path);
    Ok(0)
}

/// A guest file or directory to a local path or stdout. Files land whole or not at all
/// (written beside the target, then renamed).
fn download(
    c: &Client,
    id: &str,
    path: &str,
    dst: &str,
    user: Option<&str>,
) -> Result<i32, FilesError> {
    let entry = c.stat_file(id, path, user)?;
    if entry.kind == FileKind::Directory {
        if dst == "-" {
            let mut tar = c.download_archive(id, path, user)?;
            std::io::copy(&mut tar, &mut std::io::stdout().lock()).map_err(local("stdout"))?;
            return Ok(0);
        }
        std::fs::create_dir_all(dst).map_err(local(dst))?;
        let mut archive = tar::Archive::new(c.download_archive(id, path, user)?);
        archive.set_preserve_permissions(false);
        archive.set_preserve_ownerships(false);
        archive.set_overwrite(true);
        archive.unpack(dst).map_err(local(dst))?;
        return Ok(0);
    }
    let mut body = c.read_file(id, path, user)?;
    if dst == "-" {
        std::io::copy(&mut body, &mut std::io::stdout().lock()).map_err(local("stdout"))?;
        return Ok(0);
    }
    let mut target = PathBuf::from(dst);
    if target.is_dir() {
        target.push(&entry.name);
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let shown = target.display().to_string();
    let mut tmp =
        tempfile::NamedTempFile::new_in(&dir).map_err(local(dir.display().to_string()))?;
    std::io::copy(&mut body, &mut tmp).map_err(local(shown.clone()))?;
    tmp.persist(&target).map_err(|e| FilesError::Local {
        what: shown.clone(),
        source: e.error,
    })?;
    println!("{shown}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::remote;

    #[test]
    fn remote_paths_are_told_from_local_ones() {
        assert_eq!(remote("mvm-01ab:/data/x"), Some(("mvm-01ab", "/data/x")));
        assert_eq!(remote("./a:/b"), None);
        assert_eq!(remote("/tmp/a:/b"), None);
        assert_eq!(remote("mvm-01ab:relative"), None);
        assert_eq!(remote("plain.txt"), None);
        assert_eq!(remote(":/x"), None);
    }
}
