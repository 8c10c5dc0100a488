//! The guest-facing side of the backend: the addresses it answers for and its MAC.

use ipnet::Ipv4Net;
pub use kiln_types::guest_net::{DNS_ADDR, GATEWAY_ADDR, GUEST_ADDR, MTU};
use kiln_types::guest_net::{GUEST_NET_ADDR, GUEST_NET_PREFIX};

/// The backend's MAC address (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];

/// The guest network, 10.0.2.0/24.
pub const GUEST_NET: Ipv4Net = Ipv4Net::new_assert(GUEST_NET_ADDR, GUEST_NET_PREFIX);
