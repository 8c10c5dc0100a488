//! What PID 1 does once, before serving: mounts the pseudo filesystems and brings up the
//! loopback interface. Failures are logged, never fatal: a half-prepared guest can still
//! answer the host and say what is wrong.

use nix::mount::{mount, MsFlags};
use tracing::warn;

pub fn prepare_guest() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 6] = [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        ("shm", "/dev/shm", "tmpfs", nosuid, Some("mode=1777")),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        if let Err(e) = std::fs::create_dir_all(target) {
            warn!("mkdir {target}: {e}");
        }
        match mount(Some(source), target, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => warn!("mount {fstype} on {target}: {e}"),
        }
    }
    if !std::path::Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    if let Err(e) = loopback_up() {
        warn!("bringing up lo: {e}");
    }
    match crate::resize::grow_root("/dev/vda") {
        Ok(Some(bytes)) => {
            tracing::info!(mib = bytes >> 20, "root filesystem grown to fill its disk")
        }
        Ok(None) => {}
        Err(e) => warn!("growing the root filesystem: {e}"),
    }
    match crate::net::configure("eth0") {
        Ok(true) => tracing::info!("eth0 configured for user-mode networking"),
        Ok(false) => {}
        Err(e) => warn!("configuring eth0: {e}"),
    }
    let _ = nix::unistd::sethostname("kiln");
}

fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the interface named in `req` and writes its flags into
    // the same struct, which lives for the whole call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the union field was just filled in by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS only reads `req`, a valid ifreq naming "lo".
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
