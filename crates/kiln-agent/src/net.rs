//! Network set-up for guests that have a NIC: the fixed plan of `kiln_types::guest_net`
//! (guest 10.0.2.15/24, gateway 10.0.2.2 = the host's network backend, DNS 10.0.2.3 =
//! kiln's resolver), configured with ioctls so the image needs no network tools.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use kiln_types::guest_net::{
    DNS_ADDR as DNS, GATEWAY_ADDR as GATEWAY, GUEST_ADDR, GUEST_NETMASK as NETMASK,
};

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; this reinterprets the
    // bytes as the generic type the ioctls take.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(fd: i32, request: libc::c_ulong, arg: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: callers pass a request whose argument type matches what `arg` points to, and
    // the pointee lives for the whole call.
    if unsafe { libc::ioctl(fd, request, arg) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Brings `iface` up with the user-mode networking plan. Returns false when there is no NIC.
pub fn configure(iface: &str) -> std::io::Result<bool> {
    if !std::path::Path::new("/sys/class/net").join(iface).exists() {
        return Ok(false);
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let fd = sock.as_raw_fd();
    let mut req = ifreq(iface);
    req.ifr_ifru.ifru_addr = sockaddr(GUEST_ADDR);
    ioctl(
        fd,
        libc::SIOCSIFADDR,
        &mut req as *mut _ as *mut libc::c_void,
    )?;
    let mut req = ifreq(iface);
    req.ifr_ifru.ifru_netmask = sockaddr(NETMASK);
    ioctl(
        fd,
        libc::SIOCSIFNETMASK,
        &mut req as *mut _ as *mut libc::c_void,
    )?;
    let mut req = ifreq(iface);
    ioctl(
        fd,
        libc::SIOCGIFFLAGS,
        &mut req as *mut _ as *mut libc::c_void,
    )?;
    // SAFETY: the union field was just filled in by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        fd,
        libc::SIOCSIFFLAGS,
        &mut req as *mut _ as *mut libc::c_void,
    )?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(GATEWAY);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    match ioctl(
        fd,
        libc::SIOCADDRT,
        &mut route as *mut _ as *mut libc::c_void,
    ) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
        _ => {}
    }
    let _ = std::fs::create_dir_all("/etc");
    std::fs::write("/etc/resolv.conf", format!("nameserver {DNS}\n"))?;
    Ok(true)
}

/// Takes every NIC away (the `none` connector): unbinds each virtio-net device from its
/// driver, then checks that no interface but `lo` is left.
pub fn detach_nics() -> std::io::Result<()> {
    let driver = std::path::Path::new("/sys/bus/virtio/drivers/virtio_net");
    if let Ok(entries) = std::fs::read_dir(driver) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("virtio") {
                std::fs::write(driver.join("unbind"), name.as_bytes())?;
            }
        }
    }
    let left: Vec<String> = std::fs::read_dir("/sys/class/net")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "network interfaces remain: {}",
            left.join(", ")
        )))
    }
}
