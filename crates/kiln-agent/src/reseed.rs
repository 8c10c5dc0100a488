//! Applies what every hello carries: entropy for the kernel RNG and the host clock.
//! This is what makes clones of one snapshot diverge and keeps restored clocks right.

use kiln_proto::handshake::Hello;
use tracing::{info, warn};

// From <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub fn apply(hello: &Hello) {
    if let Err(e) = add_entropy(&hello.entropy) {
        warn!("reseeding the kernel RNG failed: {e}");
    }
    let now = nix::sys::time::TimeSpec::new(hello.unix_time_secs, hello.unix_time_nanos as i64);
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now) {
        Ok(()) => info!(secs = hello.unix_time_secs, "clock set from host"),
        Err(e) => warn!("setting the clock failed: {e}"),
    }
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
