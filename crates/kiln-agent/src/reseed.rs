//! Applies what every hello carries: entropy for the kernel RNG and the host clock, and a
//! new VM generation ID. This is what makes clones of one snapshot diverge and keeps restored
//! clocks right.
//!
//! The VM generation ID (`/run/kiln/vmgenid`, 32 hex digits, and `/run/kiln/vmgenid-count`)
//! changes on every new session: every launch from a snapshot, every resume, every clone.
//! QEMU's `vmgenid` device needs ACPI tables the microvm machine does not build, so the agent
//! gives the equivalent. Apps keep state a clone must not share (keys, PRNG seeds, ids) keyed
//! by it: when it changed, they are a new instance and reseed (the kernel RNG already was).

use kiln_proto::handshake::Hello;
use tracing::{info, warn};

// From <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Where apps read the VM generation ID.
pub const VMGENID_PATH: &str = "/run/kiln/vmgenid";

pub fn apply(hello: &Hello) {
    if let Err(e) = new_generation(&hello.entropy) {
        warn!("writing the VM generation ID failed: {e}");
    }
    if let Err(e) = add_entropy(&hello.entropy) {
        warn!("reseeding the kernel RNG failed: {e}");
    }
    let now = nix::sys::time::TimeSpec::new(hello.unix_time_secs, hello.unix_time_nanos as i64);
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now) {
        Ok(()) => info!(secs = hello.unix_time_secs, "clock set from host"),
        Err(e) => warn!("setting the clock failed: {e}"),
    }
}

/// Writes a new VM generation ID (derived from the session's entropy, never the entropy
/// itself) and bumps the count, each file whole (written beside it, then renamed).
fn new_generation(entropy: &[u8]) -> std::io::Result<()> {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"kiln vmgenid\0")
        .chain_update(entropy)
        .finalize();
    let id: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::path::Path::new(VMGENID_PATH)
        .parent()
        .unwrap_or(std::path::Path::new("/run"));
    std::fs::create_dir_all(dir)?;
    let count_path = dir.join("vmgenid-count");
    let count: u64 = std::fs::read_to_string(&count_path)
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0);
    let write = |path: &std::path::Path, text: String| -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    };
    write(&count_path, format!("{}\n", count + 1))?;
    write(std::path::Path::new(VMGENID_PATH), format!("{id}\n"))?;
    info!(vmgenid = %id, "new VM generation");
    Ok(())
}

fn add_entropy(entropy: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a valid rand_pool_info whose buf_size matches the bytes that follow
    // the header; the kernel only reads from it, and it outlives the call.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
