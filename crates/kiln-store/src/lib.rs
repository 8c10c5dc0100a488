//! kiln's state behind one interface ([`StateStore`]) with two backends: one SQLite file
//! under `KILN_HOME` (a single node, the default) and PostgreSQL (a cluster's nodes share
//! it). Both hold images, microVMs and their lifecycle events; schema changes are numbered
//! migrations applied at open, the same list of meanings in both. Every state change is
//! written in the same transaction as its event, and events are numbered in commit order
//! (readers page through them by sequence number).

use std::path::Path;

use kiln_types::{ImageStatus, Labels, MicrovmState};
use serde::{Deserialize, Serialize};

mod pg;
mod sqlite;

pub use pg::PgStore;
pub use sqlite::SqliteStore;

/// A webhook as stored (its secret signs deliveries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRow {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub description: Option<String>,
    pub secret: String,
    pub created_at: i64,
    pub cursor: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Database {path} failed")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("Database query failed")]
    Sql(#[from] rusqlite::Error),
    #[error("Cannot reach PostgreSQL at {target}")]
    Connect {
        target: String,
        #[source]
        source: postgres::Error,
    },
    /// A query failed; when the connection is gone, [`StoreError::is_unavailable`] says so
    /// and the next call reconnects.
    #[error("TLS to PostgreSQL: {0}")]
    Tls(String),
    #[error("PostgreSQL query failed")]
    Postgres(#[from] postgres::Error),
    #[error("Stored JSON is invalid")]
    Json(#[from] serde_json::Error),
    #[error("Database schema version {found} is newer than this kiln ({known}): upgrade kiln")]
    TooNew { found: i64, known: i64 },
    #[error("{0}")]
    Busy(String),
    /// A claim on a node's memory that does not fit: nothing was written.
    #[error("node {node:?} has {free} MiB of its {capacity} MiB free for microVMs; {need} MiB more do not fit")]
    NodeFull {
        node: String,
        capacity: i64,
        free: i64,
        need: i64,
    },
    #[error("Stored value is invalid: {0}")]
    Invalid(String),
    #[error("microVM {0} does not exist")]
    NoSuchMicrovm(String),
    /// A transition the lifecycle graph forbids ([`MicrovmState::can_become`]): nothing
    /// was written.
    #[error("microVM {id} is {from}; it cannot become {to}")]
    Transition {
        id: String,
        from: MicrovmState,
        to: MicrovmState,
    },
    /// A move of a microVM's ownership that lost: it is no longer where the mover saw it.
    #[error("microVM {id} is no longer SUSPENDED on node {from:?} at ownership epoch {epoch}: another node took it, or it was resumed")]
    Fenced {
        id: String,
        from: String,
        epoch: i64,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl StoreError {
    /// The database could not be reached (PostgreSQL down, the network between): the
    /// request may be retried once it is back, nothing was written.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Connect { .. } => true,
            StoreError::Postgres(e) => e.is_closed() || pg::is_connection_error(e),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRow {
    pub id: String,
    pub name: String,
    pub status: ImageStatus,
    pub reason: Option<String>,
    pub created_at: i64,
    /// The full image record (kiln-image's `ImageRecord`) as JSON.
    pub record: serde_json::Value,
    #[serde(default)]
    pub labels: Labels,
    /// The node that built it and holds its files (`--node-name`).
    #[serde(default)]
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MicrovmRow {
    pub id: String,
    pub image_id: String,
    pub image_name: String,
    pub state: MicrovmState,
    pub state_reason: Option<String>,
    pub created_at: i64,
    pub state_changed_at: i64,
    pub last_activity_at: i64,
    /// Idle policy, max duration, payload size… as JSON (owned by the daemon).
    pub config: serde_json::Value,
    /// Metering counters as JSON.
    pub usage: serde_json::Value,
    #[serde(default)]
    pub labels: Labels,
    /// The node that owns it (runs it, or holds its snapshot): `--node-name`.
    #[serde(default)]
    pub node: String,
    /// Guest memory, what it takes of its node's capacity while not TERMINATED.
    #[serde(default)]
    pub memory_mib: i64,
}

/// A kilnd node as registered in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    /// `--node-name`, unique in the store.
    pub name: String,
    /// Where other nodes reach its API (`--advertise`).
    pub advertise: String,
    /// What it offers (memory, vCPUs, disk) as JSON (owned by the daemon).
    pub capacity: serde_json::Value,
    pub started_at: i64,
    /// Its last heartbeat (ms since the epoch).
    pub heartbeat_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    pub seq: i64,
    pub at_ms: i64,
    pub microvm_id: Option<String>,
    pub image_id: Option<String>,
    pub kind: String,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    pub reason: Option<String>,
}

/// The state a microVM is in (as stored) if it may become `to`; otherwise the error that
/// says why, and the caller writes nothing. Both backends' `set_state`.
fn check_transition(id: &str, from: &str, to: MicrovmState) -> Result<MicrovmState> {
    let from: MicrovmState = from
        .parse()
        .map_err(|e: kiln_types::ParseStateError| StoreError::Invalid(e.to_string()))?;
    if !from.can_become(to) {
        return Err(StoreError::Transition {
            id: id.to_string(),
            from,
            to,
        });
    }
    Ok(from)
}

/// Whether `vms` fit what `used` MiB leave of a node's `capacity` (none: always).
fn check_fits(node: &str, capacity: Option<i64>, used: i64, vms: &[MicrovmRow]) -> Result<()> {
    let Some(capacity) = capacity else {
        return Ok(());
    };
    let need: i64 = vms.iter().map(|v| v.memory_mib).sum();
    check_room(node, capacity, used, need)
}

fn check_room(node: &str, capacity: i64, used: i64, need: i64) -> Result<()> {
    if used + need > capacity {
        return Err(StoreError::NodeFull {
            node: node.to_string(),
            capacity,
            free: (capacity - used).max(0),
            need,
        });
    }
    Ok(())
}

/// The shared value holding when blob `id` was last claimed (ms).
pub fn blob_claim_key(id: &str) -> String {
    format!("{BLOB_CLAIM_PREFIX}{id}")
}

/// The shared value marking blob `id` as being removed (since when, ms).
pub fn blob_doomed_key(id: &str) -> String {
    format!("{BLOB_DOOMED_PREFIX}{id}")
}

pub const BLOB_CLAIM_PREFIX: &str = "blob-claim/";
pub const BLOB_DOOMED_PREFIX: &str = "blob-doomed/";

/// Whether a claim recorded as `value` is at or after `since` (a value that is no number
/// counts as fresh: never doom on doubt).
fn claimed_since(value: Option<&str>, since: i64) -> bool {
    value.is_some_and(|v| v.parse::<i64>().map_or(true, |at| at >= since))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What kilnd keeps about images, microVMs, events and webhooks, whatever holds it.
pub trait StateStore: Send {
    /// `"sqlite"` or `"postgres"`, for logs and `kiln doctor`.
    fn backend(&self) -> &'static str;
    /// The number of migrations applied.
    fn schema_version(&self) -> Result<i64>;
    /// Makes this process the only kilnd named `node` on the store for as long as it lives,
    /// or fails with [`StoreError::Busy`] when another holds the name. (SQLite: KILN_HOME is
    /// one kilnd's.)
    fn claim_node(&self, node: &str) -> Result<()>;
    /// Registers (or re-registers, after a restart) a node, its heartbeat now.
    fn upsert_node(&self, node: &NodeRow) -> Result<()>;
    /// Records a node's heartbeat; `false` when it is not registered.
    fn heartbeat(&self, node: &str, at_ms: i64) -> Result<bool>;
    /// Every registered node, by name.
    fn nodes(&self) -> Result<Vec<NodeRow>>;
    /// A value every node of a cluster shares (the ingress token keys), if set.
    fn shared_value(&self, name: &str) -> Result<Option<String>>;
    fn set_shared_value(&self, name: &str, value: &str) -> Result<()>;
    fn delete_shared_value(&self, name: &str) -> Result<()>;
    /// The names of the shared values that start with `prefix`, sorted.
    fn shared_value_names(&self, prefix: &str) -> Result<Vec<String>>;
    /// Removes a node's row (its microVM rows stay): whether there was one.
    fn remove_node(&self, name: &str) -> Result<bool>;
    /// Records that blobs `ids` are in use as of `at_ms` (an upload found or sent them)
    /// unless garbage collection is removing any: those are returned, and nothing is
    /// recorded. Serialized with [`StoreBackend::doom_blob`].
    fn claim_blobs(&self, ids: &[String], at_ms: i64) -> Result<Vec<String>>;
    /// Marks blob `id` as being removed (as of `at_ms`), unless it was claimed at or after
    /// `claimed_since_ms`: whether it is marked. One transaction with the check.
    fn doom_blob(&self, id: &str, claimed_since_ms: i64, at_ms: i64) -> Result<bool>;
    /// Forgets blob `id` once it is deleted: its claim, then its mark.
    fn bury_blob(&self, id: &str) -> Result<()> {
        self.delete_shared_value(&blob_claim_key(id))?;
        self.delete_shared_value(&blob_doomed_key(id))
    }

    /// Inserts or updates an image build; a status change is recorded as an event.
    fn upsert_image(&self, img: &ImageRow) -> Result<()>;
    /// An image by build id, or by name (its newest SUCCESSFUL build, else its newest).
    fn image(&self, id_or_name: &str) -> Result<Option<ImageRow>>;
    /// The newest build of every image name.
    fn images(&self) -> Result<Vec<ImageRow>>;
    /// Every build of every image, oldest first.
    fn all_images(&self) -> Result<Vec<ImageRow>>;
    fn delete_image(&self, id: &str) -> Result<bool>;
    /// MicroVMs of an image that are not TERMINATED.
    fn live_microvms_of_image(&self, image_id: &str) -> Result<Vec<String>>;
    /// MicroVMs not TERMINATED (what `--max-microvms` counts).
    fn count_live_microvms(&self) -> Result<usize>;
    /// Image builds still CREATING (what `--max-concurrent-builds` counts).
    fn count_building_images(&self) -> Result<usize>;

    /// Adds a microVM and its first event.
    fn insert_microvm(&self, vm: &MicrovmRow) -> Result<()>;
    /// Adds microVMs of one node in one transaction if their memory fits what its live ones
    /// leave of `capacity_mib` (no cap: `None`); otherwise [`StoreError::NodeFull`] and
    /// nothing is written. Claims on one node are serialized, by every node sharing the store.
    fn claim_and_insert(&self, vms: &[MicrovmRow], capacity_mib: Option<i64>) -> Result<()>;
    /// The node owning a microVM and its ownership epoch (raised by every move).
    fn ownership(&self, id: &str) -> Result<Option<(String, i64)>>;
    /// Moves a SUSPENDED microVM owned by `from` at `epoch` to node `to`, if `to` has room
    /// for it within `capacity_mib`: its new epoch. [`StoreError::Fenced`] when it is no
    /// longer SUSPENDED on `from` at `epoch`, and nothing is written.
    fn move_suspended(
        &self,
        id: &str,
        from: &str,
        epoch: i64,
        to: &str,
        capacity_mib: Option<i64>,
    ) -> Result<i64>;
    fn microvm(&self, id: &str) -> Result<Option<MicrovmRow>>;
    /// MicroVMs, oldest first, optionally of one state and one image (id or name).
    fn microvms(&self, state: Option<MicrovmState>, image: Option<&str>)
        -> Result<Vec<MicrovmRow>>;
    /// Moves a microVM to `to` and records the event, atomically, if the lifecycle graph
    /// allows it ([`MicrovmState::can_become`]); otherwise nothing is written.
    fn set_state(&self, id: &str, to: MicrovmState, reason: Option<&str>) -> Result<()>;
    /// Moves `last_activity_at` forward (never back).
    fn touch(&self, id: &str, at_ms: i64) -> Result<()>;
    /// [`StateStore::touch`] for many microVMs in one transaction.
    fn touch_many(&self, activity: &[(String, i64)]) -> Result<()>;
    /// Replaces a microVM's labels; `false` when there is no such microVM.
    fn set_microvm_labels(&self, id: &str, labels: &Labels) -> Result<bool>;
    /// Replaces an image build's labels; `false` when there is no such build.
    fn set_image_labels(&self, id: &str, labels: &Labels) -> Result<bool>;
    fn set_usage(&self, id: &str, usage: &serde_json::Value) -> Result<()>;
    /// Keeps (or with `None` forgets) what a restarted kilnd needs to take the microVM's
    /// running processes back. Written before the state that needs it.
    fn set_runtime(&self, id: &str, runtime: Option<&serde_json::Value>) -> Result<()>;
    /// What [`StateStore::set_runtime`] kept for a microVM.
    fn runtime(&self, id: &str) -> Result<Option<serde_json::Value>>;

    /// Adds a webhook whose cursor is the newest event now (it gets what happens next).
    fn insert_webhook(&self, w: &WebhookRow) -> Result<i64>;
    fn webhooks(&self) -> Result<Vec<WebhookRow>>;
    fn delete_webhook(&self, id: &str) -> Result<bool>;
    /// Moves a webhook's cursor forward (never back).
    fn set_webhook_cursor(&self, id: &str, seq: i64) -> Result<()>;

    /// Records an event about a microVM that is not a state change (e.g. `egress`).
    fn record_event(&self, microvm_id: &str, kind: &str, reason: &str) -> Result<()>;
    /// Calls `f` with an event's sequence number once it is committed (by this process or,
    /// with PostgreSQL, by any node). A wake-up, not a feed: readers then page with
    /// [`StateStore::events_since`].
    fn subscribe(&self, f: Box<dyn FnMut(i64) + Send>);
    /// The newest event's sequence number (0 when there is none).
    fn last_event_seq(&self) -> Result<i64>;
    /// Events after `cursor` (a sequence number), oldest first.
    fn events_since(&self, cursor: i64, limit: i64) -> Result<Vec<EventRow>>;
}

/// The store kilnd holds: one of the backends.
pub struct Store(Box<dyn StateStore>);

impl Store {
    /// The single-node store: a SQLite file (created, then migrated).
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store(Box::new(SqliteStore::open(path)?)))
    }

    /// The cluster's store: a PostgreSQL database (migrated on connect), given as a
    /// libpq-style URL or key=value string.
    pub fn connect(url: &str) -> Result<Store> {
        Self::connect_with_ca(url, None)
    }

    /// [`Store::connect`], over TLS when the URL says `sslmode=require` or `ca` is given:
    /// the server's certificate is verified against `ca` (PEM), else the system's CAs, for
    /// the URL's host name (stricter than libpq's `require`, which checks nothing).
    pub fn connect_with_ca(url: &str, ca: Option<&Path>) -> Result<Store> {
        Ok(Store(Box::new(PgStore::connect(url, ca)?)))
    }

    /// [`StateStore::subscribe`] with a closure.
    pub fn on_event(&self, f: impl FnMut(i64) + Send + 'static) {
        self.0.subscribe(Box::new(f));
    }
}

impl std::ops::Deref for Store {
    type Target = dyn StateStore;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

#[cfg(test)]
mod tests;
