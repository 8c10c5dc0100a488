//! `kiln bench` network part: guest → host TCP throughput and connection rate through
//! kiln's egress backend, next to QEMU's built-in user-mode networking, in one run. The
//! server runs in this process on host loopback; the guest reaches it at the gateway
//! (a `host-service` connector for kiln's backend; slirp's own mapping for QEMU's).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::Instant;

use kiln_vmm::kiln_net::{Connector, EgressPolicy, HostFacts, HostService, OperatorConfig};
use kiln_vmm::{GuestAssets, MachineSpec, NetworkAttachment, Vm};

/// Bytes the throughput test downloads.
const BULK_BYTES: usize = 32 << 20;
/// Connections the rate test opens, one after another.
const CONNECTIONS: usize = 40;

/// Serves `GET /bulk` (BULK_BYTES) and anything else (2 bytes), HTTP/1.0, one thread per
/// connection. Returns its port.
fn serve() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).unwrap_or(0);
                let bulk = request[..n].starts_with(b"GET /bulk");
                let len = if bulk { BULK_BYTES } else { 2 };
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                let chunk = vec![b'k'; 64 << 10];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if stream.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    Ok(port)
}

struct Figures {
    mib_per_s: f64,
    conns_per_s: f64,
}

async fn measure_one(
    name: &str,
    network: NetworkAttachment,
    port: u16,
    assets: &GuestAssets,
    machine: &MachineSpec,
    scratch: &Path,
) -> anyhow::Result<Figures> {
    let mut machine = machine.clone();
    machine.network = true;
    let mut cfg = crate::bench::cold_boot_config(
        scratch,
        &format!("net-{name}"),
        machine,
        assets,
        (
            assets.base_disk("busybox")?,
            kiln_vmm::disk::BackingFormat::Raw,
        ),
    );
    cfg.network = network;
    // Both backends unjailed: QEMU's user networking reaches the host only from the host's
    // network namespace, and this compares backends, not jails.
    cfg.confinement = kiln_vmm::Confinement::Unjailed;
    let vm = Vm::boot(cfg).await?;
    let url = format!("http://10.0.2.2:{port}");
    // Warm up (ARP, first connection), then time inside one exec each.
    vm.agent()
        .sh(&format!("wget -q -O /dev/null {url}/small"))
        .await?;
    let started = Instant::now();
    let bulk = vm
        .agent()
        .sh(&format!("wget -q -O - {url}/bulk | wc -c"))
        .await?;
    let bulk_time = started.elapsed();
    let got: usize = bulk.stdout_text().trim().parse().unwrap_or(0);
    anyhow::ensure!(
        got == BULK_BYTES,
        "{name}: downloaded {got} of {BULK_BYTES} bytes"
    );
    let started = Instant::now();
    let loop_script = format!(
        "i=0; while [ $i -lt {CONNECTIONS} ]; do wget -q -O /dev/null {url}/small || exit 1; i=$((i+1)); done"
    );
    let rate = vm.agent().sh(&loop_script).await?;
    let rate_time = started.elapsed();
    anyhow::ensure!(rate.status.success(), "{name}: connection loop failed");
    vm.destroy().await?;
    Ok(Figures {
        mib_per_s: (BULK_BYTES as f64 / (1 << 20) as f64) / bulk_time.as_secs_f64(),
        conns_per_s: CONNECTIONS as f64 / rate_time.as_secs_f64(),
    })
}

pub async fn measure(
    assets: &GuestAssets,
    machine: &MachineSpec,
    scratch: &Path,
    report: &mut crate::bench_report::Report,
) -> anyhow::Result<()> {
    let port = serve()?;
    let operator = OperatorConfig {
        host_services: vec![HostService {
            name: "bench".into(),
            target: format!("127.0.0.1:{port}").parse()?,
        }],
        ..Default::default()
    };
    let connectors = [Connector::HostService {
        name: "bench".into(),
    }];
    let policy = EgressPolicy::compile(&connectors, &operator, HostFacts::read())?;
    let kiln = measure_one(
        "kiln",
        NetworkAttachment::egress(policy),
        port,
        assets,
        machine,
        scratch,
    )
    .await?;
    let qemu = measure_one(
        "slirp",
        NetworkAttachment::QemuUserUnfiltered,
        port,
        assets,
        machine,
        scratch,
    )
    .await?;
    report.section("network, guest → host service (guest CPU-bound under TCG):");
    let mib = BULK_BYTES >> 20;
    let pairs = [
        (
            format!("throughput, {mib} MiB"),
            "MiB/s",
            "throughput",
            kiln.mib_per_s,
            qemu.mib_per_s,
        ),
        (
            format!("{CONNECTIONS} sequential requests"),
            "conn/s",
            "connection rate",
            kiln.conns_per_s,
            qemu.conns_per_s,
        ),
    ];
    for (what, unit, ratio, ours, theirs) in pairs {
        let k = report.samples(&format!("{what}, kiln backend"), unit, &[ours]);
        let q = report.samples(&format!("{what}, QEMU user-net"), unit, &[theirs]);
        report.ratio(&format!("{ratio} kiln/QEMU"), &k, &q);
    }
    Ok(())
}
