//! `kilnd`: kiln's daemon.

// A binary's output is its interface.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kiln_daemon::{Config, ShutdownPolicy};

#[derive(Parser)]
#[command(
    name = "kilnd",
    version,
    about = "kiln's control plane: REST API, microVM lifecycle, idle policy"
)]
struct Args {
    /// State directory (database, API key, images, microVMs).
    #[arg(long, env = "KILN_HOME", default_value = "/var/lib/kiln")]
    home: PathBuf,
    /// Address of the REST API. Loopback only unless --allow-remote.
    /// Keep state in PostgreSQL instead of KILN_HOME/kiln.db: a file (mode 0600) holding
    /// its URL (`postgresql://user:password@host:port/db` or `key=value` pairs). Or put the
    /// URL in KILN_DATABASE_URL. Never on the command line: every local user can read it.
    #[arg(long, env = "KILN_DATABASE_URL_FILE")]
    database_url_file: Option<PathBuf>,
    /// Speak TLS to PostgreSQL and trust the CA certificates (PEM) in this file for its
    /// certificate, which must name the URL's host. Without it, `sslmode=require` in the URL
    /// verifies against the system's CAs.
    #[arg(long, env = "KILN_DATABASE_CA_FILE")]
    database_ca_file: Option<PathBuf>,
    /// Keep image templates in S3-compatible object storage, so that every node of the
    /// cluster launches them: `s3://BUCKET[/PREFIX]?endpoint=http://HOST:PORT&region=R`.
    /// Needs --database-url-file (the nodes share the database).
    #[arg(long, env = "KILN_OBJECT_STORE")]
    object_store: Option<String>,
    /// The object store's access key: a file (mode 0600) with the lines
    /// `AWS_ACCESS_KEY_ID=…` and `AWS_SECRET_ACCESS_KEY=…`. Default: those two variables
    /// of the environment (removed from it once read, so no child inherits them).
    #[arg(long, requires = "object_store")]
    object_store_credentials_file: Option<PathBuf>,
    /// This kilnd's name among the nodes sharing a database (letters, digits, `.`, `-`,
    /// `_`; at most 63). Default: the host name.
    #[arg(long, env = "KILN_NODE_NAME", value_parser = parse_node_name)]
    node_name: Option<String>,
    /// Where the other nodes reach this node's API (HOST:PORT). Default: --listen as bound.
    #[arg(long)]
    advertise: Option<String>,
    /// A node whose last heartbeat is older than this is unreachable: its microVMs are
    /// served again only when it is back.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=3600))]
    node_lease_seconds: u64,
    /// How often the cluster collects blobs that no image or snapshot names any more from
    /// object storage (one node per interval).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    blob_gc_interval_seconds: u64,
    /// How old a blob no list names, and no upload claimed, must be before it is removed.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    blob_gc_grace_seconds: u64,
    /// Memory this node offers to microVMs, in MiB. Default: the machine's.
    #[arg(long)]
    capacity_memory_mib: Option<u64>,
    /// vCPUs this node offers to microVMs. Default: the machine's CPUs.
    #[arg(long)]
    capacity_vcpus: Option<u32>,
    /// Disk this node offers to microVMs, in MiB. Default: KILN_HOME's file system.
    #[arg(long)]
    capacity_disk_mib: Option<u64>,
    #[arg(long, env = "KILN_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Allow a non-loopback --listen address (the API then needs --api-tls-cert and
    /// --api-tls-key, or --insecure-http).
    #[arg(long)]
    allow_remote: bool,
    /// PEM certificate chain for HTTPS on the REST API (with --api-tls-key).
    #[arg(long, requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS on the REST API.
    #[arg(long, requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// In a cluster whose nodes serve their API over TLS: call the other nodes over HTTPS,
    /// trusting the CA certificates (PEM) in this file for the host of each node's
    /// --advertise address. Needs --api-tls-cert (the others call this node the same way).
    #[arg(long, env = "KILN_CLUSTER_CA_FILE", requires = "api_tls_cert")]
    cluster_ca_file: Option<PathBuf>,
    /// Serve a non-loopback API over plain HTTP: the API key then crosses the network in
    /// clear text. Only on a network you trust.
    #[arg(long, conflicts_with = "api_tls_cert")]
    insecure_http: bool,
    /// Run every QEMU unjailed, as this process, in the host's namespaces. Development and
    /// benchmarks only: a guest that escapes QEMU then owns the host.
    #[arg(long)]
    no_jail: bool,
    /// The uids this kilnd's jails take, FIRST-LAST inside kiln's range (default: all of
    /// it). Nodes sharing a machine each take their own.
    #[arg(long, value_name = "FIRST-LAST", conflicts_with = "no_jail")]
    jail_uids: Option<String>,
    /// The cgroup, under kilnd's own, that holds its jails' cgroups (default: kiln).
    #[arg(long, value_name = "NAME", conflicts_with = "no_jail")]
    jail_cgroup: Option<String>,
    /// CPU-seconds above its baseline a microVM can bank for bursts (it starts full).
    #[arg(long, default_value_t = 300.0)]
    cpu_credit_max_seconds: f64,
    /// Memory a microVM's QEMU may use beyond its guest RAM; over the sum the kernel kills
    /// it alone and the microVM is TERMINATED with "out of memory".
    #[arg(long, default_value_t = kiln_vmm::confine::QEMU_OVERHEAD_MIB)]
    qemu_memory_overhead_mib: u64,
    /// Every jail's whole memory limit instead of guest RAM plus the overhead (tests use a
    /// limit below guest RAM to see the OOM killer at work).
    #[arg(long)]
    jail_memory_mib: Option<u64>,
    /// Lowest maxIdleDurationSeconds accepted (default: the API minimum, 60).
    #[arg(long, default_value_t = kiln_daemon::config::API_MIN_IDLE_SECONDS)]
    min_idle_seconds: u64,
    /// Idle policy and metering interval, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    tick_ms: u64,
    /// Timeout of each lifecycle hook call, in seconds.
    #[arg(long, default_value_t = 10)]
    hook_timeout: u64,
    /// At most this many microVMs that are not TERMINATED (RunMicrovm answers 429 beyond).
    #[arg(long, default_value_t = kiln_daemon::config::DEFAULT_MAX_MICROVMS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    max_microvms: usize,
    /// QEMUs kept started (jailed, waiting in -incoming defer) for the next launch of each
    /// recently launched image, at most 4 images; 0 turns it off. Each holds a jail and
    /// QEMU's own memory (not the guest's RAM) while it waits.
    #[arg(long, default_value_t = kiln_daemon::config::DEFAULT_PRESTART_PER_IMAGE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=kiln_daemon::pool::MAX_PER_IMAGE as u64))]
    prestart_per_image: usize,
    /// Let webhooks target loopback, link-local and private addresses (refused by default:
    /// any API client could otherwise make kilnd send requests into its own network).
    #[arg(long)]
    allow_private_webhook_targets: bool,
    /// At most this many image builds at once (CreateMicrovmImage answers 429 beyond).
    #[arg(long, default_value_t = kiln_daemon::config::DEFAULT_MAX_CONCURRENT_BUILDS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    max_concurrent_builds: usize,
    /// Largest build context upload, in MiB (POST /v1/artifacts answers 413 beyond).
    #[arg(long, default_value_t = kiln_daemon::config::DEFAULT_MAX_ARTIFACT_MIB, value_parser = clap::value_parser!(u64).range(1..=16384))]
    max_artifact_mib: u64,
    /// Free space to keep on KILN_HOME's disk, in MiB: RunMicrovm, CreateMicrovmImage,
    /// uploads and suspends that would go below it answer 429 (what runs keeps running).
    #[arg(long, default_value_t = kiln_daemon::config::DEFAULT_MIN_FREE_DISK_MIB, value_parser = clap::value_parser!(u64).range(0..=1 << 30))]
    min_free_disk_mib: u64,
    /// At most this much on disk under KILN_HOME, in MiB (images, layers, microVMs,
    /// snapshots): new work beyond it answers 429 the same way. Default: no cap but the
    /// free-space floor.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    max_disk_mib: Option<u64>,
    /// What SIGTERM does with running microVMs: leave them running for the next kilnd
    /// (keep), suspend them to disk, or terminate them.
    #[arg(long, value_enum, default_value = "keep")]
    on_shutdown: ShutdownPolicy,
    /// Domain of microVM endpoints (<microvmId>.<domain>).
    #[arg(long, default_value = "localhost")]
    ingress_domain: String,
    /// Port shown in endpoints; defaults to the --ingress-listen port.
    #[arg(long)]
    ingress_port: Option<u16>,
    /// How endpoints name a microVM: host (`<id>.<domain>:<port>`), path
    /// (`<address>:<port>/m/<id>`), or auto: host when `*.<domain>` resolves to the ingress.
    #[arg(long, value_enum, default_value = "auto")]
    endpoint_style: kiln_daemon::config::EndpointStyle,
    /// Address of the ingress proxy (loopback unless --allow-remote).
    #[arg(long, env = "KILN_INGRESS_LISTEN", default_value = "127.0.0.1:8443")]
    ingress_listen: SocketAddr,
    /// Cut off ingress clients that do not finish their headers in this time (ms).
    #[arg(long, default_value_t = 10_000)]
    ingress_header_timeout_ms: u64,
    /// PEM certificate chain for TLS on the ingress (with --ingress-tls-key).
    #[arg(long)]
    ingress_tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the ingress.
    #[arg(long)]
    ingress_tls_key: Option<PathBuf>,
    /// A host port microVMs may ask for with a `host-service` connector, as NAME=ADDR:PORT
    /// (repeatable). The guest reaches it at 10.0.2.2:PORT. Nothing on the host is
    /// reachable otherwise.
    #[arg(long = "host-service", value_parser = kiln_vmm::kiln_net::policy::parse_host_service)]
    host_services: Vec<kiln_vmm::kiln_net::HostService>,
    /// A name kiln's guest resolver answers itself, as NAME=IPV4 (repeatable): for
    /// intranet or test hosts named in allowlists.
    #[arg(long = "egress-host", value_parser = kiln_vmm::kiln_net::policy::parse_static_host)]
    egress_hosts: Vec<(String, std::net::Ipv4Addr)>,
    /// TLS on the ingress with kilnd's own CA (made once in KILN_HOME/tls) and a
    /// certificate for *.<ingress domain> (needs a domain of two labels, e.g. kiln.localhost).
    #[arg(long, conflicts_with_all = ["ingress_tls_cert", "ingress_tls_key"])]
    ingress_tls_self_signed: bool,
}

fn operator_config(
    host_services: Vec<kiln_vmm::kiln_net::HostService>,
    egress_hosts: Vec<(String, std::net::Ipv4Addr)>,
) -> kiln_vmm::kiln_net::OperatorConfig {
    let mut static_hosts: std::collections::HashMap<String, Vec<std::net::Ipv4Addr>> =
        Default::default();
    for (name, addr) in egress_hosts {
        static_hosts.entry(name).or_default().push(addr);
    }
    kiln_vmm::kiln_net::OperatorConfig {
        host_services,
        static_hosts,
    }
}

/// The API leaves loopback only when the operator says so, and then only over TLS unless
/// they also accept plain HTTP in so many words.
fn check_api_exposure(args: &Args) -> anyhow::Result<()> {
    if args.listen.ip().is_loopback() {
        return Ok(());
    }
    if !args.allow_remote {
        anyhow::bail!(
            "--listen {} is not a loopback address: pass --allow-remote to expose the API",
            args.listen
        );
    }
    if args.api_tls_cert.is_none() && !args.insecure_http {
        anyhow::bail!(
            "--listen {} exposes the API to the network, and its key would cross it in clear \
             text: give the API a certificate (--api-tls-cert and --api-tls-key), or, on a \
             network you trust, pass --insecure-http",
            args.listen
        );
    }
    if args.insecure_http {
        tracing::warn!(
            listen = %args.listen,
            "--insecure-http: the API is served over plain HTTP off loopback; its key crosses \
             the network in clear text"
        );
    }
    Ok(())
}

fn parse_node_name(s: &str) -> Result<String, String> {
    let ok = (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(s.to_string())
    } else {
        Err("use 1 to 63 letters, digits, '.', '-' or '_'".into())
    }
}

/// The default node name: the host's, as the kernel has it.
fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name for --node-name")?;
    parse_node_name(name.trim()).map_err(|e| {
        anyhow::anyhow!(
            "the host name {:?} is no node name ({e}): pass --node-name",
            name.trim()
        )
    })
}

/// The database from `--database-url-file` or `KILN_DATABASE_URL`, else SQLite. The
/// variable is then removed, so no child (QEMU, helpers) inherits the password.
fn database(
    file: Option<&std::path::Path>,
    ca: Option<PathBuf>,
) -> anyhow::Result<kiln_daemon::config::Database> {
    use kiln_daemon::config::{Database, SecretUrl};
    let env = std::env::var("KILN_DATABASE_URL").ok();
    std::env::remove_var("KILN_DATABASE_URL");
    let (url, from) = match (file, env) {
        (Some(f), _) => (
            kiln_daemon::auth::read_secret(f).context("--database-url-file")?,
            f.display().to_string(),
        ),
        (None, Some(url)) => (url, "KILN_DATABASE_URL".to_string()),
        (None, None) if ca.is_some() => {
            anyhow::bail!("--database-ca-file is for PostgreSQL: give --database-url-file too")
        }
        (None, None) => return Ok(Database::Sqlite),
    };
    if url.is_empty() {
        anyhow::bail!(
            "{from} holds no database URL: write postgresql://user:password@host:port/db into it"
        );
    }
    Ok(Database::Postgres {
        url: SecretUrl(url),
        from,
        ca,
    })
}

/// `--object-store` and its credentials (from the file, else the environment, whose
/// variables are then removed so no child inherits the secret).
fn object_store(
    url: Option<String>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<kiln_daemon::config::ObjectStoreConfig>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let from_env = env("AWS_ACCESS_KEY_ID").zip(env("AWS_SECRET_ACCESS_KEY"));
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        std::env::remove_var(k);
    }
    let Some(url) = url else { return Ok(None) };
    let pair = match file {
        Some(f) => {
            let text =
                kiln_daemon::auth::read_secret(f).context("--object-store-credentials-file")?;
            let value = |k: &str| {
                text.lines()
                    .filter_map(|l| l.trim().split_once('='))
                    .find(|(n, _)| n.trim() == k)
                    .map(|(_, v)| v.trim().to_string())
            };
            match value("AWS_ACCESS_KEY_ID").zip(value("AWS_SECRET_ACCESS_KEY")) {
                Some(p) => Some(p),
                None => anyhow::bail!(
                    "{} needs the lines AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=…",
                    f.display()
                ),
            }
        }
        None => from_env,
    };
    Ok(Some(kiln_daemon::config::ObjectStoreConfig {
        url,
        credentials: pair.map(|(key_id, secret)| kiln_objects::Credentials { key_id, secret }),
    }))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.ingress_listen.ip().is_loopback() && !args.allow_remote {
        anyhow::bail!(
            "--ingress-listen {} is not a loopback address: pass --allow-remote to expose it",
            args.ingress_listen
        );
    }
    check_api_exposure(&args)?;
    let (ingress_tls_cert, ingress_tls_key) = if args.ingress_tls_self_signed {
        let (cert, key) = kiln_daemon::tls::ensure(
            &args.home,
            &args.ingress_domain,
            &[kiln_daemon::endpoint::path_host(args.ingress_listen)],
        )?;
        (Some(cert), Some(key))
    } else {
        (args.ingress_tls_cert, args.ingress_tls_key)
    };
    let database = database(args.database_url_file.as_deref(), args.database_ca_file)?;
    let object_store = object_store(
        args.object_store,
        args.object_store_credentials_file.as_deref(),
    )?;
    if object_store.is_some() && database == kiln_daemon::config::Database::Sqlite {
        anyhow::bail!(
            "--object-store is for a cluster: the nodes share their state in PostgreSQL, so \
             pass --database-url-file too"
        );
    }
    let jail_partition =
        kiln_jail::Partition::new(args.jail_uids.as_deref(), args.jail_cgroup.as_deref())?;
    let node_name = match args.node_name {
        Some(n) => n,
        None => host_name()?,
    };
    let cfg = Config {
        database,
        object_store,
        node_name,
        advertise: args.advertise,
        node_lease: Duration::from_secs(args.node_lease_seconds),
        blob_gc_interval: Duration::from_secs(args.blob_gc_interval_seconds.max(1)),
        blob_gc_grace: Duration::from_secs(args.blob_gc_grace_seconds.max(1)),
        capacity: kiln_daemon::config::CapacityFlags {
            memory_mib: args.capacity_memory_mib,
            vcpus: args.capacity_vcpus,
            disk_mib: args.capacity_disk_mib,
        },
        home: args.home,
        listen: args.listen,
        min_idle_seconds: args.min_idle_seconds,
        tick: Duration::from_millis(args.tick_ms.max(50)),
        hook_timeout: Duration::from_secs(args.hook_timeout.max(1)),
        on_shutdown: args.on_shutdown,
        ingress_domain: args.ingress_domain,
        ingress_port: args.ingress_port.unwrap_or(args.ingress_listen.port()),
        endpoint_style: args.endpoint_style,
        ingress_listen: args.ingress_listen,
        ingress_header_timeout: Duration::from_millis(args.ingress_header_timeout_ms.max(100)),
        ingress_tls_cert,
        ingress_tls_key,
        egress: operator_config(args.host_services, args.egress_hosts),
        no_jail: args.no_jail,
        jail_partition,
        cpu_credit_max_seconds: args.cpu_credit_max_seconds.max(0.0),
        qemu_memory_overhead_mib: args.qemu_memory_overhead_mib.max(16),
        jail_memory_mib: args.jail_memory_mib.map(|m| m.max(64)),
        max_microvms: args.max_microvms,
        max_concurrent_builds: args.max_concurrent_builds,
        max_artifact_bytes: args.max_artifact_mib << 20,
        min_free_disk_bytes: args.min_free_disk_mib << 20,
        max_disk_bytes: args.max_disk_mib.map(|m| m << 20),
        prestart_per_image: args.prestart_per_image,
        allow_private_webhook_targets: args.allow_private_webhook_targets,
        api_tls_cert: args.api_tls_cert,
        api_tls_key: args.api_tls_key,
        cluster_ca: args.cluster_ca_file,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(kiln_daemon::serve(cfg))
}
