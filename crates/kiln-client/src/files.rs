//! The files API: a microVM's filesystem as a guest user sees it. Reads and archive
//! downloads stream; writes stream from any reader of known length; a watch is an
//! iterator over the server-sent events.

use std::io::Read;

use kiln_api::{FileEntry, FileEvent, FileList, MakeDirectoryRequest, MoveFileRequest};

use crate::sse::SseReader;
use crate::{seg, with_query, Client, ClientError};

/// Which file, and as whom (the image's user when `None`).
fn file_query(path: &str, user: Option<&str>) -> Vec<String> {
    let mut q = vec![format!("path={}", seg(path))];
    if let Some(u) = user {
        q.push(format!("user={}", seg(u)));
    }
    q
}

fn files_path(id: &str, rest: &str, query: &[String]) -> String {
    with_query(&format!("/v1/microvms/{}/files{rest}", seg(id)), query)
}

/// How a file is written: its mode (octal, e.g. "0644") and whether missing parent
/// directories are made.
#[derive(Debug, Default, Clone)]
pub struct WriteOptions<'a> {
    pub user: Option<&'a str>,
    pub mode: Option<&'a str>,
    pub create_parents: bool,
}

impl Client {
    /// A directory's entries, sorted by name; at most `limit` (the server's default 1000).
    pub fn list_files(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        limit: Option<u32>,
    ) -> Result<FileList, ClientError> {
        let mut q = file_query(path, user);
        if let Some(n) = limit {
            q.push(format!("limit={n}"));
        }
        self.call("GET", &files_path(id, "", &q), None::<&()>)
    }

    pub fn stat_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<FileEntry, ClientError> {
        let q = file_query(path, user);
        self.call("GET", &files_path(id, "/stat", &q), None::<&()>)
    }

    /// A file's bytes, read as they arrive.
    pub fn read_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<Box<dyn Read + Send + Sync>, ClientError> {
        self.get_stream(&files_path(id, "/content", &file_query(path, user)))
    }

    /// Writes `len` bytes from `body` to `path`, atomically (the old file stays whole until
    /// the new one is complete).
    pub fn write_file(
        &self,
        id: &str,
        path: &str,
        opts: &WriteOptions<'_>,
        body: impl Read,
        len: u64,
    ) -> Result<FileEntry, ClientError> {
        let mut q = file_query(path, opts.user);
        if let Some(m) = opts.mode {
            q.push(format!("mode={}", seg(m)));
        }
        if opts.create_parents {
            q.push("createParents=true".into());
        }
        let what = format!("PUT {path}");
        let resp = self
            .request("PUT", &files_path(id, "/content", &q))
            .set("Content-Type", "application/octet-stream")
            .set("Content-Length", &len.to_string())
            .send(body)
            .map_err(|e| self.error(e))?;
        self.json(resp, &what)
    }

    pub fn make_directory(
        &self,
        id: &str,
        req: &MakeDirectoryRequest,
    ) -> Result<FileEntry, ClientError> {
        self.call("POST", &files_path(id, "/mkdir", &[]), Some(req))
    }

    pub fn move_file(&self, id: &str, req: &MoveFileRequest) -> Result<FileEntry, ClientError> {
        self.call("POST", &files_path(id, "/move", &[]), Some(req))
    }

    pub fn remove_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        recursive: bool,
    ) -> Result<(), ClientError> {
        let mut q = file_query(path, user);
        if recursive {
            q.push("recursive=true".into());
        }
        self.call_empty("DELETE", &files_path(id, "", &q))
    }

    /// A directory as a tar stream.
    pub fn download_archive(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<Box<dyn Read + Send + Sync>, ClientError> {
        self.get_stream(&files_path(id, "/archive", &file_query(path, user)))
    }

    /// Unpacks a tar of `len` bytes into the directory `path` (made if missing), as `user`.
    pub fn upload_archive(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        tar: impl Read,
        len: u64,
    ) -> Result<FileEntry, ClientError> {
        let resp = self
            .request("PUT", &files_path(id, "/archive", &file_query(path, user)))
            .set("Content-Type", "application/x-tar")
            .set("Content-Length", &len.to_string())
            .send(tar)
            .map_err(|e| self.error(e))?;
        self.json(resp, &format!("PUT archive {path}"))
    }

    /// Changes under `path` as they happen, until the watch ends (the microVM stopped
    /// running, or the caller drops the iterator).
    pub fn watch_files(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<FileWatch, ClientError> {
        let stream = self.get_stream(&files_path(id, "/watch", &file_query(path, user)))?;
        Ok(FileWatch {
            events: SseReader::new(stream),
            endpoint: self.endpoint.clone(),
        })
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        resp: ureq::Response,
        what: &str,
    ) -> Result<T, ClientError> {
        resp.into_json().map_err(|e| ClientError::Unexpected {
            endpoint: self.endpoint.clone(),
            what: what.to_string(),
            detail: e.to_string(),
        })
    }
}

/// The events of a watch: `Ok(event)` per change; an `Err` once if the server ended it
/// with an error (for example a suspend), then `None`.
pub struct FileWatch {
    events: SseReader,
    endpoint: String,
}

impl Iterator for FileWatch {
    type Item = Result<FileEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let ev = self.events.next_event()?;
        match ev.event.as_str() {
            "file" => Some(
                serde_json::from_str(&ev.data).map_err(|e| ClientError::Unexpected {
                    endpoint: self.endpoint.clone(),
                    what: "a file event".into(),
                    detail: e.to_string(),
                }),
            ),
            "error" => Some(Err(ClientError::Api {
                status: 409,
                code: "WatchEnded".into(),
                message: ev.data,
            })),
            // `end`: the directory went away.
            _ => None,
        }
    }
}
