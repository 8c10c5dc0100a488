//! kiln-proto owns the wire format between the host and the guest agent.
//!
//! Layers, bottom up:
//! 1. the transport: a virtio-serial port in the guest, a Unix socket on the host;
//! 2. the [handshake]: one length-prefixed frame each way, negotiating the protocol
//!    generation and carrying fresh entropy and the host clock (so every new session, in
//!    particular the first one after a snapshot restore, reseeds the guest);
//! 3. a [session]: yamux multiplexing of many concurrent streams with flow control;
//! 4. on each stream, length-prefixed [frame]s carrying postcard-encoded [message]s.
//!
//! Everything read from the peer is bounded: frames by [MAX_FRAME_LEN], streams per session
//! by [session::MAX_STREAMS], receive windows by yamux's per-connection limit.
#![forbid(unsafe_code)]

pub mod frame;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod generation;
pub mod handshake;
pub mod message;
pub mod proc;
pub mod rewind;
pub mod session;

pub use frame::{FrameError, FramedStream, MAX_FRAME_LEN};
pub use generation::{negotiate, GENERATION_CURRENT, GENERATION_MIN};
pub use handshake::{HandshakeError, Hello, HelloAck};
pub use message::*;
pub use rewind::Rewind;
pub use session::{Session, SessionEnd, SessionError, Stream};

/// Name of the virtio-serial port that carries the agent channel.
pub const AGENT_PORT_NAME: &str = "kiln.agent";
