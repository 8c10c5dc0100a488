//! Grows the root ext4 filesystem to fill its disk (the host made the disk larger than the
//! base image), online, with the kernel's resize ioctl: no guest tools needed.

use std::os::fd::AsRawFd;

// From <linux/fs.h> and <linux/ext4.h> (via ioctl encoding).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Returns the new size in bytes when the filesystem was grown.
pub fn grow_root(device: &str) -> std::io::Result<Option<u64>> {
    let dev = std::fs::File::open(device)?;
    let mut device_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64, &mut device_bytes) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fs = nix::sys::statvfs::statvfs("/").map_err(std::io::Error::from)?;
    let block = fs.fragment_size() as u64;
    if block == 0 {
        return Ok(None);
    }
    let fs_blocks = fs.blocks() as u64;
    let device_blocks = device_bytes / block;
    // Grow only when at least 1% (and 1 MiB) is unused, so rounding never triggers it.
    if device_blocks <= fs_blocks + (fs_blocks / 100).max((1 << 20) / block) {
        return Ok(None);
    }
    let root = std::fs::File::open("/")?;
    let mut new_blocks = device_blocks;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) through the pointer.
    if unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &mut new_blocks) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(device_blocks * block))
}
