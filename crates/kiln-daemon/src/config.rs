//! Daemon settings (flags and environment).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What a graceful shutdown (SIGTERM) does with running microVMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShutdownPolicy {
    /// Leave them running: the next kilnd takes them back (upgrades keep sandboxes).
    Keep,
    /// Suspend them to disk; they are SUSPENDED after the restart and resume on request.
    Suspend,
    /// Terminate them.
    Terminate,
}

/// How endpoints name a microVM (`--endpoint-style`); the ingress accepts both styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointStyle {
    /// Host style when `<probe>.<ingress domain>` resolves to the ingress address, path
    /// style otherwise (decided once at start; see `ingress::choose_style`).
    Auto,
    /// `<id>.<domain>:<port>`: one browser origin per microVM; needs a resolver that maps
    /// `*.<domain>` to the ingress (stock Debian does not for `*.localhost`).
    Host,
    /// `<ingress address>:<port>/m/<id>`: works with any resolver; every microVM shares one
    /// browser origin (cookies, storage), so browser apps should use host style.
    Path,
}

/// A database URL, which may hold a password: never printed (`Config` is logged).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(pub String);

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretUrl(..)")
    }
}

/// Where kilnd keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// `KILN_HOME/kiln.db` (one node, the default).
    Sqlite,
    /// PostgreSQL; `from` says where the URL came from, for messages.
    Postgres {
        url: SecretUrl,
        from: String,
        /// `--database-ca-file`: TLS, trusting these CAs.
        ca: Option<std::path::PathBuf>,
    },
}

/// What a node offers, from `--capacity-*` (`None`: the machine's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapacityFlags {
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u32>,
    pub disk_mib: Option<u64>,
}

/// Where images and snapshots travel between nodes (`--object-store`).
#[derive(Debug, Clone)]
pub struct ObjectStoreConfig {
    /// `s3://BUCKET[/PREFIX]?endpoint=…&region=…` (no credentials in it).
    pub url: String,
    /// From `--object-store-credentials-file` or the AWS_* environment.
    pub credentials: Option<kiln_objects::Credentials>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database: Database,
    /// Image templates in S3-compatible storage, for every node (`None`: they stay where
    /// they were built).
    pub object_store: Option<ObjectStoreConfig>,
    /// This kilnd's name among the nodes of a shared database (`--node-name`).
    pub node_name: String,
    /// Where other nodes reach this API (`--advertise`); `None`: the bound listen address.
    pub advertise: Option<String>,
    /// A node without a heartbeat for this long is unreachable (`--node-lease-seconds`).
    pub node_lease: Duration,
    /// How often a node of the cluster collects object storage's unnamed blobs (one node
    /// per interval), and how old an unnamed, unclaimed blob must be to go.
    pub blob_gc_interval: Duration,
    pub blob_gc_grace: Duration,
    pub capacity: CapacityFlags,
    pub home: PathBuf,
    pub listen: SocketAddr,
    /// Lowest `maxIdleDurationSeconds` accepted (the API minimum is 60 s, like Lambda's).
    pub min_idle_seconds: u64,
    /// How often the idle policy and metering run.
    pub tick: Duration,
    pub hook_timeout: Duration,
    pub on_shutdown: ShutdownPolicy,
    pub ingress_domain: String,
    /// Port shown in endpoints (`<id>.<domain>:<port>`, `<address>:<port>/m/<id>`).
    pub ingress_port: u16,
    /// How endpoints are written; `Auto` is replaced by the choice at start.
    pub endpoint_style: EndpointStyle,
    /// Where the ingress listens.
    pub ingress_listen: SocketAddr,
    pub ingress_header_timeout: Duration,
    /// PEM certificate chain and key: the ingress speaks TLS when both are set.
    pub ingress_tls_cert: Option<PathBuf>,
    pub ingress_tls_key: Option<PathBuf>,
    /// Host services and pinned names for egress connectors.
    pub egress: kiln_vmm::kiln_net::OperatorConfig,
    /// Run QEMU unjailed (development only; logged loudly on every start).
    pub no_jail: bool,
    /// The uids and cgroup root of this kilnd's jails (nodes sharing a machine each take
    /// their own).
    pub jail_partition: kiln_jail::Partition,
    /// CPU-seconds above its baseline a microVM can bank (and starts with).
    pub cpu_credit_max_seconds: f64,
    /// Memory a microVM's QEMU may use beyond guest RAM (its jail's limit is the sum).
    pub qemu_memory_overhead_mib: u64,
    /// The whole memory limit of every jail instead (tests set one below guest RAM).
    pub jail_memory_mib: Option<u64>,
    /// At most this many microVMs not TERMINATED (starting, RUNNING or SUSPENDED).
    pub max_microvms: usize,
    /// At most this many image builds at once.
    pub max_concurrent_builds: usize,
    /// Largest build context upload, in bytes.
    pub max_artifact_bytes: u64,
    /// Free space kept on KILN_HOME's disk: new microVMs, builds, uploads and suspends that
    /// would go below it are refused (429) and what runs keeps running.
    pub min_free_disk_bytes: u64,
    /// At most this much on disk under KILN_HOME (images, layers, microVMs, snapshots); new
    /// work beyond it is refused the same way. None: no limit but the free-space floor.
    pub max_disk_bytes: Option<u64>,
    /// PEM certificate chain and key: the API speaks HTTPS when both are set.
    pub api_tls_cert: Option<PathBuf>,
    pub api_tls_key: Option<PathBuf>,
    /// `--cluster-ca-file`: calls to other nodes are HTTPS, their certificates verified
    /// against these CAs (PEM) for the host of their `--advertise` address.
    pub cluster_ca: Option<PathBuf>,
    /// QEMUs started ahead of the next launch, per hot image (0: none; see `pool`).
    pub prestart_per_image: usize,
    /// Webhooks may target loopback, link-local and private addresses (tests; a trusted
    /// network). Off by default: a client could otherwise aim kilnd at its own network.
    pub allow_private_webhook_targets: bool,
}

/// Default of `--prestart-per-image`.
pub const DEFAULT_PRESTART_PER_IMAGE: usize = 1;

/// Default of `--min-free-disk-mib`.
pub const DEFAULT_MIN_FREE_DISK_MIB: u64 = 1024;

/// Default of `--max-artifact-mib`.
pub const DEFAULT_MAX_ARTIFACT_MIB: u64 = 512;

/// Default of `--max-microvms`: what one machine of a few dozen GiB can hold at 512 MiB.
pub const DEFAULT_MAX_MICROVMS: usize = 64;
/// Default of `--max-concurrent-builds`.
pub const DEFAULT_MAX_CONCURRENT_BUILDS: usize = 2;

pub const API_MIN_IDLE_SECONDS: u64 = 60;
pub const DEFAULT_MAX_DURATION_SECONDS: u64 = 8 * 3600;
pub const MAX_RUN_PAYLOAD_BYTES: usize = 16 * 1024;
