//! The PostgreSQL backend, for a cluster whose nodes share one database.
//!
//! It speaks through the synchronous `postgres` client (the store interface is synchronous,
//! like SQLite's); on tokio's workers each call runs in `block_in_place`, so it never blocks a
//! worker's other tasks. A lost connection fails the call with
//! [`StoreError::is_unavailable`] and the next call connects again: when PostgreSQL is back,
//! kilnd carries on.
//!
//! Events are numbered by an identity column, and every transaction that adds one first takes
//! one advisory lock ([`EVENTS_LOCK`]): numbers are then handed out in commit order, so a
//! reader paging by sequence number (webhooks, the event stream) never skips an event that
//! committed late. A trigger announces each event with `NOTIFY kiln_events`, which
//! [`StateStore::subscribe`] listens to, so every node's streams wake on every node's events.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use kiln_types::{Labels, MicrovmState};
use postgres::config::SslMode;
use postgres::error::SqlState;
use postgres::{Client, NoTls, Row, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{
    now_ms, EventRow, ImageRow, MicrovmRow, NodeRow, Result, StateStore, StoreError, WebhookRow,
};

/// Numbered schema migrations with the meaning of SQLite's list, entry for entry (text
/// columns that are sorted on compare bytewise, as in SQLite). Never edit one that shipped.
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"CREATE TABLE images (
        id TEXT COLLATE "C" PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        created_at BIGINT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX images_by_name ON images(name, created_at);
    CREATE TABLE microvms (
        id TEXT COLLATE "C" PRIMARY KEY,
        image_id TEXT COLLATE "C" NOT NULL,
        image_name TEXT COLLATE "C" NOT NULL,
        state TEXT NOT NULL,
        state_reason TEXT,
        created_at BIGINT NOT NULL,
        state_changed_at BIGINT NOT NULL,
        last_activity_at BIGINT NOT NULL,
        config TEXT NOT NULL,
        usage TEXT NOT NULL
    );
    CREATE INDEX microvms_by_state ON microvms(state);
    CREATE TABLE events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        microvm_id TEXT,
        image_id TEXT,
        kind TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT,
        reason TEXT
    );
    CREATE FUNCTION kiln_event_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('kiln_events', NEW.seq::text);
        RETURN NEW;
    END $$;
    CREATE TRIGGER events_notify AFTER INSERT ON events
        FOR EACH ROW EXECUTE FUNCTION kiln_event_notify();"#,
    "ALTER TABLE microvms ADD COLUMN runtime TEXT;",
    "ALTER TABLE microvms ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE images ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';",
    r#"CREATE TABLE webhooks (
        id TEXT COLLATE "C" PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        description TEXT,
        secret TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        cursor BIGINT NOT NULL
    );"#,
    r#"ALTER TABLE microvms ADD COLUMN node TEXT COLLATE "C" NOT NULL DEFAULT '';
    ALTER TABLE microvms ADD COLUMN memory_mib BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE images ADD COLUMN node TEXT COLLATE "C" NOT NULL DEFAULT '';
    CREATE INDEX microvms_by_node ON microvms(node);
    CREATE TABLE nodes (
        name TEXT COLLATE "C" PRIMARY KEY,
        advertise TEXT NOT NULL,
        capacity TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        heartbeat_at BIGINT NOT NULL
    );
    CREATE TABLE shared_values (name TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL);"#,
    "ALTER TABLE microvms ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;",
];

/// Guest memory the microVMs of `node` that are not TERMINATED hold.
fn used_mib(tx: &mut Transaction<'_>, node: &str) -> Result<i64> {
    Ok(tx
        .query_one(
            "SELECT COALESCE(SUM(memory_mib), 0)::bigint FROM microvms WHERE node = $1 AND state != 'TERMINATED'",
            &[&node],
        )?
        .get(0))
}

/// Held (transaction-scoped) by every transaction that adds an event. "kiln" + 1.
const EVENTS_LOCK: i64 = 0x6b69_6c6e_0001;
/// Held by blob claims and dooms, so a claim and a doom of one blob never interleave.
const BLOBS_LOCK: i64 = 0x6b69_6c6e_0003;
/// Held while migrating, so nodes starting together migrate once.
const MIGRATE_LOCK: i64 = 0x6b69_6c6e_0002;
/// With a hash of the node's name, the session-scoped lock (on its own connection) the one
/// kilnd of that name holds. "kiln".
const NODE_LOCK_CLASS: i32 = 0x6b69_6c6e;
/// How long a connection attempt may take when the URL does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct PgStore {
    config: postgres::Config,
    /// TLS to the server (`None`: plain TCP).
    tls: Option<MakeRustlsConnect>,
    /// Where it connects, for messages (never the password).
    target: String,
    client: Mutex<Option<Client>>,
    /// The connection holding this node's lock ([`NODE_LOCK_CLASS`]), once claimed.
    sole: Mutex<Option<Client>>,
}

/// Whether a failed query failed because the server could not be reached.
pub(crate) fn is_connection_error(e: &postgres::Error) -> bool {
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let class_08 = e.code().is_some_and(|c| {
        c.code().starts_with("08")
            || *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
    });
    e.is_closed() || io || class_08
}

/// Runs `f` where a blocking call is allowed: on a multi-threaded tokio worker through
/// `block_in_place`, on a current-thread runtime on a scoped thread, elsewhere directly.
fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|s| {
            s.spawn(f)
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
        Err(_) => f(),
    }
}

fn lock_events(tx: &mut Transaction<'_>) -> Result<()> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK])?;
    Ok(())
}

/// A TLS connector trusting the PEM certificates in `ca`, else the system's CAs.
fn tls_connector(ca: Option<&Path>) -> Result<MakeRustlsConnect> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    StoreError::Tls(format!(
                        "reading the CA certificates in {}: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(StoreError::Tls(format!(
                    "{} holds no PEM certificate",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    StoreError::Tls(format!("a CA certificate in {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(StoreError::Tls(
                    "the system has no CA certificates: give --database-ca-file".into(),
                ));
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A connection to the server `config` names, over `tls` if given.
fn connect(
    config: &postgres::Config,
    tls: Option<&MakeRustlsConnect>,
) -> std::result::Result<Client, postgres::Error> {
    match tls {
        Some(tls) => config.connect(tls.clone()),
        None => config.connect(NoTls),
    }
}

fn describe(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            postgres::config::Host::Unix(d) => format!("{}:{p}", d.display()),
        })
        .collect();
    let db = config.get_dbname().unwrap_or("(default database)");
    format!("{}/{db}", hosts.join(","))
}

impl PgStore {
    /// Connects (libpq URL or `key=value` string) and migrates.
    pub fn connect(url: &str, ca: Option<&Path>) -> Result<PgStore> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| StoreError::Invalid(format!("database URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let tls = if ca.is_some() || config.get_ssl_mode() == SslMode::Require {
            config.ssl_mode(SslMode::Require);
            Some(tls_connector(ca)?)
        } else {
            None
        };
        let store = PgStore {
            target: describe(&config),
            tls,
            config,
            client: Mutex::new(None),
            sole: Mutex::new(None),
        };
        store.run(migrate)?;
        Ok(store)
    }

    /// Connects now; call where blocking is allowed (see [`blocking`]).
    fn connect_now(&self) -> Result<Client> {
        connect(&self.config, self.tls.as_ref()).map_err(|source| StoreError::Connect {
            target: self.target.clone(),
            source,
        })
    }

    fn open_client(&self) -> Result<Client> {
        blocking(|| self.connect_now())
    }

    /// Runs `f` on the connection, connecting first if there is none (or it broke). All of
    /// it where blocking is allowed: a client's connect and drop block too.
    fn run<T: Send>(&self, f: impl FnOnce(&mut Client) -> Result<T> + Send) -> Result<T> {
        let mut guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let slot: &mut Option<Client> = &mut guard;
        blocking(move || {
            if slot.as_ref().is_some_and(Client::is_closed) {
                *slot = None;
            }
            let client = match slot {
                Some(c) => c,
                None => slot.insert(self.connect_now()?),
            };
            let out = f(client);
            if out.as_ref().is_err_and(StoreError::is_unavailable) {
                *slot = None;
            }
            out
        })
    }

    /// A statement without rows, in its own transaction.
    fn exec(&self, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Result<u64> {
        self.run(|c| Ok(c.execute(sql, params)?))
    }

    /// A statement that adds events: under [`EVENTS_LOCK`], in one transaction.
    fn with_events<T: Send>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T> + Send,
    ) -> Result<T> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            lock_events(&mut tx)?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
    }
}

impl Drop for PgStore {
    /// A client's drop says goodbye to the server, blocking: where that is allowed.
    fn drop(&mut self) {
        let clients = [
            self.client.get_mut().map(Option::take),
            self.sole.get_mut().map(Option::take),
        ];
        blocking(move || drop(clients));
    }
}

fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])?;
    let fresh = tx
        .query_one("SELECT to_regclass('kiln_schema') IS NULL", &[])?
        .get::<_, bool>(0);
    if fresh {
        tx.batch_execute(
            "CREATE TABLE kiln_schema (version BIGINT NOT NULL); INSERT INTO kiln_schema VALUES (0);",
        )?;
    }
    let version: i64 = tx.query_one("SELECT version FROM kiln_schema", &[])?.get(0);
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql)?;
        tx.execute("UPDATE kiln_schema SET version = $1", &[&(i as i64 + 1)])?;
    }
    tx.commit()?;
    Ok(())
}

const IMAGE_COLS: &str =
    "SELECT id, name, status, reason, created_at, record, labels, node FROM images";
const MICROVM_COLS: &str = "SELECT id, image_id, image_name, state, state_reason, created_at, state_changed_at, last_activity_at, config, usage, labels, node, memory_mib FROM microvms";

fn to_image(r: &Row) -> Result<ImageRow> {
    let status: String = r.try_get(2)?;
    Ok(ImageRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        status: status
            .parse()
            .map_err(|e: kiln_types::ParseImageStatusError| StoreError::Invalid(e.to_string()))?,
        reason: r.try_get(3)?,
        created_at: r.try_get(4)?,
        record: serde_json::from_str(r.try_get(5)?)?,
        labels: serde_json::from_str(r.try_get(6)?)?,
        node: r.try_get(7)?,
    })
}

fn to_microvm(r: &Row) -> Result<MicrovmRow> {
    let state: String = r.try_get(3)?;
    let json = |i: usize| -> Result<serde_json::Value> {
        let text: &str = r.try_get(i)?;
        Ok(serde_json::from_str(text).unwrap_or(serde_json::Value::Null))
    };
    let labels: &str = r.try_get(10)?;
    Ok(MicrovmRow {
        id: r.try_get(0)?,
        image_id: r.try_get(1)?,
        image_name: r.try_get(2)?,
        state: state
            .parse()
            .map_err(|e: kiln_types::ParseStateError| StoreError::Invalid(e.to_string()))?,
        state_reason: r.try_get(4)?,
        created_at: r.try_get(5)?,
        state_changed_at: r.try_get(6)?,
        last_activity_at: r.try_get(7)?,
        config: json(8)?,
        usage: json(9)?,
        labels: serde_json::from_str(labels).unwrap_or_default(),
        node: r.try_get(11)?,
        memory_mib: r.try_get(12)?,
    })
}

fn to_webhook(r: &Row) -> Result<WebhookRow> {
    let events: &str = r.try_get(2)?;
    Ok(WebhookRow {
        id: r.try_get(0)?,
        url: r.try_get(1)?,
        events: serde_json::from_str(events).unwrap_or_default(),
        description: r.try_get(3)?,
        secret: r.try_get(4)?,
        created_at: r.try_get(5)?,
        cursor: r.try_get(6)?,
    })
}

fn to_event(r: &Row) -> Result<EventRow> {
    Ok(EventRow {
        seq: r.try_get(0)?,
        at_ms: r.try_get(1)?,
        microvm_id: r.try_get(2)?,
        image_id: r.try_get(3)?,
        kind: r.try_get(4)?,
        from_state: r.try_get(5)?,
        to_state: r.try_get(6)?,
        reason: r.try_get(7)?,
    })
}

/// Adds a microVM and its first event (the caller holds [`EVENTS_LOCK`]).
fn insert_in(tx: &mut Transaction<'_>, vm: &MicrovmRow) -> Result<()> {
    let config = serde_json::to_string(&vm.config)?;
    let usage = serde_json::to_string(&vm.usage)?;
    let labels = serde_json::to_string(&vm.labels)?;
    tx.execute(
        "INSERT INTO microvms (id, image_id, image_name, state, state_reason, created_at, state_changed_at, last_activity_at, config, usage, labels, node, memory_mib)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        &[&vm.id, &vm.image_id, &vm.image_name, &vm.state.as_str(), &vm.state_reason, &vm.created_at,
          &vm.state_changed_at, &vm.last_activity_at, &config, &usage, &labels, &vm.node, &vm.memory_mib],
    )?;
    tx.execute(
        "INSERT INTO events (at_ms, microvm_id, image_id, kind, to_state, reason) VALUES ($1, $2, $3, 'microvm', $4, $5)",
        &[&now_ms(), &vm.id, &vm.image_id, &vm.state.as_str(), &vm.state_reason],
    )?;
    Ok(())
}

/// Listens for events until the connection breaks.
fn listen(
    config: &postgres::Config,
    tls: Option<&MakeRustlsConnect>,
    f: &mut (dyn FnMut(i64) + Send),
) -> Result<()> {
    let mut client = connect(config, tls)?;
    client.batch_execute("LISTEN kiln_events")?;
    // Events may have come while no one listened: wake the readers to look.
    let newest: i64 = client
        .query_one("SELECT COALESCE(MAX(seq), 0) FROM events", &[])?
        .get(0);
    f(newest);
    let mut notifications = client.notifications();
    let mut iter = notifications.blocking_iter();
    while let Some(n) = postgres::fallible_iterator::FallibleIterator::next(&mut iter)? {
        if let Ok(seq) = n.payload().parse() {
            f(seq);
        }
    }
    Ok(())
}

impl StateStore for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn claim_node(&self, node: &str) -> Result<()> {
        let mut client = self.open_client()?;
        // Inside `blocking`: a client that is dropped (lost the claim) says goodbye, blocking.
        let claimed = blocking(move || -> Result<Option<Client>> {
            let won: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))",
                    &[&NODE_LOCK_CLASS, &node],
                )?
                .get(0);
            Ok(won.then_some(client))
        })?;
        let Some(client) = claimed else {
            return Err(StoreError::Busy(format!(
                "a kilnd named {node:?} already runs on {}: give each node its own \
                 --node-name",
                self.target
            )));
        };
        *self.sole.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        Ok(())
    }

    fn upsert_node(&self, n: &NodeRow) -> Result<()> {
        let capacity = serde_json::to_string(&n.capacity)?;
        self.exec(
            "INSERT INTO nodes (name, advertise, capacity, started_at, heartbeat_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE SET advertise = EXCLUDED.advertise, capacity = EXCLUDED.capacity,
             started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at",
            &[&n.name, &n.advertise, &capacity, &n.started_at, &n.heartbeat_at],
        )?;
        Ok(())
    }

    fn heartbeat(&self, node: &str, at_ms: i64) -> Result<bool> {
        let n = self.exec(
            "UPDATE nodes SET heartbeat_at = GREATEST(heartbeat_at, $2) WHERE name = $1",
            &[&node, &at_ms],
        )?;
        Ok(n == 1)
    }

    fn shared_value(&self, name: &str) -> Result<Option<String>> {
        self.run(|c| {
            Ok(
                c.query_opt("SELECT value FROM shared_values WHERE name = $1", &[&name])?
                    .map(|r| r.get(0)),
            )
        })
    }

    fn set_shared_value(&self, name: &str, value: &str) -> Result<()> {
        self.exec(
            "INSERT INTO shared_values (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&name, &value],
        )?;
        Ok(())
    }

    fn delete_shared_value(&self, name: &str) -> Result<()> {
        self.exec("DELETE FROM shared_values WHERE name = $1", &[&name])?;
        Ok(())
    }

    fn shared_value_names(&self, prefix: &str) -> Result<Vec<String>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT name FROM shared_values WHERE left(name, length($1)) = $1 ORDER BY name",
                &[&prefix],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn claim_blobs(&self, ids: &[String], at_ms: i64) -> Result<Vec<String>> {
        let claims: Vec<String> = ids.iter().map(|id| crate::blob_claim_key(id)).collect();
        let marks: Vec<String> = ids.iter().map(|id| crate::blob_doomed_key(id)).collect();
        let at = at_ms.to_string();
        self.run(|c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BLOBS_LOCK])?;
            let doomed: Vec<String> = tx
                .query(
                    "SELECT name FROM shared_values WHERE name = ANY($1)",
                    &[&marks],
                )?
                .iter()
                .map(|r| {
                    let name: String = r.get(0);
                    name.trim_start_matches(crate::BLOB_DOOMED_PREFIX).to_string()
                })
                .collect();
            if doomed.is_empty() {
                tx.execute(
                    "INSERT INTO shared_values (name, value) SELECT n, $2 FROM unnest($1::text[]) AS n \
                     ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                    &[&claims, &at],
                )?;
                tx.commit()?;
            }
            Ok(doomed)
        })
    }

    fn doom_blob(&self, id: &str, claimed_since_ms: i64, at_ms: i64) -> Result<bool> {
        let (claim_key, mark_key) = (crate::blob_claim_key(id), crate::blob_doomed_key(id));
        let at = at_ms.to_string();
        self.run(|c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BLOBS_LOCK])?;
            let claim: Option<String> = tx
                .query_opt("SELECT value FROM shared_values WHERE name = $1", &[&claim_key])?
                .map(|r| r.get(0));
            if crate::claimed_since(claim.as_deref(), claimed_since_ms) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO shared_values (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&mark_key, &at],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn remove_node(&self, name: &str) -> Result<bool> {
        Ok(self.exec("DELETE FROM nodes WHERE name = $1", &[&name])? == 1)
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.run(|c| {
            c.query(
                "SELECT name, advertise, capacity, started_at, heartbeat_at FROM nodes ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| {
                let capacity: &str = r.try_get(2)?;
                Ok(NodeRow {
                    name: r.try_get(0)?,
                    advertise: r.try_get(1)?,
                    capacity: serde_json::from_str(capacity).unwrap_or(serde_json::Value::Null),
                    started_at: r.try_get(3)?,
                    heartbeat_at: r.try_get(4)?,
                })
            })
            .collect()
        })
    }

    fn schema_version(&self) -> Result<i64> {
        self.run(|c| Ok(c.query_one("SELECT version FROM kiln_schema", &[])?.get(0)))
    }

    fn upsert_image(&self, img: &ImageRow) -> Result<()> {
        let record = serde_json::to_string(&img.record)?;
        let labels = serde_json::to_string(&img.labels)?;
        self.with_events(|tx| {
            let previous: Option<String> = tx
                .query_opt("SELECT status FROM images WHERE id = $1 FOR UPDATE", &[&img.id])?
                .map(|r| r.get(0));
            tx.execute(
                "INSERT INTO images (id, name, status, reason, created_at, record, labels, node) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, reason = EXCLUDED.reason, record = EXCLUDED.record",
                &[&img.id, &img.name, &img.status.as_str(), &img.reason, &img.created_at, &record, &labels, &img.node],
            )?;
            if previous.as_deref() != Some(img.status.as_str()) {
                tx.execute(
                    "INSERT INTO events (at_ms, image_id, kind, from_state, to_state, reason) VALUES ($1, $2, 'image', $3, $4, $5)",
                    &[&now_ms(), &img.id, &previous, &img.status.as_str(), &img.reason],
                )?;
            }
            Ok(())
        })
    }

    fn image(&self, id_or_name: &str) -> Result<Option<ImageRow>> {
        self.run(|c| {
            let by_id = c.query_opt(&format!("{IMAGE_COLS} WHERE id = $1"), &[&id_or_name])?;
            let found = match by_id {
                Some(r) => Some(r),
                None => c.query_opt(
                    &format!("{IMAGE_COLS} WHERE name = $1 ORDER BY (status = 'SUCCESSFUL') DESC, created_at DESC, id DESC LIMIT 1"),
                    &[&id_or_name],
                )?,
            };
            found.as_ref().map(to_image).transpose()
        })
    }

    fn images(&self) -> Result<Vec<ImageRow>> {
        self.run(|c| {
            c.query(
                &format!("{IMAGE_COLS} i WHERE id = (
                    SELECT id FROM images j WHERE j.name = i.name ORDER BY (status = 'SUCCESSFUL') DESC, created_at DESC, id DESC LIMIT 1
                ) ORDER BY name"),
                &[],
            )?
            .iter()
            .map(to_image)
            .collect()
        })
    }

    fn all_images(&self) -> Result<Vec<ImageRow>> {
        self.run(|c| {
            c.query(&format!("{IMAGE_COLS} ORDER BY created_at, id"), &[])?
                .iter()
                .map(to_image)
                .collect()
        })
    }

    fn delete_image(&self, id: &str) -> Result<bool> {
        self.with_events(|tx| {
            let n = tx.execute("DELETE FROM images WHERE id = $1", &[&id])?;
            if n > 0 {
                tx.execute(
                    "INSERT INTO events (at_ms, image_id, kind, reason) VALUES ($1, $2, 'image', 'deleted')",
                    &[&now_ms(), &id],
                )?;
            }
            Ok(n > 0)
        })
    }

    fn live_microvms_of_image(&self, image_id: &str) -> Result<Vec<String>> {
        self.run(|c| {
            Ok(c.query(
                "SELECT id FROM microvms WHERE image_id = $1 AND state != 'TERMINATED' ORDER BY id",
                &[&image_id],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn count_live_microvms(&self) -> Result<usize> {
        self.run(|c| {
            let n: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM microvms WHERE state != 'TERMINATED'",
                    &[],
                )?
                .get(0);
            Ok(n as usize)
        })
    }

    fn count_building_images(&self) -> Result<usize> {
        self.run(|c| {
            let n: i64 = c
                .query_one("SELECT COUNT(*) FROM images WHERE status = 'CREATING'", &[])?
                .get(0);
            Ok(n as usize)
        })
    }

    fn insert_microvm(&self, vm: &MicrovmRow) -> Result<()> {
        self.claim_and_insert(std::slice::from_ref(vm), None)
    }

    fn ownership(&self, id: &str) -> Result<Option<(String, i64)>> {
        self.run(|c| {
            Ok(
                c.query_opt("SELECT node, epoch FROM microvms WHERE id = $1", &[&id])?
                    .map(|r| (r.get(0), r.get(1))),
            )
        })
    }

    fn move_suspended(
        &self,
        id: &str,
        from: &str,
        epoch: i64,
        to: &str,
        capacity_mib: Option<i64>,
    ) -> Result<i64> {
        // Under EVENTS_LOCK, like every claim on a node's memory; the row is locked too.
        self.with_events(|tx| {
            let need: Option<i64> = tx
                .query_opt(
                    "SELECT memory_mib FROM microvms WHERE id = $1 AND node = $2 AND epoch = $3 AND state = 'SUSPENDED' FOR UPDATE",
                    &[&id, &from, &epoch],
                )?
                .map(|r| r.get(0));
            let need = need.ok_or_else(|| StoreError::Fenced {
                id: id.to_string(),
                from: from.to_string(),
                epoch,
            })?;
            if let Some(capacity) = capacity_mib {
                let used = used_mib(tx, to)?;
                crate::check_room(to, capacity, used, need)?;
            }
            tx.execute(
                "UPDATE microvms SET node = $1, epoch = epoch + 1 WHERE id = $2",
                &[&to, &id],
            )?;
            Ok(epoch + 1)
        })
    }

    fn claim_and_insert(&self, vms: &[MicrovmRow], capacity_mib: Option<i64>) -> Result<()> {
        let Some(node) = vms.first().map(|v| v.node.as_str()) else {
            return Ok(());
        };
        // Under EVENTS_LOCK (every insert records an event): claims are serialized across
        // the cluster, so two nodes placing at once cannot both take the last room.
        self.with_events(|tx| {
            if capacity_mib.is_some() {
                let used = used_mib(tx, node)?;
                crate::check_fits(node, capacity_mib, used, vms)?;
            }
            vms.iter().try_for_each(|vm| insert_in(tx, vm))
        })
    }

    fn microvm(&self, id: &str) -> Result<Option<MicrovmRow>> {
        self.run(|c| {
            c.query_opt(&format!("{MICROVM_COLS} WHERE id = $1"), &[&id])?
                .as_ref()
                .map(to_microvm)
                .transpose()
        })
    }

    fn microvms(
        &self,
        state: Option<MicrovmState>,
        image: Option<&str>,
    ) -> Result<Vec<MicrovmRow>> {
        let state = state.map(MicrovmState::as_str);
        self.run(|c| {
            c.query(
                &format!("{MICROVM_COLS} WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR image_id = $2 OR image_name = $2) ORDER BY created_at, id"),
                &[&state, &image],
            )?
            .iter()
            .map(to_microvm)
            .collect()
        })
    }

    fn set_state(&self, id: &str, to: MicrovmState, reason: Option<&str>) -> Result<()> {
        self.with_events(|tx| {
            let from: String = tx
                .query_opt("SELECT state FROM microvms WHERE id = $1 FOR UPDATE", &[&id])?
                .ok_or_else(|| StoreError::NoSuchMicrovm(id.to_string()))?
                .get(0);
            let from = crate::check_transition(id, &from, to)?;
            let now = now_ms();
            tx.execute(
                "UPDATE microvms SET state = $2, state_reason = $3, state_changed_at = $4 WHERE id = $1",
                &[&id, &to.as_str(), &reason, &now],
            )?;
            tx.execute(
                "INSERT INTO events (at_ms, microvm_id, kind, from_state, to_state, reason) VALUES ($1, $2, 'microvm', $3, $4, $5)",
                &[&now, &id, &from.as_str(), &to.as_str(), &reason],
            )?;
            Ok(())
        })
    }

    fn touch(&self, id: &str, at_ms: i64) -> Result<()> {
        self.exec(
            "UPDATE microvms SET last_activity_at = GREATEST(last_activity_at, $2) WHERE id = $1",
            &[&id, &at_ms],
        )?;
        Ok(())
    }

    fn touch_many(&self, activity: &[(String, i64)]) -> Result<()> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            let stmt = tx.prepare(
                "UPDATE microvms SET last_activity_at = GREATEST(last_activity_at, $2) WHERE id = $1",
            )?;
            for (id, at) in activity {
                tx.execute(&stmt, &[id, at])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn set_microvm_labels(&self, id: &str, labels: &Labels) -> Result<bool> {
        let labels = serde_json::to_string(labels)?;
        let n = self.exec(
            "UPDATE microvms SET labels = $2 WHERE id = $1",
            &[&id, &labels],
        )?;
        Ok(n == 1)
    }

    fn set_image_labels(&self, id: &str, labels: &Labels) -> Result<bool> {
        let labels = serde_json::to_string(labels)?;
        let n = self.exec(
            "UPDATE images SET labels = $2 WHERE id = $1",
            &[&id, &labels],
        )?;
        Ok(n == 1)
    }

    fn set_usage(&self, id: &str, usage: &serde_json::Value) -> Result<()> {
        let usage = serde_json::to_string(usage)?;
        self.exec(
            "UPDATE microvms SET usage = $2 WHERE id = $1",
            &[&id, &usage],
        )?;
        Ok(())
    }

    fn set_runtime(&self, id: &str, runtime: Option<&serde_json::Value>) -> Result<()> {
        let text = runtime.map(serde_json::to_string).transpose()?;
        self.exec(
            "UPDATE microvms SET runtime = $2 WHERE id = $1",
            &[&id, &text],
        )?;
        Ok(())
    }

    fn runtime(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let text: Option<String> = self.run(|c| {
            Ok(
                c.query_opt("SELECT runtime FROM microvms WHERE id = $1", &[&id])?
                    .and_then(|r| r.get(0)),
            )
        })?;
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }

    fn insert_webhook(&self, w: &WebhookRow) -> Result<i64> {
        let events = serde_json::to_string(&w.events)?;
        self.with_events(|tx| {
            let newest: i64 = tx
                .query_one("SELECT COALESCE(MAX(seq), 0) FROM events", &[])?
                .get(0);
            tx.execute(
                "INSERT INTO webhooks (id, url, events, description, secret, created_at, cursor) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&w.id, &w.url, &events, &w.description, &w.secret, &w.created_at, &newest],
            )?;
            Ok(newest)
        })
    }

    fn webhooks(&self) -> Result<Vec<WebhookRow>> {
        self.run(|c| {
            c.query(
                "SELECT id, url, events, description, secret, created_at, cursor FROM webhooks ORDER BY created_at, id",
                &[],
            )?
            .iter()
            .map(to_webhook)
            .collect()
        })
    }

    fn delete_webhook(&self, id: &str) -> Result<bool> {
        Ok(self.exec("DELETE FROM webhooks WHERE id = $1", &[&id])? == 1)
    }

    fn set_webhook_cursor(&self, id: &str, seq: i64) -> Result<()> {
        self.exec(
            "UPDATE webhooks SET cursor = GREATEST(cursor, $2) WHERE id = $1",
            &[&id, &seq],
        )?;
        Ok(())
    }

    fn record_event(&self, microvm_id: &str, kind: &str, reason: &str) -> Result<()> {
        self.with_events(|tx| {
            tx.execute(
                "INSERT INTO events (at_ms, microvm_id, kind, reason) VALUES ($1, $2, $3, $4)",
                &[&now_ms(), &microvm_id, &kind, &reason],
            )?;
            Ok(())
        })
    }

    fn subscribe(&self, mut f: Box<dyn FnMut(i64) + Send>) {
        let config = self.config.clone();
        let tls = self.tls.clone();
        let target = self.target.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-pg-listen".into())
            .spawn(move || loop {
                if let Err(e) = listen(&config, tls.as_ref(), &mut *f) {
                    tracing::warn!("listening for events at {target} failed (again in 1 s): {e}");
                }
                std::thread::sleep(Duration::from_secs(1));
            });
        if let Err(e) = spawned {
            tracing::error!(
                "no thread to listen for events: {e}; streams wake only on their own polls"
            );
        }
    }

    fn last_event_seq(&self) -> Result<i64> {
        self.run(|c| {
            Ok(
                c.query_one("SELECT COALESCE(MAX(seq), 0) FROM events", &[])?
                    .get(0),
            )
        })
    }

    fn events_since(&self, cursor: i64, limit: i64) -> Result<Vec<EventRow>> {
        self.run(|c| {
            c.query(
                "SELECT seq, at_ms, microvm_id, image_id, kind, from_state, to_state, reason FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&cursor, &limit],
            )?
            .iter()
            .map(to_event)
            .collect()
        })
    }
}
