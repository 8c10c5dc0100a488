//! Plain data shared by every kiln crate. No I/O lives here.
#![forbid(unsafe_code)]

mod accel;
pub mod guest_net;
mod state;
mod vm_id;

pub use accel::{Accel, ParseAccelError};
pub use state::{MicrovmState, ParseStateError};
pub use vm_id::{InvalidVmId, VmId};
