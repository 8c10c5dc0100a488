//! The userspace network stack one guest talks to. It plays the guest's gateway (10.0.2.2)
//! and resolver (10.0.2.3) with smoltcp, and turns each TCP connection the guest opens into
//! a host socket — only after the policy allows the destination and the host connection is
//! up. A refused or unreachable destination gets a TCP reset, so the guest sees
//! "connection refused" at once. UDP other than DNS and everything but IPv4/ARP is dropped.
//!
//! Every buffer is bounded: per connection 64 KiB each way in smoltcp plus a few chunks in
//! flight to the host socket; at most [`MAX_CONNECTIONS`] connections, [`MAX_CONNECTING`]
//! pending connects and [`MAX_LOOKUPS`] pending DNS lookups per guest.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tracing::debug;

use crate::addressing::{DNS_ADDR, GATEWAY_ADDR, GATEWAY_MAC};
use crate::device::QueueDevice;
use crate::dns::{self, Answer, Query};
use crate::observe::{Denial, DenialSink, NetCounters};
use crate::policy::{DenyReason, EgressPolicy, NameGrant, Ports, Verdict};

pub const MAX_CONNECTIONS: usize = 256;
pub const MAX_CONNECTING: usize = 64;
pub const MAX_LOOKUPS: usize = 32;
const MAX_RESOLVED: usize = 4096;
const SOCKET_BUFFER: usize = 64 * 1024;
const CHUNK: usize = 16 * 1024;
const CHUNKS_IN_FLIGHT: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Egress passes per step: enough for a window's worth of segments, bounded for fairness.
const MAX_EGRESS_PASSES: usize = 64;

/// A guest TCP connection: (guest address, destination).
type Tuple = (SocketAddrV4, SocketAddrV4);

struct Conn {
    handle: SocketHandle,
    to_host: Option<mpsc::Sender<Bytes>>,
    from_host: mpsc::Receiver<Bytes>,
    pending: Option<Bytes>,
    host_done: bool,
    closing: bool,
}

/// A finished host connect: the held SYN goes in once its fate is known.
struct Connected {
    tuple: Tuple,
    syn: Vec<u8>,
    stream: Option<TcpStream>,
}

/// What an answered name taught the stack about one address.
struct Learned {
    ports: Vec<Ports>,
    /// From a name the operator pinned (may lead inside).
    pinned: bool,
    /// The guest was told to forget the answer by then (its TTL, and some slack).
    expires: std::time::Instant,
}

/// How long an answer's addresses stay granted: the TTL given to the guest, plus slack for
/// a guest that connects just as its cache expires.
const LEARNED_FOR: Duration = Duration::from_secs(dns::ANSWER_TTL as u64 + 30);

/// A finished DNS lookup.
struct Resolved {
    to: IpEndpoint,
    query: Query,
    grant: NameGrant,
    answer: Answer,
}

pub struct Stack {
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    dns_socket: SocketHandle,
    conns: HashMap<Tuple, Conn>,
    connecting: HashSet<Tuple>,
    lookups: usize,
    resolved: HashMap<Ipv4Addr, Learned>,
    policy: Arc<EgressPolicy>,
    counters: Arc<NetCounters>,
    denials: DenialSink,
    wake: Arc<Notify>,
    connected_tx: mpsc::Sender<Connected>,
    connected_rx: mpsc::Receiver<Connected>,
    resolved_tx: mpsc::Sender<Resolved>,
    resolved_rx: mpsc::Receiver<Resolved>,
    started: std::time::Instant,
    /// When the host's addresses were last read.
    host_read: std::time::Instant,
}

/// The host's addresses are re-read before a connection or an answer when they are older
/// than this: an address the host gains is closed within a second.
const HOST_REFRESH: Duration = Duration::from_secs(1);

impl Stack {
    pub fn new(
        policy: Arc<EgressPolicy>,
        counters: Arc<NetCounters>,
        denials: DenialSink,
    ) -> Stack {
        let mut device = QueueDevice::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = rand_seed();
        let started = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut device, SmolInstant::from_millis(0));
        iface.update_ip_addrs(|addrs| {
            for a in [GATEWAY_ADDR, DNS_ADDR] {
                // INVARIANT: the list starts empty and smoltcp's default capacity
                // (iface-max-addr-count) is 2: both addresses fit.
                #[allow(clippy::expect_used)]
                addrs
                    .push(IpCidr::new(
                        IpAddress::Ipv4(a),
                        kiln_types::guest_net::GUEST_NET_PREFIX,
                    ))
                    .expect("two addresses fit");
            }
        });
        // Accept packets for every destination: the stack stands in for the whole world.
        iface.set_any_ip(true);
        // INVARIANT: the table starts empty and smoltcp's default capacity
        // (iface-max-route-count) is 2: one route fits.
        #[allow(clippy::expect_used)]
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY_ADDR)
            .expect("one route fits");
        let mut sockets = SocketSet::new(Vec::new());
        let mut udp_socket = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; 16],
                vec![0; 16 * dns::MAX_QUERY],
            ),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16 * 1024]),
        );
        // INVARIANT: binding fails only for port 0 or an already bound socket; this one is
        // fresh and binds port 53.
        #[allow(clippy::expect_used)]
        udp_socket
            .bind(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(DNS_ADDR)),
                port: 53,
            })
            .expect("bind the resolver");
        let dns_socket = sockets.add(udp_socket);
        let (connected_tx, connected_rx) = mpsc::channel(MAX_CONNECTING);
        let (resolved_tx, resolved_rx) = mpsc::channel(MAX_LOOKUPS);
        Stack {
            iface,
            device,
            sockets,
            dns_socket,
            conns: HashMap::new(),
            connecting: HashSet::new(),
            lookups: 0,
            resolved: HashMap::new(),
            policy,
            counters,
            denials,
            wake: Arc::new(Notify::new()),
            connected_tx,
            connected_rx,
            resolved_tx,
            resolved_rx,
            started,
            host_read: started,
        }
    }

    /// Re-reads the host's addresses if they are older than [`HOST_REFRESH`] (two ioctls;
    /// a failed read keeps the last ones).
    fn refresh_host(&mut self) {
        if self.host_read.elapsed() < HOST_REFRESH {
            return;
        }
        self.host_read = std::time::Instant::now();
        if let Ok(host) = crate::policy::HostFacts::try_read() {
            if &host != self.policy.host() {
                tracing::info!(addrs = ?host.addrs, "the host's addresses changed");
                self.policy = Arc::new(self.policy.with_host(host));
            }
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_millis(self.started.elapsed().as_millis() as i64)
    }

    fn deny(&self, protocol: &'static str, destination: String, reason: DenyReason) {
        self.counters.denials.fetch_add(1, Ordering::Relaxed);
        (self.denials)(Denial {
            protocol,
            destination,
            reason,
        });
    }

    /// Runs until the guest link closes. `frames_in` yields frames from QEMU;
    /// `frames_out` takes frames for it.
    pub async fn run(
        mut self,
        mut frames_in: mpsc::Receiver<Vec<u8>>,
        frames_out: mpsc::Sender<Vec<u8>>,
    ) {
        let wake = self.wake.clone();
        loop {
            self.step();
            for frame in self.device.tx.drain(..) {
                // A full queue drops the frame like a busy NIC would; TCP retransmits.
                let _ = frames_out.try_send(frame);
            }
            let delay = self
                .iface
                .poll_delay(self.now(), &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(Duration::from_secs(1));
            tokio::select! {
                frame = frames_in.recv() => match frame {
                    Some(frame) => {
                        self.ingest(frame);
                        // Take whatever else is already queued before polling.
                        while let Ok(frame) = frames_in.try_recv() {
                            self.ingest(frame);
                        }
                    }
                    None => return,
                },
                Some(done) = self.connected_rx.recv() => self.finish_connect(done),
                Some(done) = self.resolved_rx.recv() => self.finish_lookup(done, true),
                _ = wake.notified() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One round: smoltcp processes what came in, sockets exchange data with host
    /// connections, smoltcp sends what is due.
    fn step(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.serve_dns();
        self.pump();
        // smoltcp sends at most one segment per socket per egress pass: repeat while it
        // sends (bounded), refilling socket buffers from the host side in between.
        for _ in 0..MAX_EGRESS_PASSES {
            let before = self.device.tx.len();
            self.iface
                .poll_egress(self.now(), &mut self.device, &mut self.sockets);
            if self.device.tx.len() == before {
                break;
            }
            self.pump();
        }
    }

    /// Looks at a frame from the guest before smoltcp does: new TCP connections are held
    /// until the policy and the host connect decide them, and what kiln does not carry is
    /// dropped here.
    fn ingest(&mut self, frame: Vec<u8>) {
        match classify(&frame) {
            Inbound::Pass => self.device.rx.push_back(frame),
            Inbound::Drop => {}
            Inbound::TcpSyn(tuple) if !self.conns.contains_key(&tuple) => {
                self.new_connection(tuple, frame)
            }
            Inbound::TcpSyn(_) => self.device.rx.push_back(frame),
            Inbound::Udp(dst) => {
                self.deny("udp", dst.to_string(), DenyReason::UnsupportedProtocol);
                // smoltcp answers with ICMP port unreachable: the guest fails fast.
                self.device.rx.push_back(frame);
            }
        }
    }

    fn new_connection(&mut self, tuple: Tuple, syn: Vec<u8>) {
        if self.connecting.contains(&tuple) {
            return; // a retransmitted SYN while the host connect runs
        }
        let dst = tuple.1;
        self.refresh_host();
        let now = std::time::Instant::now();
        let (grants, pinned) = match self.resolved.get(dst.ip()) {
            Some(l) if l.expires > now => (l.ports.clone(), l.pinned),
            Some(_) => {
                self.resolved.remove(dst.ip());
                (Vec::new(), false)
            }
            None => (Vec::new(), false),
        };
        let target = match self.policy.check_tcp(dst, &grants, pinned) {
            Verdict::Allow(target) => target,
            Verdict::Deny(why) => {
                self.deny("tcp", dst.to_string(), why);
                // No socket listens: smoltcp answers the SYN with a reset.
                self.device.rx.push_back(syn);
                return;
            }
        };
        if self.conns.len() >= MAX_CONNECTIONS || self.connecting.len() >= MAX_CONNECTING {
            debug!(%dst, "too many connections: refusing");
            self.device.rx.push_back(syn);
            return;
        }
        self.connecting.insert(tuple);
        let done = self.connected_tx.clone();
        tokio::spawn(async move {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
                .await
                .ok()
                .and_then(Result::ok);
            let _ = done.send(Connected { tuple, syn, stream }).await;
        });
    }

    fn finish_connect(&mut self, done: Connected) {
        self.connecting.remove(&done.tuple);
        let Some(stream) = done.stream else {
            // The host could not connect: the SYN meets no socket and is reset.
            self.device.rx.push_back(done.syn);
            return;
        };
        let _ = stream.set_nodelay(true);
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        let listen = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*done.tuple.1.ip())),
            port: done.tuple.1.port(),
        };
        if socket.listen(listen).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        let (to_host, from_guest) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let (to_guest, from_host) = mpsc::channel(CHUNKS_IN_FLIGHT);
        tokio::spawn(relay(stream, from_guest, to_guest, self.wake.clone()));
        self.conns.insert(
            done.tuple,
            Conn {
                handle,
                to_host: Some(to_host),
                from_host,
                pending: None,
                host_done: false,
                closing: false,
            },
        );
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        self.device.rx.push_back(done.syn);
    }

    /// Moves bytes between smoltcp sockets and host connections, and ends finished ones.
    fn pump(&mut self) {
        let mut finished = Vec::new();
        for (tuple, conn) in self.conns.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            // Guest → host, as far as the host side takes it.
            while socket.can_recv() {
                let Some(tx) = &conn.to_host else { break };
                let Ok(permit) = tx.try_reserve() else { break };
                let chunk = socket
                    .recv(|data| {
                        let n = data.len().min(CHUNK);
                        (n, Bytes::copy_from_slice(&data[..n]))
                    })
                    .unwrap_or_default();
                self.counters
                    .bytes_out
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                permit.send(chunk);
            }
            // The guest finished sending: pass the end on.
            let guest_finished = matches!(
                socket.state(),
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
                    | tcp::State::Closed
            );
            if guest_finished && !socket.can_recv() {
                conn.to_host = None;
            }
            // Host → guest, as far as the socket's buffer takes it.
            loop {
                if conn.pending.is_none() && !conn.host_done {
                    match conn.from_host.try_recv() {
                        Ok(b) => conn.pending = Some(b),
                        Err(mpsc::error::TryRecvError::Empty) => {}
                        Err(mpsc::error::TryRecvError::Disconnected) => conn.host_done = true,
                    }
                }
                let Some(data) = conn.pending.as_mut() else {
                    break;
                };
                if !socket.can_send() {
                    break;
                }
                let n = socket.send_slice(data).unwrap_or(0);
                self.counters
                    .bytes_in
                    .fetch_add(n as u64, Ordering::Relaxed);
                let _ = data.split_to(n);
                if data.is_empty() {
                    conn.pending = None;
                }
                if n == 0 {
                    break;
                }
            }
            let open = matches!(
                socket.state(),
                tcp::State::Established | tcp::State::CloseWait
            );
            if conn.host_done && conn.pending.is_none() && !conn.closing && open {
                socket.close();
                conn.closing = true;
            }
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                finished.push(*tuple);
            }
        }
        for tuple in finished {
            if let Some(conn) = self.conns.remove(&tuple) {
                self.sockets.remove(conn.handle);
            }
        }
    }

    fn serve_dns(&mut self) {
        loop {
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
            let Ok((data, meta)) = socket.recv() else {
                return;
            };
            let from = meta.endpoint;
            let parsed = dns::parse(data);
            self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
            let query = match parsed {
                Ok(q) => q,
                Err(Some(id)) => {
                    self.send_dns(from, &dns::refused(id));
                    continue;
                }
                Err(None) => continue,
            };
            let Some(grant) = self.policy.name_rule(&query.name) else {
                self.deny(
                    "dns",
                    query.name.clone(),
                    if self.policy.is_none() {
                        DenyReason::NoNetwork
                    } else {
                        DenyReason::NotAllowed
                    },
                );
                let reply = dns::reply(&query, &Answer::NoSuchName);
                self.send_dns(from, &reply);
                continue;
            };
            if let Some(addrs) = self.policy.static_host(&query.name) {
                let answer = Answer::Addresses(addrs.to_vec());
                self.finish_lookup(
                    Resolved {
                        to: from,
                        query,
                        grant,
                        answer,
                    },
                    false,
                );
                continue;
            }
            if self.lookups >= MAX_LOOKUPS {
                let reply = dns::reply(&query, &Answer::ServerFailure);
                self.send_dns(from, &reply);
                continue;
            }
            self.lookups += 1;
            let done = self.resolved_tx.clone();
            tokio::spawn(async move {
                let answer = lookup(&query.name).await;
                let _ = done
                    .send(Resolved {
                        to: from,
                        query,
                        grant,
                        answer,
                    })
                    .await;
            });
        }
    }

    /// `pending`: the answer comes from a lookup counted in `lookups` (the host's resolver);
    /// otherwise from a name the operator pinned. A looked-up answer loses the addresses
    /// that would stay closed before the guest sees it.
    fn finish_lookup(&mut self, mut done: Resolved, pending: bool) {
        if pending {
            self.lookups = self.lookups.saturating_sub(1);
            self.refresh_host();
            if let Answer::Addresses(addrs) = &done.answer {
                let kept = self.policy.filter_answer(addrs);
                if kept.is_empty() {
                    self.deny("dns", done.query.name.clone(), DenyReason::ClosedAnswer);
                    done.answer = Answer::NoSuchName;
                } else {
                    done.answer = Answer::Addresses(kept);
                }
            }
        }
        if let (NameGrant::Ports(ports), Answer::Addresses(addrs)) = (&done.grant, &done.answer) {
            let now = std::time::Instant::now();
            if self.resolved.len() >= MAX_RESOLVED {
                self.resolved.retain(|_, l| l.expires > now);
            }
            for addr in addrs {
                if self.resolved.len() >= MAX_RESOLVED && !self.resolved.contains_key(addr) {
                    break;
                }
                let entry = self.resolved.entry(*addr).or_insert_with(|| Learned {
                    ports: Vec::new(),
                    pinned: false,
                    expires: now,
                });
                entry.expires = now + LEARNED_FOR;
                entry.pinned |= !pending;
                for p in ports {
                    if !entry.ports.contains(p) {
                        entry.ports.push(p.clone());
                    }
                }
            }
        }
        let reply = dns::reply(&done.query, &done.answer);
        self.send_dns(done.to, &reply);
    }

    fn send_dns(&mut self, to: IpEndpoint, reply: &[u8]) {
        let socket = self.sockets.get_mut::<udp::Socket>(self.dns_socket);
        let _ = socket.send_slice(reply, to);
    }
}

/// Resolves a name with the host's resolver, IPv4 only.
async fn lookup(name: &str) -> Answer {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addrs)) => {
            let v4: Vec<Ipv4Addr> = addrs
                .filter_map(|a| match a {
                    SocketAddr::V4(v4) => Some(*v4.ip()),
                    SocketAddr::V6(_) => None,
                })
                .collect();
            if v4.is_empty() {
                Answer::NoSuchName
            } else {
                Answer::Addresses(v4)
            }
        }
        Ok(Err(_)) => Answer::NoSuchName,
        Err(_) => Answer::ServerFailure,
    }
}

/// What to do with a frame from the guest, decided before smoltcp sees it.
enum Inbound {
    Pass,
    Drop,
    /// A connection attempt: held until the policy and the host connect decide it.
    TcpSyn(Tuple),
    /// UDP that is not DNS to kiln's resolver.
    Udp(SocketAddrV4),
}

fn classify(frame: &[u8]) -> Inbound {
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return Inbound::Drop;
    };
    let Some(NetSlice::Ipv4(ip)) = &packet.net else {
        // ARP goes to smoltcp; IPv6 and the rest are not carried.
        let ether_type = packet
            .link
            .as_ref()
            .and_then(|l| l.ether_payload())
            .map(|p| p.ether_type);
        return if ether_type == Some(etherparse::EtherType::ARP) {
            Inbound::Pass
        } else {
            Inbound::Drop
        };
    };
    let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) if tcp.syn() && !tcp.ack() => Inbound::TcpSyn((
            SocketAddrV4::new(src, tcp.source_port()),
            SocketAddrV4::new(dst, tcp.destination_port()),
        )),
        Some(TransportSlice::Tcp(_)) => Inbound::Pass,
        Some(TransportSlice::Udp(udp)) if dst == DNS_ADDR && udp.destination_port() == 53 => {
            Inbound::Pass
        }
        Some(TransportSlice::Udp(udp)) => {
            Inbound::Udp(SocketAddrV4::new(dst, udp.destination_port()))
        }
        // Pings reach the gateway and resolver only.
        Some(TransportSlice::Icmpv4(_)) if dst == GATEWAY_ADDR || dst == DNS_ADDR => Inbound::Pass,
        _ => Inbound::Drop,
    }
}

/// Copies bytes between one host connection and the stack's channels.
async fn relay(
    stream: TcpStream,
    mut from_guest: mpsc::Receiver<Bytes>,
    to_guest: mpsc::Sender<Bytes>,
    wake: Arc<Notify>,
) {
    let (mut read, mut write) = stream.into_split();
    let wake_up = wake.clone();
    let upstream = async move {
        while let Some(chunk) = from_guest.recv().await {
            wake_up.notify_one();
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    };
    let downstream = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = tokio::select! {
                read = read.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                // The guest side is gone (connection ended, VM stopped): do not keep an
                // idle host connection open waiting for bytes nobody will read.
                _ = to_guest.closed() => break,
            };
            if to_guest
                .send(Bytes::copy_from_slice(&buf[..n]))
                .await
                .is_err()
            {
                break;
            }
            wake.notify_one();
        }
        // Dropping the sender tells the stack the host is done: the guest gets a FIN.
        drop(to_guest);
        wake.notify_one();
    };
    tokio::join!(upstream, downstream);
}

fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ u64::from(std::process::id()).rotate_left(32)
}
