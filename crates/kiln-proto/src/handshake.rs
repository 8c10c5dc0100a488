//! The first exchange on a fresh transport connection, before multiplexing starts.
//!
//! A virtio-serial port is a byte pipe that outlives connections: bytes written by one side
//! just before a snapshot can reach the *next* connection after a restore. So handshake
//! messages are marked: `MAGIC (8 bytes) | length (u32 BE) | postcard message`, each side
//! skips anything before its peer's magic, and the reply echoes the hello's nonce so a
//! stale reply to an older hello is never taken for the answer.

use bytes::{Buf, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{decode, encode, FrameError};
use crate::generation::{negotiate_up_to, GENERATION_CURRENT, GENERATION_MIN};
use crate::rewind::Rewind;

/// Marks a host hello.
pub const HELLO_MAGIC: [u8; 8] = *b"KILN\0HLO";
/// Marks an agent reply.
pub const REPLY_MAGIC: [u8; 8] = *b"KILN\0ACK";
/// Bytes of entropy the host sends with every hello.
pub const ENTROPY_LEN: usize = 64;
/// Largest handshake message.
const MAX_HANDSHAKE_LEN: usize = 4096;
/// Most stale bytes skipped while looking for a marked message.
const MAX_SKIP: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Echoed in the reply.
    pub nonce: u64,
    pub min_generation: u16,
    pub max_generation: u16,
    /// Mixed into the guest kernel's RNG, which is then reseeded.
    pub entropy: ByteBuf,
    /// Host wall clock; the guest sets its clock to it.
    pub unix_time_secs: i64,
    pub unix_time_nanos: u32,
}

impl Hello {
    pub fn new(nonce: u64, entropy: Vec<u8>, now: std::time::SystemTime) -> Self {
        let since_epoch = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Hello {
            nonce,
            min_generation: GENERATION_MIN,
            max_generation: GENERATION_CURRENT,
            entropy: ByteBuf::from(entropy),
            unix_time_secs: since_epoch.as_secs() as i64,
            unix_time_nanos: since_epoch.subsec_nanos(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accept(HelloAck),
    /// No generation in common; the agent's range is given so the host can say so.
    Reject {
        nonce: u64,
        agent_min: u16,
        agent_max: u16,
    },
}

impl HelloReply {
    fn nonce(&self) -> u64 {
        match self {
            HelloReply::Accept(ack) => ack.nonce,
            HelloReply::Reject { nonce, .. } => *nonce,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub nonce: u64,
    pub generation: u16,
    pub agent_version: String,
    /// Handshakes accepted since the guest booted (1 for the first).
    pub sessions: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("Handshake frame failed")]
    Frame(#[from] FrameError),
    #[error("Peer sent over {MAX_SKIP} bytes without a handshake marker")]
    NoMarker,
    #[error("Hello carries {0} bytes of entropy, expected {ENTROPY_LEN}")]
    BadEntropy(usize),
    #[error("No common protocol generation: host speaks {host_min}..={host_max}, agent {agent_min}..={agent_max}")]
    NoCommonGeneration {
        host_min: u16,
        host_max: u16,
        agent_min: u16,
        agent_max: u16,
    },
    #[error("Agent chose generation {0}, outside what the host offered")]
    BadChoice(u16),
}

async fn write_marked<S: AsyncWrite + Unpin, T: Serialize>(
    io: &mut S,
    magic: &[u8; 8],
    msg: &T,
) -> Result<(), FrameError> {
    let body = encode(msg)?;
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    io.write_all(&out).await?;
    io.flush().await?;
    Ok(())
}

/// Reads until a well-formed message marked with `magic` arrives; bytes before it (and
/// marked messages that do not decode) are skipped. What follows stays in `buf`.
async fn read_marked<S: AsyncRead + Unpin, T: DeserializeOwned>(
    io: &mut S,
    buf: &mut BytesMut,
    magic: &[u8; 8],
    waiting_for: &'static str,
) -> Result<T, HandshakeError> {
    let mut skipped = 0usize;
    loop {
        if let Some(pos) = buf.windows(magic.len()).position(|w| w == magic) {
            if buf.len() >= pos + 12 {
                // INVARIANT: the range is 4 bytes long and within `buf` (checked just above).
                #[allow(clippy::expect_used)]
                let len = u32::from_be_bytes(buf[pos + 8..pos + 12].try_into().expect("4 bytes"))
                    as usize;
                if len > MAX_HANDSHAKE_LEN {
                    skipped += pos + 1;
                    buf.advance(pos + 1);
                    continue;
                }
                if buf.len() >= pos + 12 + len {
                    let parsed = decode::<T>(&buf[pos + 12..pos + 12 + len]);
                    match parsed {
                        Ok(msg) => {
                            buf.advance(pos + 12 + len);
                            return Ok(msg);
                        }
                        Err(_) => {
                            skipped += pos + 1;
                            buf.advance(pos + 1);
                            continue;
                        }
                    }
                }
            }
        } else if buf.len() > magic.len() {
            // Keep a possible partial marker at the end.
            let drop = buf.len() - (magic.len() - 1);
            skipped += drop;
            buf.advance(drop);
        }
        if skipped > MAX_SKIP {
            return Err(HandshakeError::NoMarker);
        }
        if io.read_buf(buf).await.map_err(FrameError::Io)? == 0 {
            return Err(FrameError::UnexpectedEof(waiting_for).into());
        }
    }
}

/// Host side: sends the hello and waits for the agent's answer to it.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    hello: &Hello,
) -> Result<(HelloAck, Rewind<S>), HandshakeError> {
    write_marked(&mut io, &HELLO_MAGIC, hello).await?;
    let mut buf = BytesMut::new();
    let reply = loop {
        let reply: HelloReply = read_marked(
            &mut io,
            &mut buf,
            &REPLY_MAGIC,
            "waiting for the agent's hello reply",
        )
        .await?;
        if reply.nonce() == hello.nonce {
            break reply;
        }
    };
    match reply {
        HelloReply::Accept(ack) => {
            if ack.generation < hello.min_generation || ack.generation > hello.max_generation {
                return Err(HandshakeError::BadChoice(ack.generation));
            }
            Ok((ack, Rewind::new(buf.freeze(), io)))
        }
        HelloReply::Reject {
            agent_min,
            agent_max,
            ..
        } => Err(HandshakeError::NoCommonGeneration {
            host_min: hello.min_generation,
            host_max: hello.max_generation,
            agent_min,
            agent_max,
        }),
    }
}

/// Agent side: reads a hello, validates it and answers. `make_ack` builds the answer for
/// the negotiated generation. Returns the hello so the agent can apply entropy and time.
pub async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    make_ack: impl FnOnce(u64, u16) -> HelloAck,
) -> Result<(Hello, u16, Rewind<S>), HandshakeError> {
    server_up_to(io, make_ack, GENERATION_CURRENT).await
}

/// [`server`] for an agent that speaks generations only up to `max_generation`.
pub async fn server_up_to<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    make_ack: impl FnOnce(u64, u16) -> HelloAck,
    max_generation: u16,
) -> Result<(Hello, u16, Rewind<S>), HandshakeError> {
    let agent_max = max_generation.clamp(GENERATION_MIN, GENERATION_CURRENT);
    let mut buf = BytesMut::new();
    let hello: Hello = read_marked(
        &mut io,
        &mut buf,
        &HELLO_MAGIC,
        "waiting for the host's hello",
    )
    .await?;
    if hello.entropy.len() != ENTROPY_LEN {
        return Err(HandshakeError::BadEntropy(hello.entropy.len()));
    }
    let Some(generation) = negotiate_up_to(hello.min_generation, hello.max_generation, agent_max)
    else {
        let reject = HelloReply::Reject {
            nonce: hello.nonce,
            agent_min: GENERATION_MIN,
            agent_max,
        };
        write_marked(&mut io, &REPLY_MAGIC, &reject).await?;
        return Err(HandshakeError::NoCommonGeneration {
            host_min: hello.min_generation,
            host_max: hello.max_generation,
            agent_min: GENERATION_MIN,
            agent_max,
        });
    };
    write_marked(
        &mut io,
        &REPLY_MAGIC,
        &HelloReply::Accept(make_ack(hello.nonce, generation)),
    )
    .await?;
    Ok((hello, generation, Rewind::new(buf.freeze(), io)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(nonce: u64, generation: u16) -> HelloAck {
        HelloAck {
            nonce,
            generation,
            agent_version: "test".into(),
            sessions: 1,
        }
    }

    fn hello(nonce: u64) -> Hello {
        Hello::new(nonce, vec![7; ENTROPY_LEN], std::time::SystemTime::now())
    }

    #[tokio::test]
    async fn negotiates_and_passes_entropy() {
        let (h, g) = tokio::io::duplex(4096);
        let agent = tokio::spawn(async move { server(g, ack).await.map(|(h, gen, _)| (h, gen)) });
        let (got_ack, _) = client(h, &hello(1)).await.unwrap();
        let (got_hello, gen) = agent.await.unwrap().unwrap();
        assert_eq!(got_ack.generation, GENERATION_CURRENT);
        assert_eq!(gen, GENERATION_CURRENT);
        assert_eq!(got_hello.entropy.as_slice(), &[7; ENTROPY_LEN]);
    }

    #[tokio::test]
    async fn stale_bytes_and_stale_replies_are_skipped_both_ways() {
        let (mut h, mut g) = tokio::io::duplex(1 << 16);
        // Leftovers of an older session in both directions, including a reply to an old hello.
        h.write_all(&[0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff])
            .await
            .unwrap();
        g.write_all(b"junk from the old session").await.unwrap();
        write_marked(&mut g, &REPLY_MAGIC, &HelloReply::Accept(ack(41, 1)))
            .await
            .unwrap();
        let agent = tokio::spawn(async move { server(g, ack).await.map(|(h, _, _)| h.nonce) });
        let (got, mut rest) = client(h, &hello(42)).await.unwrap();
        assert_eq!(got.nonce, 42);
        assert_eq!(agent.await.unwrap().unwrap(), 42);
        // Nothing of the handshake is left for the session that follows: once the agent's
        // end is gone, the host reads a clean EOF, no leftover bytes.
        let mut probe = [0u8; 1];
        assert_eq!(
            rest.read(&mut probe).await.unwrap(),
            0,
            "no bytes should follow the reply"
        );
    }

    #[tokio::test]
    async fn rejects_future_only_hosts_and_endless_junk() {
        let (h, g) = tokio::io::duplex(4096);
        let mut future = hello(1);
        future.min_generation = GENERATION_CURRENT + 1;
        future.max_generation = GENERATION_CURRENT + 2;
        tokio::spawn(async move { server(g, ack).await.map(|_| ()) });
        let err = client(h, &future).await.unwrap_err();
        assert!(
            matches!(err, HandshakeError::NoCommonGeneration { .. }),
            "{err}"
        );

        let (mut h, g) = tokio::io::duplex(1 << 16);
        let agent = tokio::spawn(async move { server(g, ack).await.map(|_| ()) });
        let junk = vec![0xAAu8; 64 * 1024];
        let mut sent = 0;
        while sent <= MAX_SKIP + junk.len() && !agent.is_finished() {
            if h.write_all(&junk).await.is_err() {
                break;
            }
            sent += junk.len();
        }
        assert!(matches!(
            agent.await.unwrap(),
            Err(HandshakeError::NoMarker)
        ));
    }
}
