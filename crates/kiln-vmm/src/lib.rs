//! kiln-vmm drives QEMU `microvm` guests. It is the only crate that builds QEMU arguments.
//!
//! - [`accel`]: which accelerator to use, and why;
//! - [`assets`]: the guest kernel, initramfs (with the agent) and base disks;
//! - [`machine`]: the fixed machine shape (CPU model, memory, vCPUs) and its command line;
//! - [`process`], [`qmp`]: the QEMU process, its console log and its control socket;
//! - [`agent`]: the typed client of the guest agent;
//! - [`vm`], [`snapshot`], [`manifest`]: boot, template snapshot, launch, suspend, resume;
//! - [`start`], [`prestart`]: starting QEMU, in one go or ahead of the launch;
//! - [`memdiff`]: the pages a guest changed from its template, saved and applied by kiln;
//! - [`confine`]: the jail each QEMU runs in (or `--no-jail`), built by `kiln-jail`;
//! - [`network`], [`netproc`]: how a VM's NIC reaches the world (kiln-net's egress backend,
//!   a jailed process per VM).

pub mod accel;
pub mod adopt;
pub mod agent;
pub mod agent_files;
pub mod agent_procs;
pub mod assets;
pub mod base_template;
pub mod confine;
pub mod disk;
pub mod fault;
pub mod floor;
pub mod fork;
pub mod fuzzing;
pub mod machine;
pub mod manifest;
pub mod memdiff;
pub mod migration;
pub mod netproc;
pub mod network;
pub mod prestart;
pub mod process;
pub mod qmp;
pub mod snapshot;
pub mod spare;
pub mod start;
pub mod vm;

pub use accel::{AccelChoice, AccelProbe};
pub use adopt::{AdoptConfig, VmRecord};
pub use agent::{AgentClient, AgentError, ExecOutput};
pub use assets::GuestAssets;
pub use confine::{Confinement, JailLimits};
pub use fork::ForkTarget;
pub use kiln_net;
pub use machine::MachineSpec;
pub use manifest::{Manifest, ManifestMismatch};
pub use network::NetworkAttachment;
pub use prestart::{PrestartConfig, Prestarted};
pub use snapshot::{SuspendedVm, Template};
pub use start::BeforeRun;
pub use vm::{BootConfig, Vm, VmError};

/// An error and its causes on one line (how kiln shows errors to people).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
