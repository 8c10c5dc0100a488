//! The guest network plan, shared by the guest agent (which configures the NIC) and the
//! host's network backend (which plays gateway and resolver).

use std::net::Ipv4Addr;

/// The guest's own address.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest network, 10.0.2.0/24.
pub const GUEST_NET_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const GUEST_NET_PREFIX: u8 = 24;
pub const GUEST_NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The host backend's address: the guest's default gateway, where host services appear.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// kiln's resolver.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Link MTU of the guest NIC.
pub const MTU: usize = 1500;
