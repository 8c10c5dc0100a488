//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests: the frames and
//! handshake messages a (hostile) guest agent or host sends. None may panic.

use crate::frame::decode;
use crate::handshake::{Hello, HelloAck, HelloReply};
use crate::message::{GuestFrame, HostFrame};

/// One frame body, decoded as every message type either side reads.
pub fn frame(data: &[u8]) {
    let _ = decode::<GuestFrame>(data);
    let _ = decode::<HostFrame>(data);
    let _ = decode::<Hello>(data);
    let _ = decode::<HelloReply>(data);
    let _ = decode::<HelloAck>(data);
}
