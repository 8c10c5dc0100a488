//! Length-prefixed frames carrying postcard-encoded messages.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};

use crate::rewind::Rewind;

/// Largest frame either side accepts (the 4-byte length prefix excluded).
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Largest payload of a data chunk (stdout, file contents). Leaves room for the envelope.
pub const MAX_CHUNK_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("Stream I/O failed")]
    Io(#[from] std::io::Error),
    #[error("Peer sent a frame over the {MAX_FRAME_LEN}-byte limit")]
    TooLarge,
    #[error("Peer sent a frame that does not decode as {expected}")]
    Decode {
        expected: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("Message does not encode")]
    Encode(#[source] postcard::Error),
    #[error("Peer closed the stream while {0}")]
    UnexpectedEof(&'static str),
    #[error("Peer sent {got} while {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

/// Encodes one message to bytes (used by the handshake and the schema snapshot).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    postcard::to_stdvec(msg).map_err(FrameError::Encode)
}

/// Decodes one message, requiring that the whole buffer is consumed.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(buf).map_err(|source| FrameError::Decode {
            expected: std::any::type_name::<T>(),
            source,
        })?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(FrameError::Decode {
            expected: std::any::type_name::<T>(),
            source: postcard::Error::DeserializeBadEncoding,
        })
    }
}

/// A byte stream that carries frames. Send and receive any message type; the caller knows
/// which type comes next from the stream's protocol.
pub struct FramedStream<S> {
    inner: Framed<S, LengthDelimitedCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedStream<S> {
    pub fn new(io: S) -> Self {
        FramedStream {
            inner: Framed::new(io, codec()),
        }
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes = encode(msg)?;
        if bytes.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge);
        }
        self.inner.send(Bytes::from(bytes)).await.map_err(map_io)
    }

    /// Receives the next message; `Ok(None)` when the peer closed the stream cleanly.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(map_io(e)),
            Some(Ok(frame)) => decode(&frame).map(Some),
        }
    }

    /// Like [`recv`](Self::recv) but a closed stream is an error naming what was awaited.
    pub async fn expect<T: DeserializeOwned>(
        &mut self,
        what: &'static str,
    ) -> Result<T, FrameError> {
        self.recv().await?.ok_or(FrameError::UnexpectedEof(what))
    }

    /// Flushes and shuts down the write half.
    pub async fn close(&mut self) -> Result<(), FrameError> {
        SinkExt::<Bytes>::close(&mut self.inner)
            .await
            .map_err(map_io)
    }

    /// Returns the raw stream, with any bytes already read ahead put back in front.
    pub fn into_raw(self) -> Rewind<S> {
        let FramedParts { io, read_buf, .. } = self.inner.into_parts();
        Rewind::new(read_buf.freeze(), io)
    }
}

fn map_io(e: std::io::Error) -> FrameError {
    // LengthDelimitedCodec reports an oversized frame as InvalidData with this message.
    if e.kind() == std::io::ErrorKind::InvalidData && e.to_string().contains("frame size too big") {
        FrameError::TooLarge
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn round_trips_messages() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        a.send(&("hello".to_string(), 7u32)).await.unwrap();
        let got: (String, u32) = b.expect("greeting").await.unwrap();
        assert_eq!(got, ("hello".to_string(), 7));
        a.close().await.unwrap();
        assert!(b.recv::<u32>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_oversized_frame_without_reading_it() {
        let (mut raw, b) = tokio::io::duplex(1 << 16);
        let mut b = FramedStream::new(b);
        raw.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        assert!(matches!(b.recv::<u32>().await, Err(FrameError::TooLarge)));
    }

    #[tokio::test]
    async fn rejects_trailing_garbage_in_a_frame() {
        let (mut raw, b) = tokio::io::duplex(1 << 16);
        let mut b = FramedStream::new(b);
        raw.write_all(&[0, 0, 0, 3, 1, 2, 3]).await.unwrap();
        assert!(matches!(
            b.recv::<u8>().await,
            Err(FrameError::Decode { .. })
        ));
    }

    #[tokio::test]
    async fn into_raw_keeps_read_ahead_bytes() {
        use tokio::io::AsyncReadExt;
        let (mut raw, b) = tokio::io::duplex(1 << 16);
        raw.write_all(&[0, 0, 0, 1, 9, b'x', b'y']).await.unwrap();
        let mut b = FramedStream::new(b);
        assert_eq!(b.expect::<u8>("byte").await.unwrap(), 9);
        let mut rest = b.into_raw();
        let mut buf = [0u8; 2];
        rest.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"xy");
    }
}
