//! kilnd: the control plane. REST API ([`api`]), the microVM lifecycle and hooks
//! ([`manager`]), the idle policy ([`idle`]), image builds ([`images`]), start-up recovery
//! ([`recovery`]), and the API key ([`auth`]). State lives in SQLite (kiln-store).

pub mod actor;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod cpu;
pub mod drain;
pub mod egress;
pub mod endpoint;
pub mod error;
pub mod files;
pub mod fork;
pub mod gc;
pub mod idle;
pub mod images;
pub mod ingress;
pub mod live;
pub mod manager;
pub mod metrics;
pub mod placement;
pub mod pool;
pub mod recovery;
pub mod save_image;
mod serve_tls;
pub mod share;
pub mod tls;
pub mod travel;
pub mod tunnel;
pub mod webhooks;

use std::sync::{Arc, Mutex};

use anyhow::Context;
use tracing::{info, warn};

pub use config::{Config, ShutdownPolicy};
pub use manager::Manager;

/// Opens everything, recovers, and serves until SIGTERM/SIGINT.
pub async fn serve(mut cfg: Config) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.home)
        .with_context(|| format!("creating {}", cfg.home.display()))?;
    // The network backends' report sockets: root's alone.
    let net_dir = cfg.home.join("run").join("net");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&net_dir)
        .with_context(|| format!("creating {}", net_dir.display()))?;
    // Bound first so that endpoints show the real port when the listen port is 0.
    let ingress = tokio::net::TcpListener::bind(cfg.ingress_listen)
        .await
        .with_context(|| format!("binding the ingress on {}", cfg.ingress_listen))?;
    let ingress_addr = ingress.local_addr()?;
    cfg.ingress_listen = ingress_addr;
    if cfg.ingress_port == 0 {
        cfg.ingress_port = ingress_addr.port();
    }
    let resolved = match cfg.endpoint_style {
        config::EndpointStyle::Auto => {
            endpoint::resolve_probe(&cfg.ingress_domain, cfg.ingress_port).await
        }
        _ => Vec::new(),
    };
    let style = endpoint::choose(cfg.endpoint_style, ingress_addr, &resolved);
    let example = endpoint::endpoint(
        style,
        "<id>",
        &cfg.ingress_domain,
        cfg.ingress_port,
        ingress_addr,
    );
    tracing::info!(
        style = ?style,
        chosen = ?cfg.endpoint_style,
        "endpoints look like {example} ({}; --endpoint-style host|path to choose)",
        match (cfg.endpoint_style, style) {
            (config::EndpointStyle::Auto, config::EndpointStyle::Host) =>
                "the ingress domain resolves to the ingress",
            (config::EndpointStyle::Auto, _) =>
                "the ingress domain does not resolve to the ingress",
            _ => "as asked",
        }
    );
    cfg.endpoint_style = style;
    let key = auth::load_or_create(&cfg.home).context("API key")?;
    let store = open_store(&cfg)?;
    // Event streams wake when an event is recorded, instead of polling the database.
    let (event_tx, events) = tokio::sync::watch::channel(store.last_event_seq()?);
    store.on_event(move |seq| {
        event_tx.send_replace(seq);
    });
    let accel = kiln_vmm::accel::detect()?;
    let assets = kiln_vmm::GuestAssets::locate()?;
    let confinement = jail(&cfg)?;
    let blobs = match &cfg.object_store {
        Some(o) => Some(Arc::new(
            kiln_objects::Blobs::open_with(&o.url, &cfg.home.join("blobs"), o.credentials.as_ref())
                .context("--object-store")?,
        )),
        None => None,
    };
    let builder = kiln_image::Builder {
        images_dir: cfg.home.join("images"),
        layers_dir: cfg.home.join("layers"),
        assets: assets.clone(),
        accel: accel.accel,
        confinement: confinement.clone(),
    };
    let manager = Arc::new(Manager {
        cfg: cfg.clone(),
        store: Mutex::new(store),
        builder,
        assets,
        accel: accel.accel,
        confinement,
        actors: Mutex::new(Default::default()),
        tokens: Arc::new(kiln_proxy::token::TokenService::open(
            &cfg.home.join("ingress-keys.json"),
        )?),
        inflight: Mutex::new(Default::default()),
        not_resumable: Mutex::new(Default::default()),
        admission: Mutex::new(()),
        activity: Mutex::new(Default::default()),
        disk_used: Default::default(),
        agents: Mutex::new(Default::default()),
        egress: egress::Egress::new(cfg.egress.clone()),
        pool: pool::Pool::new(cfg.prestart_per_image),
        metrics: Default::default(),
        watches: Default::default(),
        output_streams: crate::files::Watches::new(
            kiln_api::process::MAX_OUTPUT_STREAMS_PER_MICROVM,
            "process output streams",
        ),
        webhooks: Default::default(),
        events,
        event_streams: Arc::new(tokio::sync::Semaphore::new(kiln_api::MAX_EVENT_STREAMS)),
        console: Default::default(),
        key: Arc::new(key.clone()),
        left_cluster: Default::default(),
        node_tls: match &cfg.cluster_ca {
            Some(ca) => Some(cluster::node_connector(ca).context("--cluster-ca-file")?),
            None => None,
        },
        blobs,
        imports: Default::default(),
        publish_backoff: Default::default(),
        gc: Default::default(),
    });
    recovery::recover(&manager).await?;
    webhooks::spawn_dispatcher(&manager);
    // What KILN_HOME holds, for --max-disk-mib: measured before the API answers, then every
    // ten seconds off the async workers.
    if manager.cfg.max_disk_bytes.is_some() {
        let m = manager.clone();
        tokio::task::spawn_blocking(move || m.measure_disk_use()).await?;
        let m = manager.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                every.tick().await;
                let m = m.clone();
                let _ = tokio::task::spawn_blocking(move || m.measure_disk_use()).await;
            }
        });
    }
    idle::spawn(manager.clone());
    // Unused uploads go a day after their upload: checked at start and every hour.
    let sweeper = manager.clone();
    tokio::spawn(async move {
        let mut hourly = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            hourly.tick().await;
            let manager = sweeper.clone();
            let _ = tokio::task::spawn_blocking(move || images::sweep_artifacts(&manager)).await;
        }
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    // Before anyone learns where kilnd is: a SIGTERM from then on is a graceful shutdown
    // (the default action would end kilnd at once, skipping --on-shutdown).
    let signals = shutdown_signals()?;
    info!(listen = %listener.local_addr()?, accel = %accel.accel, "kilnd ready");
    if accel.dev_mode() {
        warn!("{} ({})", kiln_vmm::accel::DEV_MODE_WARNING, accel.reason);
    }
    // Written after binding so clients (and tests) know the daemon is up and where: the
    // ingress first, then the API, each whole or not at all (a reader never sees half).
    info!(ingress = %ingress_addr, "ingress ready");
    write_whole(&cfg.home.join("kilnd.ingress"), &ingress_addr.to_string())?;
    let api_tls = match (&cfg.api_tls_cert, &cfg.api_tls_key) {
        (Some(cert), Some(key)) => Some(
            kiln_proxy::server::tls_acceptor(cert, key)
                .map_err(anyhow::Error::msg)
                .context("API TLS")?,
        ),
        (None, None) => None,
        _ => anyhow::bail!("--api-tls-cert and --api-tls-key go together"),
    };
    // Clients read the scheme here too (`https://` when the API speaks TLS).
    let scheme = if api_tls.is_some() { "https://" } else { "" };
    cluster::register(&manager, listener.local_addr()?)?;
    write_whole(
        &cfg.home.join("kilnd.addr"),
        &format!("{scheme}{}", listener.local_addr()?),
    )?;
    let proxy_cfg = kiln_proxy::server::ProxyConfig {
        domain: cfg.ingress_domain.clone(),
        header_timeout: cfg.ingress_header_timeout,
        ..Default::default()
    };
    let tls = match (&cfg.ingress_tls_cert, &cfg.ingress_tls_key) {
        (Some(cert), Some(key)) => Some(
            kiln_proxy::server::tls_acceptor(cert, key)
                .map_err(anyhow::Error::msg)
                .context("ingress TLS")?,
        ),
        (None, None) => None,
        _ => anyhow::bail!("--ingress-tls-cert and --ingress-tls-key go together"),
    };
    let console = ConsoleOptions {
        secure: api_tls.is_some(),
        connect_sources: ingress_origins(&cfg, ingress_addr, tls.is_some()),
    };
    info!(tls = tls.is_some(), "ingress transport");
    tokio::spawn(kiln_proxy::server::serve(
        ingress,
        manager.tokens.clone(),
        Arc::new(ingress::IngressBackend(manager.clone())),
        proxy_cfg,
        tls,
    ));
    let app = api::router(manager.clone(), Arc::new(key), console);
    match api_tls {
        Some(acceptor) => serve_tls::serve(listener, acceptor, app, signals).await,
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(signals)
                .await?
        }
    }
    shutdown(&manager).await;
    Ok(())
}

/// How kilnd serves its web console.
pub struct ConsoleOptions {
    /// The API speaks TLS (session cookies are `Secure`).
    pub secure: bool,
    /// The ingress's origins, where the console's terminal connects.
    pub connect_sources: Vec<String>,
}

/// The store `cfg` names: SQLite under KILN_HOME, or PostgreSQL (migrated, with this
/// node's name claimed for as long as kilnd runs).
fn open_store(cfg: &Config) -> anyhow::Result<kiln_store::Store> {
    match &cfg.database {
        config::Database::Sqlite => Ok(kiln_store::Store::open(&cfg.home.join("kiln.db"))?),
        config::Database::Postgres { url, from, ca } => {
            let store = kiln_store::Store::connect_with_ca(&url.0, ca.as_deref())
                .with_context(|| format!("the database named by {from}"))?;
            store.claim_node(&cfg.node_name)?;
            info!(
                backend = store.backend(),
                "state in PostgreSQL (the URL from {from})"
            );
            Ok(store)
        }
    }
}

/// The origins a browser reaches the ingress at, both endpoint styles.
fn ingress_origins(cfg: &Config, ingress: std::net::SocketAddr, tls: bool) -> Vec<String> {
    let scheme = if tls { "wss" } else { "ws" };
    let host = endpoint::path_host(ingress);
    let host = match host {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let port = ingress.port();
    vec![
        format!("{scheme}://{host}:{port}"),
        format!("{scheme}://*.{}:{port}", cfg.ingress_domain),
    ]
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_whole(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The jail every microVM gets: checked by starting a test jail, so kilnd refuses to start
/// on a host that cannot give one (and says which part), unless `--no-jail`.
fn jail(cfg: &Config) -> anyhow::Result<kiln_vmm::Confinement> {
    use std::os::unix::fs::PermissionsExt;
    // Nothing of the home is any other user's business (a jail sees only its own files).
    std::fs::set_permissions(&cfg.home, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", cfg.home.display()))?;
    // Every microVM's network runs in this program, jailed or not.
    let backend = kiln_vmm::netproc::check_net_backend()
        .map_err(anyhow::Error::msg)
        .context("the network backend (kiln-net-backend) cannot run here")?;
    info!(path = %backend.display(), "network backend ready (seccomp filter checked)");
    if cfg.no_jail {
        warn!(
            "--no-jail: every QEMU and network backend runs as root in the host's \
             namespaces, without chroot or cgroups. A guest that escapes QEMU owns this host. \
             Development only."
        );
        return Ok(kiln_vmm::Confinement::Unjailed);
    }
    let partition = &cfg.jail_partition;
    kiln_jail::preflight(partition).context(
        "every microVM runs in a jail and this host cannot give one; fix the part named \
         above, or start kilnd with --no-jail for development only",
    )?;
    let swept = kiln_jail::sweep(partition);
    let facts = kiln_jail::facts(partition);
    info!(
        uids = %facts.uid_range,
        cgroups = %facts.cgroups.join(", "),
        swept,
        "jail ready"
    );
    Ok(kiln_vmm::Confinement::Jailed(kiln_vmm::JailLimits {
        overhead_mib: Some(cfg.qemu_memory_overhead_mib),
        memory_mib: cfg.jail_memory_mib,
        cpus: None,
        partition: partition.clone(),
    }))
}

/// Installs the SIGTERM and SIGINT handlers; the future ends at the first of either.
fn shutdown_signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

/// Graceful shutdown: leave running microVMs running for the next kilnd (the default), or
/// suspend or terminate them, per the daemon setting.
async fn shutdown(manager: &Arc<Manager>) {
    // QEMUs waiting for a launch are no microVM's: they end with this kilnd.
    manager.pool.drain(manager).await;
    if manager.cfg.on_shutdown == ShutdownPolicy::Keep {
        leave_running(manager).await;
        drain::leave_if_drained(manager);
        return;
    }
    let running =
        cluster::own_microvms(manager, Some(kiln_types::MicrovmState::Running)).unwrap_or_default();
    info!(count = running.len(), policy = ?manager.cfg.on_shutdown, "shutting down");
    for row in running {
        let result = match manager.cfg.on_shutdown {
            ShutdownPolicy::Keep => continue,
            ShutdownPolicy::Suspend => manager.suspend(&row.id, "kilnd shut down").await,
            ShutdownPolicy::Terminate => manager.terminate(&row.id, "kilnd shut down").await,
        };
        if let Err(e) = result {
            warn!(id = row.id, "shutdown action failed: {}", e.message);
        }
    }
    drain::leave_if_drained(manager);
}

/// Lets go of every running microVM without stopping it: their runtime records are in the
/// store, so the next kilnd takes them back. Waits for transitions in progress first.
async fn leave_running(manager: &Arc<Manager>) {
    let actors: Vec<_> = manager
        .actors_mut()
        .iter()
        .map(|(id, h)| (id.clone(), h.tx.clone()))
        .collect();
    let mut kept = 0;
    for (id, tx) in actors {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if tx.send(actor::Command::LetGo { reply }).await.is_ok() && answer.await == Ok(true) {
            kept += 1;
        } else {
            tracing::debug!(id, "nothing running to leave");
        }
    }
    manager.flush_activity();
    info!(
        kept,
        "shutting down: running microVMs left running for the next kilnd"
    );
}
