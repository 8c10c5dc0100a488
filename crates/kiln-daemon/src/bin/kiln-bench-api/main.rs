//! `kiln-bench-api`: control-plane benchmark, measured side by side in one run:
//! RunMicrovm → RUNNING (with /run done) vs a cold boot of the same image's disk,
//! GetMicrovm throughput over one keep-alive connection, and the same small GET through the
//! ingress and straight over the agent channel, one at a time and [`CONNECTIONS`] at once
//! (requests per second, p50/p99, kilnd's CPU per proxied request). Prints figures; asserts
//! nothing.

// A binary's output is its interface.
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_types::VmId;
use kiln_vmm::{BootConfig, GuestAssets, MachineSpec, Template, Vm};
use serde_json::{json, Value};

/// `--json`: figures as one JSON document on stdout, the text lines on stderr.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Every figure measured, with its samples, for `--json` (`kiln bench --part api` reads it).
static FIGURES: std::sync::Mutex<Vec<Value>> = std::sync::Mutex::new(Vec::new());

/// A text line: stdout, or stderr under `--json`.
macro_rules! say {
    ($($t:tt)*) => {
        if $crate::JSON.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($t)*)
        } else {
            println!($($t)*)
        }
    };
}

mod seed;

/// `--seed-image DIR`: the seed's demo image to measure too (see [`seed`]).
static SEED_IMAGE: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

fn figure(name: &str, unit: &str, samples: Vec<f64>) {
    FIGURES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(json!({"name": name, "unit": unit, "samples": samples}));
}

fn ms_of(v: &[Duration]) -> Vec<f64> {
    v.iter().map(|d| d.as_secs_f64() * 1000.0).collect()
}

struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    key: String,
}

impl Client {
    fn connect(addr: &str, key: &str) -> anyhow::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            key: key.to_string(),
        })
    }

    fn call(
        &mut self,
        method: &str,
        path: &str,
        ctype: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let extra = format!("Authorization: Bearer {}\r\n", self.key);
        self.call_with("kiln", &extra, method, path, ctype, body)
    }

    fn call_with(
        &mut self,
        host: &str,
        extra: &str,
        method: &str,
        path: &str,
        ctype: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        write!(
            self.writer,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        self.writer.write_all(body)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            anyhow::bail!("{method} {path}: the server closed the connection without an answer");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .with_context(|| format!("{method} {path}: no status line in {line:?}"))?
            .parse()?;
        let (mut len, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        if !chunked {
            let mut out = vec![0u8; len];
            self.reader.read_exact(&mut out)?;
            return Ok((status, out));
        }
        // A chunked body: read every chunk, so the next response starts where it should.
        let mut out = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .context("chunk size")?;
            let mut chunk = vec![0u8; size + 2];
            self.reader.read_exact(&mut chunk)?;
            if size == 0 {
                return Ok((status, out));
            }
            out.extend_from_slice(&chunk[..size]);
        }
    }

    fn json(&mut self, method: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let (status, out) = self.call(method, path, "application/json", &bytes)?;
        serde_json::from_slice(&out).with_context(|| {
            format!(
                "{method} {path} answered {status}: {}",
                String::from_utf8_lossy(&out)
            )
        })
    }
}

/// Connections at once in the concurrent runs, and requests each makes.
const CONNECTIONS: usize = 16;
/// Rounds of each RunMicrovm and cold-boot measurement (`--rounds`).
static ROUNDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(5);

fn rounds() -> usize {
    ROUNDS.load(std::sync::atomic::Ordering::Relaxed)
}
const REQUESTS_EACH: usize = 40;

/// CPU time of this process (`RUSAGE_SELF`) or of the calling thread (`RUSAGE_THREAD`).
fn cpu(who: nix::sys::resource::UsageWho) -> Duration {
    let Ok(u) = nix::sys::resource::getrusage(who) else {
        return Duration::ZERO;
    };
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

/// `CONNECTIONS` client threads at once through the ingress, a new connection per request
/// (the guest app closes them): latencies, wall-clock requests per second, and kilnd's CPU
/// per request (the process's CPU less the client threads' own).
fn proxied_at_once(
    ingress: &str,
    host: &str,
    extra: &str,
) -> anyhow::Result<(Vec<Duration>, f64, Duration)> {
    use nix::sys::resource::UsageWho;
    let (cpu0, t0) = (cpu(UsageWho::RUSAGE_SELF), Instant::now());
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (ingress, host, extra) = (ingress.to_string(), host.to_string(), extra.to_string());
            std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, Duration)> {
                let samples = latencies(REQUESTS_EACH, || {
                    let mut p = Client::connect(&ingress, "")?;
                    let (status, body) =
                        p.call_with(&host, &extra, "GET", "/index.html", "text/plain", b"")?;
                    anyhow::ensure!(
                        status == 200 && body == b"hello\n",
                        "proxy answered {status}"
                    );
                    Ok(())
                })?;
                Ok((samples, cpu(UsageWho::RUSAGE_THREAD)))
            })
        })
        .collect();
    let (mut all, mut clients) = (Vec::new(), Duration::ZERO);
    for t in threads {
        let (samples, used) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        all.extend(samples);
        clients += used;
    }
    let wall = t0.elapsed();
    let kilnd = cpu(UsageWho::RUSAGE_SELF)
        .saturating_sub(cpu0)
        .saturating_sub(clients);
    let n = all.len() as u32;
    Ok((all, f64::from(n) / wall.as_secs_f64(), kilnd / n.max(1)))
}

/// `CONNECTIONS` requests at once straight over the agent channel: latencies and wall-clock
/// requests per second.
async fn direct_at_once(agent: &kiln_vmm::AgentClient) -> anyhow::Result<(Vec<Duration>, f64)> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..REQUESTS_EACH {
                    let t = Instant::now();
                    direct_get(&agent).await?;
                    out.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(out)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let rps = all.len() as f64 / t0.elapsed().as_secs_f64();
    Ok((all, rps))
}

/// One GET of the guest app over a fresh agent-channel connection.
async fn direct_get(agent: &kiln_vmm::AgentClient) -> anyhow::Result<()> {
    let stream = agent.connect_port(8080).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/index.html")
        .header("host", "x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await?
        .to_bytes();
    anyhow::ensure!(body.as_ref() == b"hello\n");
    Ok(())
}

/// The median of a run's samples and its p99, in ms.
fn p50_p99(samples: &[Duration]) -> (f64, f64) {
    let mut v = samples.to_vec();
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0;
    (pct(0.5), pct(0.99))
}

static AT_ONCE: std::sync::Mutex<Option<(f64, f64, Duration)>> = std::sync::Mutex::new(None);
static AT_ONCE_SAMPLES: std::sync::Mutex<Vec<Duration>> = std::sync::Mutex::new(Vec::new());

static PROXIED: std::sync::Mutex<Vec<Duration>> = std::sync::Mutex::new(Vec::new());

fn proxied_global() -> Vec<Duration> {
    PROXIED.lock().map(|v| v.clone()).unwrap_or_default()
}

fn latencies(n: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed());
    }
    Ok(out)
}

fn report(what: &str, samples: &[Duration]) {
    let mut v = samples.to_vec();
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0;
    let rps = v.len() as f64 / v.iter().sum::<Duration>().as_secs_f64();
    if what.contains("ingress") {
        *PROXIED.lock().unwrap_or_else(|p| p.into_inner()) = samples.to_vec();
    }
    say!(
        "GET {what:<36} {rps:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
        pct(0.5),
        pct(0.99)
    );
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, data) in files {
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        let mode = if path.ends_with(".sh") {
            "0000755\0"
        } else {
            "0000644\0"
        };
        h[100..108].copy_from_slice(mode.as_bytes());
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

const HOOK_SH: &str = "#!/bin/sh\nread -r m p v\nwhile IFS= read -r l; do l=$(printf '%s' \"$l\" | tr -d '\\r'); [ -z \"$l\" ] && break; done\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok'\n";
const START_SH: &str = "#!/bin/sh\nmkdir -p /www && echo hello > /www/index.html\nhttpd -p 127.0.0.1:8080 -h /www\nexec nc -ll -p 9000 -e /srv/hook.sh\n";

fn main() -> anyhow::Result<()> {
    // kilnd's own log on stderr (warnings by default; RUST_LOG says more).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => JSON.store(true, std::sync::atomic::Ordering::Relaxed),
            "--rounds" => {
                let n: usize = args.next().context("--rounds takes a number")?.parse()?;
                anyhow::ensure!(n >= 1, "--rounds must be at least 1");
                ROUNDS.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            "--seed-image" => {
                let dir = args.next().context("--seed-image takes a directory")?;
                *SEED_IMAGE.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.into());
            }
            other => {
                anyhow::bail!(
                    "unknown argument {other}: kiln-bench-api [--json] [--rounds N] \
                     [--seed-image DIR]"
                )
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let home = tempfile::Builder::new()
        .prefix("kiln-bench-api-")
        .tempdir()?;
    let cfg = kiln_daemon::Config {
        database: kiln_daemon::config::Database::Sqlite,
        node_name: "bench".into(),
        advertise: None,
        node_lease: Duration::from_secs(15),
        blob_gc_interval: Duration::from_secs(3600),
        blob_gc_grace: Duration::from_secs(3600),
        object_store: None,
        capacity: Default::default(),
        home: home.path().to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        min_idle_seconds: 60,
        tick: Duration::from_secs(1),
        hook_timeout: Duration::from_secs(10),
        on_shutdown: kiln_daemon::ShutdownPolicy::Terminate,
        ingress_domain: "localhost".into(),
        ingress_port: 8443,
        // The bench names microVMs by Host, as a resolver that maps *.localhost would.
        endpoint_style: kiln_daemon::config::EndpointStyle::Host,
        ingress_listen: "127.0.0.1:0".parse()?,
        ingress_header_timeout: Duration::from_secs(10),
        ingress_tls_cert: None,
        ingress_tls_key: None,
        egress: Default::default(),
        no_jail: false,
        jail_partition: kiln_jail::Partition::default(),
        cpu_credit_max_seconds: 300.0,
        qemu_memory_overhead_mib: kiln_vmm::confine::QEMU_OVERHEAD_MIB,
        jail_memory_mib: None,
        max_microvms: kiln_daemon::config::DEFAULT_MAX_MICROVMS,
        max_concurrent_builds: kiln_daemon::config::DEFAULT_MAX_CONCURRENT_BUILDS,
        max_artifact_bytes: kiln_daemon::config::DEFAULT_MAX_ARTIFACT_MIB << 20,
        min_free_disk_bytes: kiln_daemon::config::DEFAULT_MIN_FREE_DISK_MIB << 20,
        max_disk_bytes: None,
        prestart_per_image: kiln_daemon::config::DEFAULT_PRESTART_PER_IMAGE,
        allow_private_webhook_targets: false,
        api_tls_cert: None,
        api_tls_key: None,
        cluster_ca: None,
    };
    // The in-process kilnd: were it to stop, the measurements below would only see a
    // closed connection, so its end is reported with theirs.
    let daemon = tokio::spawn(kiln_daemon::serve(cfg));
    let addr_file = home.path().join("kilnd.addr");
    while !addr_file.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = std::fs::read_to_string(&addr_file)?;
    let key = std::fs::read_to_string(home.path().join("api-key"))?
        .trim()
        .to_string();
    let images = home.path().join("images");
    let ingress = std::fs::read_to_string(home.path().join("kilnd.ingress"))?;
    let (a, i, k) = (addr.clone(), ingress.clone(), key.clone());
    let result = tokio::task::spawn_blocking(move || measure(&a, &i, &k, &images)).await?;
    if result.is_err() && daemon.is_finished() {
        let ended = daemon.await;
        anyhow::bail!("the in-process kilnd stopped: {ended:?} (then: {result:?})");
    }
    let (template_dir, run_ms) = result?;

    // Cold boot of the same image's root disk, for the ratio.
    let template = Template::open(&template_dir)?;
    let app = kiln_proto::ProcessSpec {
        argv: vec!["/srv/start.sh".into()],
        ..Default::default()
    };
    let (cold_agent, cold_200) = cold_rounds(
        home.path(),
        "bench-cold",
        &template,
        app,
        (8080, "/index.html"),
        Duration::from_secs(60),
    )
    .await?;
    figure("cold boot -> agent ready", "ms", cold_agent);
    figure(
        "cold boot -> the app's first HTTP 200",
        "ms",
        cold_200.clone(),
    );
    let cold = median(&cold_200);
    // The same GET straight over the agent channel (what the proxy does, minus its own work),
    // and to a host process on loopback.
    let clone = template
        .launch(kiln_vmm::snapshot::LaunchConfig {
            id: VmId::new("bench-direct")?,
            dir: home.path().join("direct"),
            machine: None,
            assets: GuestAssets::locate()?,
            timeout: Duration::from_secs(60),
            die_with_parent: true,
            network: kiln_vmm::NetworkAttachment::closed(),
            confinement: kiln_vmm::Confinement::default(),
        })
        .await?;
    let agent = clone.agent().clone();
    let mut direct = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        direct_get(&agent).await?;
        direct.push(t.elapsed());
    }
    report("straight over the agent channel", &direct);
    let (direct16, direct16_rps) = direct_at_once(&agent).await?;
    clone.destroy().await?;
    let at_once = *AT_ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((proxied16_p99, proxied16_rps, kilnd_cpu)) = at_once {
        let (direct16_p50, direct16_p99) = p50_p99(&direct16);
        let (proxied16_p50, _) =
            p50_p99(&AT_ONCE_SAMPLES.lock().unwrap_or_else(|p| p.into_inner()));
        figure(
            &format!("GET without the proxy (agent channel), {CONNECTIONS} at once: latency"),
            "ms",
            ms_of(&direct16),
        );
        figure(
            &format!("GET without the proxy (agent channel), {CONNECTIONS} at once: p99"),
            "ms",
            vec![direct16_p99],
        );
        figure(
            &format!("GET without the proxy (agent channel), {CONNECTIONS} at once: throughput"),
            "req/s",
            vec![direct16_rps],
        );
        figure(
            "latency the proxy adds at 16 connections: p50",
            "ms",
            vec![proxied16_p50 - direct16_p50],
        );
        figure(
            "latency the proxy adds at 16 connections: p99",
            "ms",
            vec![proxied16_p99 - direct16_p99],
        );
        figure(
            "kilnd CPU per proxied request",
            "ms",
            vec![kilnd_cpu.as_secs_f64() * 1000.0],
        );
        say!(
            "GET over the agent channel, {CONNECTIONS} at once  {direct16_rps:>8.0} req/s  p99 {direct16_p99:>7.2} ms"
        );
        say!(
            "  proxy / agent-channel at {CONNECTIONS} at once      {:>9.2}x throughput, {:>6.2}x p99",
            proxied16_rps / direct16_rps,
            proxied16_p99 / direct16_p99
        );
        say!(
            "kilnd CPU per proxied request             {:>9.3} ms",
            kilnd_cpu.as_secs_f64() * 1000.0
        );
    }
    let host_server = std::net::TcpListener::bind("127.0.0.1:0")?;
    let host_addr = host_server.local_addr()?.to_string();
    std::thread::spawn(move || {
        for s in host_server.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(read_half) = s.try_clone() else {
                    return;
                };
                let mut r = BufReader::new(read_half);
                let mut w = s;
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n");
                    }
                }
            });
        }
    });
    let loopback = latencies(300, || {
        let mut hc = Client::connect(&host_addr, "")?;
        let (status, _) = hc.call_with("x", "", "GET", "/index.html", "text/plain", b"")?;
        anyhow::ensure!(status == 200);
        Ok(())
    })?;
    report("direct loopback to a host process", &loopback);
    let proxied = proxied_global();
    let rps = |v: &[Duration]| v.len() as f64 / v.iter().sum::<Duration>().as_secs_f64();
    say!(
        "  proxy / agent-channel throughput          {:>9.2}x",
        rps(&proxied) / rps(&direct)
    );
    say!(
        "  proxy / host-loopback throughput          {:>9.4}x",
        rps(&proxied) / rps(&loopback)
    );
    say!("cold boot -> the app's first HTTP 200      {cold:>9.1} ms");
    say!(
        "  ratio cold boot / RunMicrovm             {:>9.1}x",
        cold / run_ms
    );
    let seed_image = SEED_IMAGE.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(dir) = seed_image {
        seed::measure(addr, ingress, key, home.path(), &dir).await?;
    }
    if JSON.load(std::sync::atomic::Ordering::Relaxed) {
        let figures = std::mem::take(&mut *FIGURES.lock().unwrap_or_else(|p| p.into_inner()));
        println!("{}", serde_json::to_string(&json!({ "figures": figures }))?);
    }
    Ok(())
}

/// Cold boots of a template's root disk: each until the agent answers, then with the image's
/// app started the way its CMD is, until `GET probe` answers 200 over the agent channel. The
/// two times, in ms, per round.
async fn cold_rounds(
    home: &std::path::Path,
    tag: &str,
    template: &Template,
    app: kiln_proto::ProcessSpec,
    probe: (u16, &str),
    wait: Duration,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let assets = GuestAssets::locate()?;
    let machine: MachineSpec = template.manifest().machine.clone();
    let (mut agent_ready, mut first_200) = (Vec::new(), Vec::new());
    for n in 0..rounds() {
        let t = Instant::now();
        let vm = Vm::boot(BootConfig {
            id: VmId::new(format!("{tag}-{n}"))?,
            dir: home.join(format!("{tag}-{n}")),
            machine: machine.clone(),
            assets: assets.clone(),
            base_disk: template.dir().join("disk.qcow2"),
            base_format: kiln_vmm::disk::BackingFormat::Qcow2,
            top_disk: None,
            disk_size_mib: None,
            timeout: Duration::from_secs(120),
            die_with_parent: true,
            network: kiln_vmm::NetworkAttachment::closed(),
            confinement: kiln_vmm::Confinement::default(),
        })
        .await?;
        agent_ready.push(t.elapsed().as_secs_f64() * 1000.0);
        vm.agent().start_app(app.clone()).await?;
        let deadline = Instant::now() + wait;
        loop {
            let answer = vm
                .agent()
                .http(kiln_image::build::hook_get(probe.0, probe.1))
                .await;
            if matches!(answer, Ok(ref r) if r.status == 200) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the cold-booted app never answered GET {} on port {} with 200 in {wait:?} \
                 (last: {answer:?})",
                probe.1,
                probe.0
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        first_200.push(t.elapsed().as_secs_f64() * 1000.0);
        vm.destroy().await?;
    }
    Ok((agent_ready, first_200))
}

/// Uploads `tar` as a build context, bakes image `name` from it and waits until it is
/// SUCCESSFUL (printing how long the bake has taken every 30 s); its image id.
fn bake(c: &mut Client, name: &str, tar: &[u8], timeout: Duration) -> anyhow::Result<String> {
    let (status, art) = c.call("POST", "/v1/artifacts", "application/x-tar", tar)?;
    anyhow::ensure!(
        status == 200,
        "artifact upload answered {status}: {}",
        String::from_utf8_lossy(&art)
    );
    let art: Value = serde_json::from_slice(&art)?;
    let img = c.json(
        "POST",
        "/v1/images",
        json!({"name": name, "codeArtifact": {"artifactId": art["artifactId"]}}),
    )?;
    let image = img["imageIdentifier"]
        .as_str()
        .with_context(|| format!("CreateMicrovmImage answered no image id: {img}"))?
        .to_string();
    let (started, mut told) = (Instant::now(), Instant::now());
    loop {
        let v = c.json("GET", &format!("/v1/images/{image}"), json!(null))?;
        match v["status"].as_str() {
            Some("SUCCESSFUL") => return Ok(image),
            Some("FAILED") => anyhow::bail!("image {name} failed to bake: {v}"),
            _ => {}
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "image {name} was not baked in {timeout:?}: {v}"
        );
        if told.elapsed() > Duration::from_secs(30) {
            eprintln!("baking {name}: {} s so far", started.elapsed().as_secs());
            told = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// RunMicrovm → RUNNING and RunMicrovm → the first `GET path` through the ingress that
/// answers 200 with a body `check` accepts, per round, in ms; the last microVM is left
/// running (its id returned), the others are terminated.
struct Rounds {
    running: Vec<f64>,
    first_200: Vec<f64>,
    last: String,
}

fn run_rounds(
    c: &mut Client,
    ingress: &str,
    image: &str,
    path: &str,
    check: fn(&[u8]) -> bool,
) -> anyhow::Result<Rounds> {
    let (mut running, mut first_200) = (Vec::new(), Vec::new());
    let mut last = String::new();
    for _ in 0..rounds() {
        let t = Instant::now();
        let run = c.json(
            "POST",
            "/v1/microvms",
            json!({"imageIdentifier": image, "runHookPayload": "{}"}),
        )?;
        let id = run["microvmId"]
            .as_str()
            .with_context(|| format!("RunMicrovm answered no id: {run}"))?
            .to_string();
        let v = c.json(
            "GET",
            &format!("/v1/microvms/{id}?waitFor=RUNNING&timeoutSeconds=120"),
            json!(null),
        )?;
        anyhow::ensure!(v["state"] == "RUNNING", "bench microVM is not RUNNING: {v}");
        running.push(t.elapsed().as_secs_f64() * 1000.0);
        // The first request a user of the microVM gets through: a token, then the ingress.
        let tok = c.json(
            "POST",
            "/v1/auth-tokens",
            json!({"microvmIdentifier": id, "expirationInMinutes": 10}),
        )?;
        let extra = format!(
            "X-Kiln-Auth: {}\r\n",
            tok["authToken"]["X-Kiln-Auth"].as_str().context("token")?
        );
        let mut p = Client::connect(ingress, "")?;
        let (status, body) = p.call_with(
            &format!("{id}.localhost"),
            &extra,
            "GET",
            path,
            "text/plain",
            b"",
        )?;
        anyhow::ensure!(
            status == 200 && check(&body),
            "the first proxied GET {path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        first_200.push(t.elapsed().as_secs_f64() * 1000.0);
        if !last.is_empty() {
            c.json("POST", &format!("/v1/microvms/{last}/terminate"), json!({}))?;
        }
        last = id;
    }
    Ok(Rounds {
        running,
        first_200,
        last,
    })
}

/// The median of samples (at least one).
fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(
    addr: &str,
    ingress: &str,
    key: &str,
    images: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, f64)> {
    let mut c = Client::connect(addr, key)?;
    let tar = tar_of(&[
        (
            "Dockerfile",
            b"FROM busybox\nCOPY hook.sh start.sh /srv/\nCMD [\"/srv/start.sh\"]\n",
        ),
        ("hook.sh", HOOK_SH.as_bytes()),
        ("start.sh", START_SH.as_bytes()),
    ]);
    let image = bake(&mut c, "bench", &tar, Duration::from_secs(600))?;
    let Rounds {
        running,
        first_200,
        last,
    } = run_rounds(&mut c, ingress, "bench", "/index.html", |b| b == b"hello\n")?;
    figure("RunMicrovm -> RUNNING (/run done)", "ms", running);
    figure(
        "RunMicrovm -> first proxied HTTP 200",
        "ms",
        first_200.clone(),
    );
    let run_ms = median(&first_200);
    say!(
        "RunMicrovm -> first proxied HTTP 200      {run_ms:>9.1} ms (median of {})",
        first_200.len()
    );
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        let (status, _) = c.call(
            "GET",
            &format!("/v1/microvms/{last}"),
            "application/json",
            b"",
        )?;
        anyhow::ensure!(status == 200, "GetMicrovm answered {status}");
    }
    let rps = n as f64 / t.elapsed().as_secs_f64();
    say!("GetMicrovm throughput (1 connection)      {rps:>9.0} requests/s");
    // Ingress: the same small GET through the proxy (keep-alive to the proxy).
    let tok = c.json(
        "POST",
        "/v1/auth-tokens",
        json!({"microvmIdentifier": last, "expirationInMinutes": 10}),
    )?;
    let tok = tok["authToken"]["X-Kiln-Auth"]
        .as_str()
        .context("token")?
        .to_string();
    let host = format!("{last}.localhost");
    let extra = format!("X-Kiln-Auth: {tok}\r\n");
    // A new connection per request for all three paths (the guest app closes connections).
    let proxied = latencies(300, || {
        let mut p = Client::connect(ingress, "")?;
        let (status, body) = p.call_with(&host, &extra, "GET", "/index.html", "text/plain", b"")?;
        anyhow::ensure!(
            status == 200 && body == b"hello\n",
            "proxy answered {status}"
        );
        Ok(())
    })?;
    report("through the ingress proxy", &proxied);
    let (proxied16, proxied16_rps, kilnd_cpu) = proxied_at_once(ingress, &host, &extra)?;
    let (p50, p99) = p50_p99(&proxied16);
    figure(
        &format!("GET through the ingress, {CONNECTIONS} at once: latency"),
        "ms",
        ms_of(&proxied16),
    );
    figure(
        &format!("GET through the ingress, {CONNECTIONS} at once: p99"),
        "ms",
        vec![p99],
    );
    figure(
        &format!("GET through the ingress, {CONNECTIONS} at once: throughput"),
        "req/s",
        vec![proxied16_rps],
    );
    say!(
        "GET through the ingress, {CONNECTIONS} at once     {proxied16_rps:>8.0} req/s  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms"
    );
    *AT_ONCE.lock().unwrap_or_else(|p| p.into_inner()) = Some((p99, proxied16_rps, kilnd_cpu));
    *AT_ONCE_SAMPLES.lock().unwrap_or_else(|p| p.into_inner()) = proxied16;
    c.json("POST", &format!("/v1/microvms/{last}/terminate"), json!({}))?;
    let tpl = images.join("bench").join(&image).join("template");
    Ok((tpl, run_ms))
}
