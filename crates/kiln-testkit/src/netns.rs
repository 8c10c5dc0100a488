//! Test hosts for egress tests: each a network namespace the test creates, joined to the
//! host by a veth pair on a private /30 inside 10.213.0.0/16 (host side .1, namespace .2), running
//! an HTTP server that answers with a token naming the host. Traffic stays on this machine.
//! Needs root and iproute2 (both on the CI machines). Everything is removed on drop.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NetnsHost {
    pub name: String,
    pub addr: Ipv4Addr,
    /// The host's end of the veth pair: a host address while this host exists.
    pub host_side: Ipv4Addr,
    pub port: u16,
    /// What the server answers at `/token.txt`.
    pub token: String,
    veth: String,
    server: Option<Child>,
    _root: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetnsHost {
    /// Starts a host serving HTTP on `port`.
    pub fn start(label: &str, port: u16) -> NetnsHost {
        let tag: u32 = rand_tag();
        // One of the 16384 /30 blocks of 10.213.0.0/16, so parallel tests rarely meet.
        let block = tag % 16384;
        let (third, fourth) = ((block / 64) as u8, (block % 64 * 4) as u8);
        let name = format!("kiln-t{tag:06x}");
        let veth = format!("kv{tag:06x}h");
        let peer = format!("kv{tag:06x}n");
        let host_side = Ipv4Addr::new(10, 213, third, fourth + 1);
        let addr = Ipv4Addr::new(10, 213, third, fourth + 2);
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", &format!("{host_side}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &name, "link", "set", &peer, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let root = tempfile::tempdir().unwrap();
        let token = format!("{label}-{tag:06x}");
        std::fs::write(root.path().join("token.txt"), format!("{token}\n")).unwrap();
        let server = Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-m", "http.server"])
            .arg(port.to_string())
            .args(["--bind", &addr.to_string(), "--directory"])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the test host's HTTP server");
        let host = NetnsHost {
            name,
            addr,
            host_side,
            port,
            token,
            veth,
            server: Some(server),
            _root: root,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(
            &SocketAddrV4::new(addr, port).into(),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "test host {addr}:{port} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    pub fn url(&self, host: &str) -> String {
        format!("http://{host}:{}/token.txt", self.port)
    }
}

impl Drop for NetnsHost {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
    }
}

fn rand_tag() -> u32 {
    let mut b = [0u8; 4];
    getrandom(&mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}

/// A TCP server on host loopback that must never be reached from a guest: it records every
/// connection it accepts.
pub struct Canary {
    pub port: u16,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Canary {
    pub fn start() -> Canary {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        Canary { port, hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}
