//! Plain data shared by every kiln crate. No I/O lives here.
#![forbid(unsafe_code)]

mod accel;
mod connector;
pub mod guest_net;
pub mod labels;
mod state;
mod vm_id;
pub mod whole;

pub use accel::{Accel, ParseAccelError};
pub use connector::{Connector, Destination, NetworkCounters};
pub use labels::{LabelError, LabelFilter, Labels};
pub use state::{ImageStatus, MicrovmState, ParseImageStatusError, ParseStateError, TokenKind};
pub use vm_id::{InvalidVmId, VmId};
