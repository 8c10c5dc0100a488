//! The first exchange on a fresh transport connection, before multiplexing starts.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::frame::{FrameError, FramedStream};
use crate::generation::{negotiate, GENERATION_CURRENT, GENERATION_MIN};
use crate::rewind::Rewind;

/// Marks a host hello, so the agent can tell it from leftovers of an older session.
pub const MAGIC: [u8; 8] = *b"KILN\0AGT";

/// Bytes of entropy the host sends with every hello.
pub const ENTROPY_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub min_generation: u16,
    pub max_generation: u16,
    /// Mixed into the guest kernel's RNG, which is then reseeded.
    pub entropy: ByteBuf,
    /// Host wall clock; the guest sets its clock to it.
    pub unix_time_secs: i64,
    pub unix_time_nanos: u32,
}

impl Hello {
    pub fn new(entropy: Vec<u8>, now: std::time::SystemTime) -> Self {
        let since_epoch = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Hello {
            magic: MAGIC,
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
        agent_min: u16,
        agent_max: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub generation: u16,
    pub agent_version: String,
    /// Handshakes accepted since the guest booted (1 for the first).
    pub sessions: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("Handshake frame failed")]
    Frame(#[from] FrameError),
    #[error("Hello does not start with the kiln magic")]
    BadMagic,
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

/// Host side: sends the hello and waits for the agent's answer.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    hello: &Hello,
) -> Result<(HelloAck, Rewind<S>), HandshakeError> {
    let mut framed = FramedStream::new(io);
    framed.send(hello).await?;
    let reply: HelloReply = framed.expect("waiting for the agent's hello reply").await?;
    match reply {
        HelloReply::Accept(ack) => {
            if ack.generation < hello.min_generation || ack.generation > hello.max_generation {
                return Err(HandshakeError::BadChoice(ack.generation));
            }
            Ok((ack, framed.into_raw()))
        }
        HelloReply::Reject {
            agent_min,
            agent_max,
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
    make_ack: impl FnOnce(u16) -> HelloAck,
) -> Result<(Hello, u16, Rewind<S>), HandshakeError> {
    let mut framed = FramedStream::new(io);
    let hello: Hello = framed.expect("waiting for the host's hello").await?;
    if hello.magic != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    if hello.entropy.len() != ENTROPY_LEN {
        return Err(HandshakeError::BadEntropy(hello.entropy.len()));
    }
    let Some(generation) = negotiate(hello.min_generation, hello.max_generation) else {
        framed
            .send(&HelloReply::Reject {
                agent_min: GENERATION_MIN,
                agent_max: GENERATION_CURRENT,
            })
            .await?;
        return Err(HandshakeError::NoCommonGeneration {
            host_min: hello.min_generation,
            host_max: hello.max_generation,
            agent_min: GENERATION_MIN,
            agent_max: GENERATION_CURRENT,
        });
    };
    framed
        .send(&HelloReply::Accept(make_ack(generation)))
        .await?;
    Ok((hello, generation, framed.into_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(generation: u16) -> HelloAck {
        HelloAck {
            generation,
            agent_version: "test".into(),
            sessions: 1,
        }
    }

    #[tokio::test]
    async fn negotiates_and_passes_entropy() {
        let (h, g) = tokio::io::duplex(4096);
        let hello = Hello::new(vec![7; ENTROPY_LEN], std::time::SystemTime::now());
        let agent = tokio::spawn(async move { server(g, ack).await.map(|(h, gen, _)| (h, gen)) });
        let (got_ack, _) = client(h, &hello).await.unwrap();
        let (got_hello, gen) = agent.await.unwrap().unwrap();
        assert_eq!(got_ack.generation, GENERATION_CURRENT);
        assert_eq!(gen, GENERATION_CURRENT);
        assert_eq!(got_hello.entropy.as_slice(), &[7; ENTROPY_LEN]);
    }

    #[tokio::test]
    async fn rejects_wrong_magic_and_future_only_hosts() {
        let (h, g) = tokio::io::duplex(4096);
        let mut hello = Hello::new(vec![0; ENTROPY_LEN], std::time::SystemTime::now());
        hello.magic = *b"NOTKILN!";
        let agent = tokio::spawn(async move { server(g, ack).await.map(|_| ()) });
        let mut framed = FramedStream::new(h);
        framed.send(&hello).await.unwrap();
        assert!(matches!(
            agent.await.unwrap(),
            Err(HandshakeError::BadMagic)
        ));

        let (h, g) = tokio::io::duplex(4096);
        let mut hello = Hello::new(vec![0; ENTROPY_LEN], std::time::SystemTime::now());
        hello.min_generation = GENERATION_CURRENT + 1;
        hello.max_generation = GENERATION_CURRENT + 2;
        tokio::spawn(async move { server(g, ack).await.map(|_| ()) });
        let err = client(h, &hello).await.unwrap_err();
        assert!(
            matches!(err, HandshakeError::NoCommonGeneration { .. }),
            "{err}"
        );
    }
}
