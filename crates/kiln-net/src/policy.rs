//! Egress connectors and the policy they compile to.
//!
//! A microVM names its connectors at RunMicrovm (builds at CreateMicrovmImage):
//! `none`, `internet`, `allowlist` (CIDRs and DNS names, with ports) and `host-service` (one
//! named host port the operator defined). Whatever the connectors, host loopback and every
//! host address stay closed: the only way to a host port is a `host-service`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::addressing::{DNS_ADDR, GATEWAY_ADDR, GUEST_NET};

/// At most this many connectors, destinations and ports: policies are checked per connection.
pub const MAX_ENTRIES: usize = 64;
const MAX_NAME_LEN: usize = 253;

pub use kiln_types::{Connector, Destination};

/// A host port the operator allows microVMs to ask for by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostService {
    pub name: String,
    pub target: SocketAddr,
}

/// What the operator configured once for every microVM.
#[derive(Debug, Clone, Default)]
pub struct OperatorConfig {
    pub host_services: Vec<HostService>,
    /// Names kiln's resolver answers itself (for private test or intranet hosts).
    pub static_hosts: HashMap<String, Vec<Ipv4Addr>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("connector `none` cannot be combined with other connectors")]
    NoneWithOthers,
    #[error("too many {what} (the limit is {MAX_ENTRIES})")]
    TooMany { what: &'static str },
    #[error("allowlist destination #{index} must have exactly one of `cidr` or `name`")]
    CidrOrName { index: usize },
    #[error("allowlist destination #{index}: `{cidr}` is not an IPv4 CIDR like 10.1.2.0/24")]
    BadCidr { index: usize, cidr: String },
    #[error("allowlist destination #{index}: `{name}` is not a DNS name")]
    BadName { index: usize, name: String },
    #[error("allowlist destination #{index}: port 0 is not a port")]
    BadPort { index: usize },
    #[error("unknown host-service `{name}`: the operator defines them with kilnd --host-service NAME=ADDR:PORT (defined: {defined})")]
    UnknownHostService { name: String, defined: String },
}

/// Ports a rule allows; empty means all.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ports(Vec<u16>);

impl Ports {
    pub fn allows(&self, port: u16) -> bool {
        self.0.is_empty() || self.0.contains(&port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum NamePattern {
    Exact(String),
    /// `*.example.com`: any name below `example.com`.
    Suffix(String),
}

impl NamePattern {
    fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Suffix(s) => name.len() > s.len() + 1 && name.ends_with(&format!(".{s}")),
        }
    }
}

/// Why a destination was refused; shown in denial events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    NoNetwork,
    HostAddress,
    Reserved,
    PrivateRange,
    LinkLocal,
    /// A cloud's metadata or wire server, outside the link-local range.
    Metadata,
    /// A name whose DNS answer held only addresses that stay closed.
    ClosedAnswer,
    NotAllowed,
    Gateway,
    UnsupportedProtocol,
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DenyReason::NoNetwork => "the microVM has no network (connector none)",
            DenyReason::HostAddress => "host addresses are closed (use a host-service connector)",
            DenyReason::Reserved => "reserved or multicast address",
            DenyReason::PrivateRange => {
                "private range (allow it explicitly with an allowlist CIDR)"
            }
            DenyReason::LinkLocal => {
                "link-local range (cloud metadata lives there; no connector opens it)"
            }
            DenyReason::Metadata => "a cloud metadata or wire server (no connector opens it)",
            DenyReason::ClosedAnswer => {
                "it resolved only to private or closed addresses (allow them with a CIDR)"
            }
            DenyReason::NotAllowed => "not in the microVM's allowlist",
            DenyReason::Gateway => "no host service on that gateway port",
            DenyReason::UnsupportedProtocol => "only TCP and DNS leave the microVM",
        })
    }
}

/// The decision for one outgoing connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Connect to this host address.
    Allow(SocketAddr),
    Deny(DenyReason),
}

/// What the host looks like from the policy's point of view: its own addresses and the
/// networks it is attached to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub addrs: Vec<Ipv4Addr>,
    pub subnets: Vec<Ipv4Net>,
}

impl HostFacts {
    /// Reads the host's interface addresses (empty if they cannot be read).
    pub fn read() -> HostFacts {
        HostFacts::try_read().unwrap_or_default()
    }

    /// Reads the host's interface addresses.
    pub fn try_read() -> std::io::Result<HostFacts> {
        let mut facts = HostFacts::default();
        for (ip, mask) in crate::hostaddrs::read()? {
            facts.addrs.push(ip);
            let prefix = u32::from(mask).leading_ones() as u8;
            if let Ok(net) = Ipv4Net::new(ip, prefix) {
                let net = net.trunc();
                if !facts.subnets.contains(&net) {
                    facts.subnets.push(net);
                }
            }
        }
        Ok(facts)
    }
}

const fn net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

/// Ranges no connector opens, an explicit allowlist CIDR included (a host-service names its
/// target itself): the host's loopback, "this network", link-local (169.254.169.254 and the
/// other cloud metadata endpoints), multicast and reserved space, and the metadata and wire
/// servers clouds put outside link-local.
const ALWAYS_CLOSED: &[(Ipv4Net, DenyReason)] = &[
    (net(0, 0, 0, 0, 8), DenyReason::Reserved),
    (net(127, 0, 0, 0, 8), DenyReason::HostAddress),
    (net(169, 254, 0, 0, 16), DenyReason::LinkLocal),
    (net(224, 0, 0, 0, 4), DenyReason::Reserved),
    (net(240, 0, 0, 0, 4), DenyReason::Reserved),
    // Azure's wire server.
    (net(168, 63, 129, 16, 32), DenyReason::Metadata),
    // Alibaba Cloud's metadata service.
    (net(100, 100, 100, 200, 32), DenyReason::Metadata),
];

/// Ranges `internet` does not reach; an allowlist CIDR can open them explicitly.
const NOT_INTERNET: &[(Ipv4Net, DenyReason)] = &[
    (net(10, 0, 0, 0, 8), DenyReason::PrivateRange),
    (net(172, 16, 0, 0, 12), DenyReason::PrivateRange),
    (net(192, 168, 0, 0, 16), DenyReason::PrivateRange),
    (net(100, 64, 0, 0, 10), DenyReason::PrivateRange),
];

fn in_ranges(ip: Ipv4Addr, ranges: &[(Ipv4Net, DenyReason)]) -> Option<DenyReason> {
    ranges
        .iter()
        .find_map(|(net, why)| net.contains(&ip).then_some(*why))
}

/// A microVM's compiled egress policy. It is serialised only to hand it, compiled, to the
/// microVM's network backend process (kilnd compiles and validates it first).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    none: bool,
    internet: bool,
    cidrs: Vec<(Ipv4Net, Ports)>,
    names: Vec<(NamePattern, Ports)>,
    /// Guest port on the gateway address → host target.
    host_services: Vec<(u16, SocketAddr)>,
    static_hosts: HashMap<String, Vec<Ipv4Addr>>,
    host: HostFacts,
}

fn valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN
        && !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Lower-cases a DNS name and drops the trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl EgressPolicy {
    /// Compiles connectors against the operator's configuration and the host's addresses.
    pub fn compile(
        connectors: &[Connector],
        operator: &OperatorConfig,
        host: HostFacts,
    ) -> Result<EgressPolicy, PolicyError> {
        if connectors.len() > MAX_ENTRIES {
            return Err(PolicyError::TooMany { what: "connectors" });
        }
        let mut policy = EgressPolicy {
            host,
            static_hosts: operator
                .static_hosts
                .iter()
                .map(|(k, v)| (normalize_name(k), v.clone()))
                .collect(),
            ..EgressPolicy::default()
        };
        if connectors.contains(&Connector::None) {
            if connectors.len() > 1 {
                return Err(PolicyError::NoneWithOthers);
            }
            policy.none = true;
            return Ok(policy);
        }
        for connector in connectors {
            match connector {
                Connector::None => unreachable!("handled above"),
                Connector::Internet => policy.internet = true,
                Connector::Allowlist { destinations } => policy.add_destinations(destinations)?,
                Connector::HostService { name } => {
                    let service = operator
                        .host_services
                        .iter()
                        .find(|s| &s.name == name)
                        .ok_or_else(|| PolicyError::UnknownHostService {
                            name: name.clone(),
                            defined: defined_names(operator),
                        })?;
                    policy
                        .host_services
                        .push((service.target.port(), service.target));
                }
            }
        }
        Ok(policy)
    }

    fn add_destinations(&mut self, destinations: &[Destination]) -> Result<(), PolicyError> {
        if destinations.len() + self.cidrs.len() + self.names.len() > MAX_ENTRIES {
            return Err(PolicyError::TooMany {
                what: "allowlist destinations",
            });
        }
        for (index, d) in destinations.iter().enumerate() {
            if d.ports.len() > MAX_ENTRIES {
                return Err(PolicyError::TooMany { what: "ports" });
            }
            if d.ports.contains(&0) {
                return Err(PolicyError::BadPort { index });
            }
            let ports = Ports(d.ports.clone());
            match (&d.cidr, &d.name) {
                (Some(cidr), None) => {
                    let net = cidr
                        .parse::<Ipv4Net>()
                        .or_else(|_| cidr.parse::<Ipv4Addr>().map(Ipv4Net::from))
                        .map_err(|_| PolicyError::BadCidr {
                            index,
                            cidr: cidr.clone(),
                        })?;
                    self.cidrs.push((net.trunc(), ports));
                }
                (None, Some(name)) => {
                    let name = normalize_name(name);
                    let pattern = match name.strip_prefix("*.") {
                        Some(suffix) if valid_name(suffix) => NamePattern::Suffix(suffix.into()),
                        None if valid_name(&name) => NamePattern::Exact(name),
                        _ => return Err(PolicyError::BadName { index, name }),
                    };
                    self.names.push((pattern, ports));
                }
                _ => return Err(PolicyError::CidrOrName { index }),
            }
        }
        Ok(())
    }

    /// True when the guest gets no network at all.
    pub fn is_none(&self) -> bool {
        self.none
    }

    /// Whether kiln's resolver answers `name`, and with which ports connections to its
    /// addresses are then allowed (`None`: the name is refused).
    pub fn name_rule(&self, name: &str) -> Option<NameGrant> {
        if self.none {
            return None;
        }
        let name = normalize_name(name);
        let ports: Vec<Ports> = self
            .names
            .iter()
            .filter(|(p, _)| p.matches(&name))
            .map(|(_, ports)| ports.clone())
            .collect();
        if !ports.is_empty() {
            return Some(NameGrant::Ports(ports));
        }
        if self.internet {
            return Some(NameGrant::AnyPublic);
        }
        None
    }

    /// Addresses the operator pinned for `name`, if any.
    pub fn static_host(&self, name: &str) -> Option<&[Ipv4Addr]> {
        self.static_hosts
            .get(&normalize_name(name))
            .map(Vec::as_slice)
    }

    /// Decides a TCP connection from the guest to `dst`. `resolved` holds the ports that
    /// allowlisted names resolved to `dst` grant; `pinned`: one of them is a name the
    /// operator pinned (`--egress-host`), which may lead to a private address.
    pub fn check_tcp(&self, dst: SocketAddrV4, resolved: &[Ports], pinned: bool) -> Verdict {
        let (ip, port) = (*dst.ip(), dst.port());
        if self.none {
            return Verdict::Deny(DenyReason::NoNetwork);
        }
        if GUEST_NET.contains(&ip) {
            if ip == GATEWAY_ADDR {
                if let Some((_, target)) = self.host_services.iter().find(|(p, _)| *p == port) {
                    return Verdict::Allow(*target);
                }
            }
            return Verdict::Deny(if ip == GATEWAY_ADDR || ip == DNS_ADDR {
                DenyReason::Gateway
            } else {
                DenyReason::NotAllowed
            });
        }
        if let Some(why) = in_ranges(ip, ALWAYS_CLOSED) {
            return Verdict::Deny(why);
        }
        if self.host.addrs.contains(&ip) || ip.is_broadcast() {
            return Verdict::Deny(DenyReason::HostAddress);
        }
        let allow = Verdict::Allow(SocketAddr::V4(dst));
        if self
            .cidrs
            .iter()
            .any(|(net, ports)| net.contains(&ip) && ports.allows(port))
        {
            return allow;
        }
        if self.cidrs.iter().any(|(net, _)| net.contains(&ip)) {
            return Verdict::Deny(DenyReason::NotAllowed); // listed, but not this port
        }
        // Not opened by a CIDR: private and host-network addresses stay closed, also when
        // an allowlisted name resolved to them (a DNS answer never opens the inside).
        let granted = resolved.iter().any(|p| p.allows(port));
        match self.private(ip) {
            Some(_) if granted && pinned => allow,
            Some(why) => Verdict::Deny(why),
            None if granted || self.internet => allow,
            None => Verdict::Deny(DenyReason::NotAllowed),
        }
    }
}

impl EgressPolicy {
    /// Why `ip` is private to this host's side (a private range or a network the host is
    /// on), if it is.
    fn private(&self, ip: Ipv4Addr) -> Option<DenyReason> {
        in_ranges(ip, NOT_INTERNET).or_else(|| {
            self.host
                .subnets
                .iter()
                .any(|net| net.contains(&ip))
                .then_some(DenyReason::PrivateRange)
        })
    }

    /// The addresses of a DNS answer the guest may see: none that no connector opens (closed
    /// ranges, the host's own), and no private one unless an allowlist CIDR names it. Names
    /// the operator pinned (`--egress-host`) are not filtered here; connections to them
    /// still are.
    pub fn filter_answer(&self, addrs: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
        addrs
            .iter()
            .copied()
            .filter(|ip| {
                in_ranges(*ip, ALWAYS_CLOSED).is_none()
                    && !self.host.addrs.contains(ip)
                    && !ip.is_broadcast()
                    && (self.private(*ip).is_none()
                        || self.cidrs.iter().any(|(net, _)| net.contains(ip)))
            })
            .collect()
    }

    /// The host's addresses changed: later checks use `host`.
    pub fn with_host(&self, host: HostFacts) -> EgressPolicy {
        EgressPolicy {
            host,
            ..self.clone()
        }
    }

    pub fn host(&self) -> &HostFacts {
        &self.host
    }
}

/// What resolving an allowed name grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameGrant {
    /// Through `internet`: the addresses are checked like any public destination.
    AnyPublic,
    /// Through allowlist names: connections to the resolved addresses on these ports.
    Ports(Vec<Ports>),
}

fn defined_names(operator: &OperatorConfig) -> String {
    if operator.host_services.is_empty() {
        return "none".into();
    }
    operator
        .host_services
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `NAME=ADDR:PORT` (kilnd's `--host-service`).
pub fn parse_host_service(text: &str) -> Result<HostService, String> {
    let (name, target) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected NAME=ADDR:PORT"))?;
    if !valid_name(name) {
        return Err(format!("`{name}` is not a valid service name"));
    }
    let target: SocketAddr = target
        .parse()
        .map_err(|_| format!("`{target}`: expected ADDR:PORT, e.g. 127.0.0.1:5432"))?;
    Ok(HostService {
        name: name.to_string(),
        target,
    })
}

/// Parses `NAME=IPV4` (kilnd's `--egress-host`).
pub fn parse_static_host(text: &str) -> Result<(String, Ipv4Addr), String> {
    let (name, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected NAME=IPV4"))?;
    let name = normalize_name(name);
    if !valid_name(&name) {
        return Err(format!("`{name}` is not a DNS name"));
    }
    let addr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
    Ok((name, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            addrs: vec![Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::LOCALHOST],
            subnets: vec!["192.0.2.0/24".parse().unwrap()],
        }
    }

    fn compile(json: &str) -> Result<EgressPolicy, PolicyError> {
        let connectors: Vec<Connector> = serde_json::from_str(json).unwrap();
        let operator = OperatorConfig {
            host_services: vec![HostService {
                name: "reports".into(),
                target: "127.0.0.1:7000".parse().unwrap(),
            }],
            static_hosts: HashMap::new(),
        };
        EgressPolicy::compile(&connectors, &operator, host())
    }

    fn tcp(p: &EgressPolicy, dst: &str) -> Verdict {
        p.check_tcp(dst.parse().unwrap(), &[], false)
    }

    #[test]
    fn internet_reaches_public_addresses_only() {
        let p = compile(r#"[{"type":"internet"}]"#).unwrap();
        assert!(matches!(tcp(&p, "203.0.113.80:443"), Verdict::Allow(_)));
        for (dst, why) in [
            ("127.0.0.1:8443", DenyReason::HostAddress),
            ("192.0.2.2:22", DenyReason::HostAddress),
            ("192.0.2.1:80", DenyReason::PrivateRange),
            ("169.254.169.254:80", DenyReason::LinkLocal),
            ("10.1.2.3:80", DenyReason::PrivateRange),
            ("172.20.0.1:80", DenyReason::PrivateRange),
            ("192.168.1.1:80", DenyReason::PrivateRange),
            ("100.64.0.1:80", DenyReason::PrivateRange),
            ("224.0.0.1:80", DenyReason::Reserved),
            ("10.0.2.2:7000", DenyReason::Gateway),
        ] {
            assert_eq!(tcp(&p, dst), Verdict::Deny(why), "{dst}");
        }
    }

    #[test]
    fn allowlists_open_only_what_they_name() {
        let p = compile(
            r#"[{"type":"allowlist","destinations":[{"cidr":"10.213.1.0/24","ports":[8080]},{"name":"*.example.test"}]}]"#,
        )
        .unwrap();
        assert!(matches!(tcp(&p, "10.213.1.2:8080"), Verdict::Allow(_)));
        assert_eq!(
            tcp(&p, "10.213.1.2:22"),
            Verdict::Deny(DenyReason::NotAllowed)
        );
        assert_eq!(
            tcp(&p, "10.213.2.2:8080"),
            Verdict::Deny(DenyReason::PrivateRange)
        );
        assert_eq!(
            tcp(&p, "169.254.169.254:80"),
            Verdict::Deny(DenyReason::LinkLocal)
        );
        assert_eq!(
            tcp(&p, "203.0.113.80:443"),
            Verdict::Deny(DenyReason::NotAllowed)
        );
        // Loopback stays closed even when a CIDR covers it.
        let wide =
            compile(r#"[{"type":"allowlist","destinations":[{"cidr":"0.0.0.0/0"}]}]"#).unwrap();
        assert_eq!(
            tcp(&wide, "127.0.0.1:80"),
            Verdict::Deny(DenyReason::HostAddress)
        );
        assert_eq!(
            tcp(&wide, "192.0.2.2:80"),
            Verdict::Deny(DenyReason::HostAddress)
        );
        // Names: only allowed ones resolve; their addresses get their ports.
        assert!(p.name_rule("api.example.test.").is_some());
        assert!(p.name_rule("example.test").is_none());
        assert!(p.name_rule("other.test").is_none());
        let grant = Ports(vec![443]);
        let v = p.check_tcp(
            "198.51.100.7:443".parse().unwrap(),
            std::slice::from_ref(&grant),
            false,
        );
        assert!(matches!(v, Verdict::Allow(_)));
        let v = p.check_tcp(
            "198.51.100.7:80".parse().unwrap(),
            std::slice::from_ref(&grant),
            false,
        );
        assert_eq!(v, Verdict::Deny(DenyReason::NotAllowed));
        // A DNS answer never opens the inside; a name the operator pinned may.
        let inside = "10.9.8.7:443".parse().unwrap();
        let v = p.check_tcp(inside, std::slice::from_ref(&grant), false);
        assert_eq!(v, Verdict::Deny(DenyReason::PrivateRange));
        let v = p.check_tcp(inside, std::slice::from_ref(&grant), true);
        assert!(matches!(v, Verdict::Allow(_)));
        let metadata = "169.254.169.254:443".parse().unwrap();
        let v = p.check_tcp(metadata, std::slice::from_ref(&grant), true);
        assert_eq!(v, Verdict::Deny(DenyReason::LinkLocal), "not even pinned");
    }

    #[test]
    fn metadata_and_link_local_stay_closed_whatever_the_connectors_say() {
        let wide = compile(
            r#"[{"type":"internet"},{"type":"allowlist","destinations":[
                {"cidr":"0.0.0.0/0"},{"cidr":"169.254.169.254/32"},{"cidr":"168.63.129.16"}]}]"#,
        )
        .unwrap();
        for (dst, why) in [
            ("169.254.169.254:80", DenyReason::LinkLocal),
            ("169.254.170.2:80", DenyReason::LinkLocal),
            ("168.63.129.16:80", DenyReason::Metadata),
            ("100.100.100.200:80", DenyReason::Metadata),
            ("0.0.0.0:80", DenyReason::Reserved),
            ("127.0.0.53:53", DenyReason::HostAddress),
            ("239.255.255.250:1900", DenyReason::Reserved),
            ("255.255.255.255:67", DenyReason::Reserved),
            ("192.0.2.2:7070", DenyReason::HostAddress),
        ] {
            assert_eq!(tcp(&wide, dst), Verdict::Deny(why), "{dst}");
        }
        // An explicit CIDR still opens a private range.
        assert!(matches!(tcp(&wide, "10.1.2.3:80"), Verdict::Allow(_)));
    }

    #[test]
    fn dns_answers_lose_what_would_stay_closed() {
        let p = compile(
            r#"[{"type":"allowlist","destinations":[{"name":"*.example.test"},{"cidr":"10.5.0.0/16"}]}]"#,
        )
        .unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let answer = [
            "198.51.100.7",
            "169.254.169.254",
            "127.0.0.1",
            "10.1.1.1",
            "10.5.1.1",
            "192.0.2.2",
            "192.0.2.9",
            "168.63.129.16",
        ]
        .map(ip);
        assert_eq!(
            p.filter_answer(&answer),
            vec![ip("198.51.100.7"), ip("10.5.1.1")],
            "public, and private only where a CIDR grants it"
        );
        let moved = p.with_host(HostFacts {
            addrs: vec![ip("198.51.100.7")],
            subnets: vec![],
        });
        // The old host address and network are plain public addresses now.
        assert_eq!(
            moved.filter_answer(&answer),
            vec![ip("10.5.1.1"), ip("192.0.2.2"), ip("192.0.2.9")]
        );
        assert_eq!(
            tcp(&moved, "198.51.100.7:80"),
            Verdict::Deny(DenyReason::HostAddress),
            "the host's new address is closed"
        );
    }

    #[test]
    fn host_services_and_none() {
        let p = compile(r#"[{"type":"host-service","name":"reports"}]"#).unwrap();
        assert_eq!(
            tcp(&p, "10.0.2.2:7000"),
            Verdict::Allow("127.0.0.1:7000".parse().unwrap())
        );
        assert_eq!(tcp(&p, "10.0.2.2:7001"), Verdict::Deny(DenyReason::Gateway));
        assert_eq!(
            tcp(&p, "127.0.0.1:7000"),
            Verdict::Deny(DenyReason::HostAddress)
        );
        let none = compile(r#"[{"type":"none"}]"#).unwrap();
        assert!(none.is_none());
        assert_eq!(
            tcp(&none, "203.0.113.80:443"),
            Verdict::Deny(DenyReason::NoNetwork)
        );
        assert!(none.name_rule("example.com").is_none());
    }

    #[test]
    fn bad_connectors_say_what_to_fix() {
        let e = compile(r#"[{"type":"host-service","name":"db"}]"#).unwrap_err();
        assert!(e.to_string().contains("reports"), "{e}");
        let e = compile(r#"[{"type":"none"},{"type":"internet"}]"#).unwrap_err();
        assert_eq!(e, PolicyError::NoneWithOthers);
        let e = compile(r#"[{"type":"allowlist","destinations":[{"cidr":"10.0.0.0/33"}]}]"#)
            .unwrap_err();
        assert!(matches!(e, PolicyError::BadCidr { .. }), "{e}");
        let e = compile(
            r#"[{"type":"allowlist","destinations":[{"cidr":"10.0.0.0/8","name":"a.b"}]}]"#,
        )
        .unwrap_err();
        assert!(matches!(e, PolicyError::CidrOrName { index: 0 }), "{e}");
        let e =
            compile(r#"[{"type":"allowlist","destinations":[{"name":"bad name"}]}]"#).unwrap_err();
        assert!(matches!(e, PolicyError::BadName { .. }), "{e}");
        assert!(serde_json::from_str::<Vec<Connector>>(r#"[{"type":"vpc"}]"#).is_err());
        assert!(parse_host_service("db=127.0.0.1:5432").is_ok());
        assert!(parse_host_service("db").is_err());
        assert_eq!(
            parse_static_host("Allowed.Test=10.213.1.2").unwrap(),
            ("allowed.test".into(), Ipv4Addr::new(10, 213, 1, 2))
        );
    }
}
