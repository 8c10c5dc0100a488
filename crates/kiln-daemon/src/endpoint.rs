//! How a microVM's `endpoint` is written, so that `http(s)://{endpoint}/…` works as returned:
//! host style (`<id>.<domain>:<port>`) needs a resolver that maps `*.<domain>` to the
//! ingress; path style (`<address>:<port>/m/<id>`) works with any resolver. `--endpoint-style
//! auto` picks host style only when a probe name under the domain resolves to the ingress,
//! once at start. The ingress accepts both styles whatever is chosen.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use kiln_proxy::server::PATH_PREFIX;

use crate::config::EndpointStyle;

/// The name `auto` resolves: any name under the domain would do.
pub const PROBE_LABEL: &str = "kiln-endpoint-probe";
/// A resolver that does not answer in this time counts as one that does not resolve.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Host or path style for `choice`: `Auto` becomes `Host` when `resolved` (the addresses
/// `<probe>.<domain>` resolves to) holds one the ingress listening on `listen` accepts.
pub fn choose(choice: EndpointStyle, listen: SocketAddr, resolved: &[IpAddr]) -> EndpointStyle {
    match choice {
        EndpointStyle::Auto => {
            let reaches = resolved
                .iter()
                .any(|ip| *ip == listen.ip() || listen.ip().is_unspecified());
            if reaches {
                EndpointStyle::Host
            } else {
                EndpointStyle::Path
            }
        }
        fixed => fixed,
    }
}

/// What `<probe>.<domain>` resolves to with the system's resolver (none on a failure or
/// after [`PROBE_TIMEOUT`]).
pub async fn resolve_probe(domain: &str, port: u16) -> Vec<IpAddr> {
    let name = format!("{PROBE_LABEL}.{domain}:{port}");
    let lookup = tokio::task::spawn_blocking(move || {
        name.to_socket_addrs()
            .map(|a| a.map(|a| a.ip()).collect::<Vec<_>>())
            .unwrap_or_default()
    });
    match tokio::time::timeout(PROBE_TIMEOUT, lookup).await {
        Ok(Ok(ips)) => ips,
        _ => Vec::new(),
    }
}

/// The address path-style endpoints name: the ingress's own, or loopback when it listens
/// on every address.
pub fn path_host(listen: SocketAddr) -> IpAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// A microVM's endpoint in `style` (`Auto` is never left after start; it is written as host).
pub fn endpoint(
    style: EndpointStyle,
    id: &str,
    domain: &str,
    port: u16,
    listen: SocketAddr,
) -> String {
    match style {
        EndpointStyle::Path => {
            let at = SocketAddr::new(path_host(listen), port);
            format!("{at}{PATH_PREFIX}{id}")
        }
        EndpointStyle::Host | EndpointStyle::Auto => format!("{id}.{domain}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn auto_is_host_style_only_when_the_domain_reaches_the_ingress() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "10.1.2.3".parse().unwrap();
        let listen = at("127.0.0.1:8443");
        assert_eq!(
            choose(EndpointStyle::Auto, listen, &[]),
            EndpointStyle::Path
        );
        assert_eq!(
            choose(EndpointStyle::Auto, listen, &[other]),
            EndpointStyle::Path
        );
        assert_eq!(
            choose(EndpointStyle::Auto, listen, &[other, lo]),
            EndpointStyle::Host
        );
        assert_eq!(
            choose(EndpointStyle::Auto, at("0.0.0.0:8443"), &[other]),
            EndpointStyle::Host
        );
        assert_eq!(
            choose(EndpointStyle::Host, listen, &[]),
            EndpointStyle::Host
        );
        assert_eq!(
            choose(EndpointStyle::Path, listen, &[lo]),
            EndpointStyle::Path
        );
    }

    #[test]
    fn endpoints_in_each_style() {
        let e = |style, listen| endpoint(style, "mvm-1", "localhost", 8443, at(listen));
        assert_eq!(
            e(EndpointStyle::Host, "127.0.0.1:0"),
            "mvm-1.localhost:8443"
        );
        assert_eq!(
            e(EndpointStyle::Path, "127.0.0.1:0"),
            "127.0.0.1:8443/m/mvm-1"
        );
        assert_eq!(
            e(EndpointStyle::Path, "0.0.0.0:0"),
            "127.0.0.1:8443/m/mvm-1"
        );
        assert_eq!(e(EndpointStyle::Path, "[::]:0"), "[::1]:8443/m/mvm-1");
        assert_eq!(
            e(EndpointStyle::Path, "10.0.0.5:0"),
            "10.0.0.5:8443/m/mvm-1"
        );
    }

    #[tokio::test]
    async fn a_name_that_cannot_resolve_gives_no_address() {
        assert!(resolve_probe("kiln-test.invalid", 8443).await.is_empty());
    }
}
