//! The host side of the files API (agent protocol generation 5): metadata operations, and
//! transfers that stream in chunks both ways, so no file or archive is ever held whole in
//! kilnd's memory. Everything the guest sends is checked against what it announced.

use kiln_proto::frame::MAX_CHUNK_LEN;
use kiln_proto::{
    FileEntry, FileRef, FramedStream, FsEvent, FsOp, FsRequest, GuestFrame, HostFrame, Request,
    Stream, UnpackRequest, WriteFileRequest,
};
use serde_bytes::ByteBuf;

use crate::agent::{AgentClient, AgentError};

/// The protocol generation the files API needs.
const FILES_GENERATION: u16 = 5;

impl AgentClient {
    fn files_supported(&self) -> Result<(), AgentError> {
        if self.generation() < FILES_GENERATION {
            return Err(AgentError::Protocol(format!(
                "the guest agent speaks generation {}; the files API needs \
                 {FILES_GENERATION} (rebuild the image with this kiln)",
                self.generation()
            )));
        }
        Ok(())
    }

    /// Stat, mkdir or rename: the entry they answer with.
    pub async fn fs_entry(&self, op: FsOp, user: Option<String>) -> Result<FileEntry, AgentError> {
        self.files_supported()?;
        let mut s = self.open(&Request::Fs(FsRequest { op, user })).await?;
        match self.recv_within(&mut s, "waiting for the entry").await? {
            GuestFrame::Entry(e) => Ok(e),
            other => Err(self.unexpected(&other, "Entry")),
        }
    }

    pub async fn remove_path(
        &self,
        path: String,
        recursive: bool,
        user: Option<String>,
    ) -> Result<(), AgentError> {
        self.files_supported()?;
        let op = FsOp::Remove { path, recursive };
        let mut s = self.open(&Request::Fs(FsRequest { op, user })).await?;
        match self.recv_within(&mut s, "waiting for the removal").await? {
            GuestFrame::Ok => Ok(()),
            other => Err(self.unexpected(&other, "Ok")),
        }
    }

    /// A directory's entries by name, at most `limit`.
    pub async fn list_dir(
        &self,
        path: String,
        limit: u32,
        user: Option<String>,
    ) -> Result<Vec<FileEntry>, AgentError> {
        self.files_supported()?;
        let op = FsOp::List { path, limit };
        let mut s = self.open(&Request::Fs(FsRequest { op, user })).await?;
        let mut entries = Vec::new();
        loop {
            match self.recv_within(&mut s, "waiting for entries").await? {
                GuestFrame::Entries(batch) if entries.len() + batch.len() <= limit as usize => {
                    entries.extend(batch)
                }
                GuestFrame::Entries(_) => {
                    return Err(self.violation(format!("listed more than the {limit} asked for")))
                }
                GuestFrame::End => return Ok(entries),
                other => return Err(self.unexpected(&other, "Entries or End")),
            }
        }
    }

    /// Opens a file for reading: its size and mode are known at once, its bytes follow.
    pub async fn read_file(&self, file: FileRef) -> Result<FileDownload, AgentError> {
        self.files_supported()?;
        let mut stream = self.open(&Request::ReadFile(file)).await?;
        match self
            .recv_within(&mut stream, "waiting for FileMeta")
            .await?
        {
            GuestFrame::FileMeta { size, mode } => Ok(FileDownload {
                client: self.clone(),
                stream,
                size,
                mode,
                received: 0,
                done: false,
            }),
            other => Err(self.unexpected(&other, "FileMeta")),
        }
    }

    /// Starts an upload of exactly `req.size` bytes.
    pub async fn write_file(&self, req: WriteFileRequest) -> Result<Upload, AgentError> {
        self.files_supported()?;
        let size = req.size;
        let stream = self.open(&Request::WriteFile(req)).await?;
        Ok(Upload {
            client: self.clone(),
            stream,
            limit: Some(size),
            sent: 0,
        })
    }

    /// A directory as a tar stream.
    pub async fn read_archive(&self, dir: FileRef) -> Result<ArchiveDownload, AgentError> {
        self.files_supported()?;
        let stream = self.open(&Request::GetArchive(dir)).await?;
        Ok(ArchiveDownload {
            client: self.clone(),
            stream,
            done: false,
        })
    }

    /// Starts sending a tar stream that the guest unpacks.
    pub async fn unpack_archive(&self, req: UnpackRequest) -> Result<Upload, AgentError> {
        self.files_supported()?;
        let stream = self.open(&Request::UnpackArchive(req)).await?;
        Ok(Upload {
            client: self.clone(),
            stream,
            limit: None,
            sent: 0,
        })
    }

    /// Watches a directory; answers once the guest watches it.
    pub async fn watch(&self, dir: FileRef) -> Result<Watcher, AgentError> {
        self.files_supported()?;
        let mut stream = self.open(&Request::Watch(dir)).await?;
        match self
            .recv_within(&mut stream, "waiting for the watch")
            .await?
        {
            GuestFrame::Ok => Ok(Watcher {
                client: self.clone(),
                stream,
            }),
            other => Err(self.unexpected(&other, "Ok")),
        }
    }
}

/// A file on its way from the guest.
pub struct FileDownload {
    client: AgentClient,
    stream: FramedStream<Stream>,
    pub size: u64,
    pub mode: u32,
    received: u64,
    done: bool,
}

impl FileDownload {
    /// The next bytes, `None` once all `size` came.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, AgentError> {
        if self.done {
            return Ok(None);
        }
        let size = self.size;
        match self
            .client
            .recv(&mut self.stream, "receiving file contents")
            .await?
        {
            GuestFrame::Chunk(c) if self.received + c.len() as u64 <= size => {
                self.received += c.len() as u64;
                Ok(Some(c.into_vec()))
            }
            GuestFrame::Chunk(_) => Err(self
                .client
                .violation(format!("sent more than the announced {size} bytes"))),
            GuestFrame::End if self.received == size => {
                self.done = true;
                Ok(None)
            }
            GuestFrame::End => Err(AgentError::Stream(kiln_proto::FrameError::UnexpectedEof(
                "the file shrank while it was read",
            ))),
            other => Err(self.client.unexpected(&other, "Chunk or End")),
        }
    }
}

/// A tar stream on its way from the guest.
pub struct ArchiveDownload {
    client: AgentClient,
    stream: FramedStream<Stream>,
    done: bool,
}

impl ArchiveDownload {
    /// The next bytes, `None` at the end; a guest error midway is an error.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, AgentError> {
        if self.done {
            return Ok(None);
        }
        match self
            .client
            .recv(&mut self.stream, "receiving the archive")
            .await?
        {
            GuestFrame::Chunk(c) => Ok(Some(c.into_vec())),
            GuestFrame::End => {
                self.done = true;
                Ok(None)
            }
            other => Err(self.client.unexpected(&other, "Chunk or End")),
        }
    }
}

/// Bytes on their way to the guest (a file of a known size, or a tar stream).
pub struct Upload {
    client: AgentClient,
    stream: FramedStream<Stream>,
    limit: Option<u64>,
    sent: u64,
}

impl Upload {
    pub async fn send(&mut self, data: &[u8]) -> Result<(), AgentError> {
        self.sent += data.len() as u64;
        if let Some(limit) = self.limit.filter(|l| self.sent > *l) {
            return Err(AgentError::OutputTooLarge {
                limit: limit as usize,
            });
        }
        for chunk in data.chunks(MAX_CHUNK_LEN) {
            self.stream
                .send(&HostFrame::Chunk(ByteBuf::from(chunk.to_vec())))
                .await
                .map_err(AgentError::Stream)?;
        }
        Ok(())
    }

    /// Ends the upload and waits for the guest's answer: the written file's entry, or
    /// `None` for an archive.
    pub async fn finish(mut self) -> Result<Option<FileEntry>, AgentError> {
        self.stream
            .send(&HostFrame::End)
            .await
            .map_err(AgentError::Stream)?;
        match self
            .client
            .recv(&mut self.stream, "waiting for the upload result")
            .await?
        {
            GuestFrame::Entry(e) if self.limit.is_some() => Ok(Some(e)),
            GuestFrame::Ok if self.limit.is_none() => Ok(None),
            other => Err(self.client.unexpected(&other, "the upload result")),
        }
    }
}

/// A directory being watched; dropping it ends the watch.
pub struct Watcher {
    client: AgentClient,
    stream: FramedStream<Stream>,
}

impl Watcher {
    /// The next change; `None` when the directory went away.
    pub async fn next(&mut self) -> Result<Option<FsEvent>, AgentError> {
        match self
            .client
            .recv(&mut self.stream, "waiting for a change")
            .await?
        {
            GuestFrame::FsEvent(e) => Ok(Some(e)),
            GuestFrame::End => Ok(None),
            other => Err(self.client.unexpected(&other, "FsEvent or End")),
        }
    }
}
