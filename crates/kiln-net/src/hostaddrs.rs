//! The host's IPv4 addresses and their networks, read with the `SIOCGIFCONF` and
//! `SIOCGIFNETMASK` ioctls on an IPv4 socket. Unlike `getifaddrs` this needs no netlink
//! socket, which the network backend's seccomp filter denies, so the backend can re-read
//! them while it runs and close an address the host gains.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// Linux's ioctl numbers (include/uapi/linux/sockios.h); the libc crate has them only for
// Android.
const SIOCGIFCONF: libc::c_ulong = 0x8912;
const SIOCGIFNETMASK: libc::c_ulong = 0x891b;
/// Addresses read at most (a host with more is unusual; the rest are not seen).
const MAX_ADDRS: usize = 1024;

/// Every (address, netmask) of the host's IPv4 interfaces.
pub fn read() -> io::Result<Vec<(Ipv4Addr, Ipv4Addr)>> {
    // SAFETY: socket takes only integers; the descriptor it returns is owned by `sock`.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data (a name and a union of plain fields): all zeroes is
    // a valid value.
    let mut reqs: Vec<libc::ifreq> = vec![unsafe { std::mem::zeroed() }; MAX_ADDRS];
    let mut conf = libc::ifconf {
        ifc_len: (reqs.len() * std::mem::size_of::<libc::ifreq>()) as libc::c_int,
        ifc_ifcu: libc::__c_anonymous_ifc_ifcu {
            ifcu_req: reqs.as_mut_ptr(),
        },
    };
    // SAFETY: `conf` points at `reqs`, whose length in bytes is `ifc_len`; the kernel
    // writes at most that many bytes and sets `ifc_len` to what it wrote.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFCONF, &mut conf) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let count = (conf.ifc_len.max(0) as usize / std::mem::size_of::<libc::ifreq>()).min(MAX_ADDRS);
    let mut out = Vec::with_capacity(count);
    for req in &reqs[..count] {
        // SAFETY: SIOCGIFCONF fills `ifru_addr` of each entry it returns.
        let addr = ipv4_of(unsafe { &req.ifr_ifru.ifru_addr });
        let Some(addr) = addr else { continue };
        let mut mask_req = *req;
        // SAFETY: `mask_req` is a valid ifreq naming an interface; the kernel fills its
        // `ifru_netmask`.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFNETMASK, &mut mask_req) };
        let mask = if rc < 0 {
            Ipv4Addr::BROADCAST // unknown: the address alone
        } else {
            // SAFETY: SIOCGIFNETMASK succeeded and filled `ifru_netmask`.
            ipv4_of(unsafe { &mask_req.ifr_ifru.ifru_netmask }).unwrap_or(Ipv4Addr::BROADCAST)
        };
        out.push((addr, mask));
    }
    Ok(out)
}

fn ipv4_of(sa: &libc::sockaddr) -> Option<Ipv4Addr> {
    if libc::c_int::from(sa.sa_family) != libc::AF_INET {
        return None;
    }
    // SAFETY: an AF_INET sockaddr is a sockaddr_in, which is no larger than sockaddr; the
    // unaligned read copes with the union's alignment.
    let sin: libc::sockaddr_in =
        unsafe { std::ptr::read_unaligned((sa as *const libc::sockaddr).cast()) };
    Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_host_addresses() {
        let addrs = read().unwrap();
        assert!(
            addrs.contains(&(Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0))),
            "{addrs:?}"
        );
    }
}
