//! The SQLite backend: one file under `KILN_HOME`, WAL, `synchronous = FULL`. Schema
//! versions are `PRAGMA user_version`.

use std::path::Path;

use kiln_types::{Labels, MicrovmState};
use rusqlite::{params, Connection, OptionalExtension};

use crate::{
    now_ms, EventRow, ImageRow, MicrovmRow, NodeRow, Result, StateStore, StoreError, WebhookRow,
};

/// Numbered schema migrations; never edit one that has shipped, append a new one.
pub(crate) const MIGRATIONS: &[&str] = &[
    "CREATE TABLE images (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        created_at INTEGER NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX images_by_name ON images(name, created_at);
    CREATE TABLE microvms (
        id TEXT PRIMARY KEY,
        image_id TEXT NOT NULL,
        image_name TEXT NOT NULL,
        state TEXT NOT NULL,
        state_reason TEXT,
        created_at INTEGER NOT NULL,
        state_changed_at INTEGER NOT NULL,
        last_activity_at INTEGER NOT NULL,
        config TEXT NOT NULL,
        usage TEXT NOT NULL
    );
    CREATE INDEX microvms_by_state ON microvms(state);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        microvm_id TEXT,
        image_id TEXT,
        kind TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT,
        reason TEXT
    );",
    // What kilnd needs to take a running microVM back after a restart (kiln-vmm's VmRecord).
    "ALTER TABLE microvms ADD COLUMN runtime TEXT;",
    // Labels (kiln_types::Labels as a JSON object), set by clients.
    "ALTER TABLE microvms ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE images ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';",
    // Webhooks: where events go; `cursor` is the last event seq handed to its deliveries.
    "CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        description TEXT,
        secret TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        cursor INTEGER NOT NULL
    );",
    // Nodes: who owns a microVM and its memory (`''` for rows from before, the single
    // node's), which node holds an image's files, and the registry of nodes with heartbeats.
    "ALTER TABLE microvms ADD COLUMN node TEXT NOT NULL DEFAULT '';
     ALTER TABLE microvms ADD COLUMN memory_mib INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE images ADD COLUMN node TEXT NOT NULL DEFAULT '';
     CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        advertise TEXT NOT NULL,
        capacity TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        heartbeat_at INTEGER NOT NULL
     );
     CREATE TABLE shared_values (name TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // Ownership epochs: raised each time a microVM moves to another node.
    "ALTER TABLE microvms ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;",
];

/// Guest memory the microVMs of `node` that are not TERMINATED hold.
fn used_mib(tx: &rusqlite::Transaction<'_>, node: &str) -> Result<i64> {
    Ok(tx.query_row(
        "SELECT COALESCE(SUM(memory_mib), 0) FROM microvms WHERE node = ?1 AND state != 'TERMINATED'",
        [node],
        |r| r.get(0),
    )?)
}

pub struct SqliteStore {
    conn: Connection,
}

/// An images row's columns, as read.
type ImageColumns = (
    String,
    String,
    String,
    Option<String>,
    i64,
    String,
    String,
    String,
);

/// A state column, read as the enum (a value no kiln wrote is an error, not a guess).
fn state_column(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<MicrovmState> {
    let text: String = r.get(i)?;
    text.parse().map_err(|e: kiln_types::ParseStateError| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = SqliteStore { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageColumns> {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
        ))
    }

    fn to_image(t: ImageColumns) -> Result<ImageRow> {
        Ok(ImageRow {
            id: t.0,
            name: t.1,
            status: t
                .2
                .parse()
                .map_err(|e: kiln_types::ParseImageStatusError| {
                    StoreError::Invalid(e.to_string())
                })?,
            reason: t.3,
            created_at: t.4,
            record: serde_json::from_str(&t.5)?,
            labels: serde_json::from_str(&t.6)?,
            node: t.7,
        })
    }

    fn microvm_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MicrovmRow> {
        let config: String = r.get(8)?;
        let usage: String = r.get(9)?;
        let labels: String = r.get(10)?;
        Ok(MicrovmRow {
            id: r.get(0)?,
            image_id: r.get(1)?,
            image_name: r.get(2)?,
            state: state_column(r, 3)?,
            state_reason: r.get(4)?,
            created_at: r.get(5)?,
            state_changed_at: r.get(6)?,
            last_activity_at: r.get(7)?,
            config: serde_json::from_str(&config).unwrap_or(serde_json::Value::Null),
            usage: serde_json::from_str(&usage).unwrap_or(serde_json::Value::Null),
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            node: r.get(11)?,
            memory_mib: r.get(12)?,
        })
    }

    const MICROVM_COLS: &'static str =
        "SELECT id, image_id, image_name, state, state_reason, created_at, state_changed_at, last_activity_at, config, usage, labels, node, memory_mib FROM microvms";
}

impl StateStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn claim_node(&self, _node: &str) -> Result<()> {
        Ok(())
    }

    fn upsert_node(&self, n: &NodeRow) -> Result<()> {
        self.conn.execute(
            "INSERT INTO nodes (name, advertise, capacity, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO UPDATE SET advertise = ?2, capacity = ?3, started_at = ?4, heartbeat_at = ?5",
            params![n.name, n.advertise, serde_json::to_string(&n.capacity)?, n.started_at, n.heartbeat_at],
        )?;
        Ok(())
    }

    fn heartbeat(&self, node: &str, at_ms: i64) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE nodes SET heartbeat_at = MAX(heartbeat_at, ?2) WHERE name = ?1",
            params![node, at_ms],
        )?;
        Ok(n == 1)
    }

    fn shared_value(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM shared_values WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_shared_value(&self, name: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO shared_values (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = ?2",
            params![name, value],
        )?;
        Ok(())
    }

    fn delete_shared_value(&self, name: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM shared_values WHERE name = ?1", [name])?;
        Ok(())
    }

    fn shared_value_names(&self, prefix: &str) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT name FROM shared_values WHERE substr(name, 1, length(?1)) = ?1 ORDER BY name",
        )?;
        let names = stmt
            .query_map([prefix], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(names)
    }

    fn claim_blobs(&self, ids: &[String], at_ms: i64) -> Result<Vec<String>> {
        let tx = self.conn.unchecked_transaction()?;
        let mut doomed = Vec::new();
        for id in ids {
            let marked: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM shared_values WHERE name = ?1",
                    [crate::blob_doomed_key(id)],
                    |r| r.get(0),
                )
                .optional()?;
            if marked.is_some() {
                doomed.push(id.clone());
            }
        }
        if doomed.is_empty() {
            for id in ids {
                tx.execute(
                    "INSERT INTO shared_values (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = ?2",
                    params![crate::blob_claim_key(id), at_ms.to_string()],
                )?;
            }
            tx.commit()?;
        }
        Ok(doomed)
    }

    fn doom_blob(&self, id: &str, claimed_since_ms: i64, at_ms: i64) -> Result<bool> {
        let tx = self.conn.unchecked_transaction()?;
        let claim: Option<String> = tx
            .query_row(
                "SELECT value FROM shared_values WHERE name = ?1",
                [crate::blob_claim_key(id)],
                |r| r.get(0),
            )
            .optional()?;
        if crate::claimed_since(claim.as_deref(), claimed_since_ms) {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO shared_values (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
            params![crate::blob_doomed_key(id), at_ms.to_string()],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn remove_node(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM nodes WHERE name = ?1", [name])?
            == 1)
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT name, advertise, capacity, started_at, heartbeat_at FROM nodes ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let capacity: String = r.get(2)?;
                Ok(NodeRow {
                    name: r.get(0)?,
                    advertise: r.get(1)?,
                    capacity: serde_json::from_str(&capacity).unwrap_or(serde_json::Value::Null),
                    started_at: r.get(3)?,
                    heartbeat_at: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn upsert_image(&self, img: &ImageRow) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        let previous: Option<String> = tx
            .query_row("SELECT status FROM images WHERE id = ?1", [&img.id], |r| {
                r.get(0)
            })
            .optional()?;
        tx.execute(
            "INSERT INTO images (id, name, status, reason, created_at, record, labels, node) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(id) DO UPDATE SET status = ?3, reason = ?4, record = ?6",
            params![img.id, img.name, img.status.as_str(), img.reason, img.created_at, serde_json::to_string(&img.record)?,
                    serde_json::to_string(&img.labels)?, img.node],
        )?;
        if previous.as_deref() != Some(img.status.as_str()) {
            tx.execute(
                "INSERT INTO events (at_ms, image_id, kind, from_state, to_state, reason) VALUES (?1, ?2, 'image', ?3, ?4, ?5)",
                params![now_ms(), img.id, previous, img.status.as_str(), img.reason],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// An image by build id, or by name (its newest SUCCESSFUL build, else its newest).
    fn image(&self, id_or_name: &str) -> Result<Option<ImageRow>> {
        let cols = "SELECT id, name, status, reason, created_at, record, labels, node FROM images";
        let by_id = self
            .conn
            .query_row(
                &format!("{cols} WHERE id = ?1"),
                [id_or_name],
                Self::image_from_row,
            )
            .optional()?;
        let found = match by_id {
            Some(t) => Some(t),
            None => self
                .conn
                .query_row(
                    &format!("{cols} WHERE name = ?1 ORDER BY (status = 'SUCCESSFUL') DESC, created_at DESC, id DESC LIMIT 1"),
                    [id_or_name],
                    Self::image_from_row,
                )
                .optional()?,
        };
        found.map(Self::to_image).transpose()
    }

    /// The newest build of every image name.
    fn images(&self) -> Result<Vec<ImageRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, status, reason, created_at, record, labels, node FROM images i WHERE id = (
                SELECT id FROM images j WHERE j.name = i.name ORDER BY (status = 'SUCCESSFUL') DESC, created_at DESC, id DESC LIMIT 1
            ) ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], Self::image_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(Self::to_image).collect()
    }

    /// Every build of every image, oldest first.
    fn all_images(&self) -> Result<Vec<ImageRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, status, reason, created_at, record, labels, node FROM images ORDER BY created_at, id",
        )?;
        let rows = stmt
            .query_map([], Self::image_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(Self::to_image).collect()
    }

    fn delete_image(&self, id: &str) -> Result<bool> {
        let tx = self.conn.unchecked_transaction()?;
        let n = tx.execute("DELETE FROM images WHERE id = ?1", [id])?;
        if n > 0 {
            tx.execute("INSERT INTO events (at_ms, image_id, kind, reason) VALUES (?1, ?2, 'image', 'deleted')", params![now_ms(), id])?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// MicroVMs of an image that are not TERMINATED.
    fn live_microvms_of_image(&self, image_id: &str) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT id FROM microvms WHERE image_id = ?1 AND state != 'TERMINATED' ORDER BY id",
        )?;
        let ids = stmt
            .query_map([image_id], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(ids)
    }

    /// MicroVMs not TERMINATED (what `--max-microvms` counts).
    fn count_live_microvms(&self) -> Result<usize> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM microvms WHERE state != 'TERMINATED'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    /// Image builds still CREATING (what `--max-concurrent-builds` counts).
    fn count_building_images(&self) -> Result<usize> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM images WHERE status = 'CREATING'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    fn insert_microvm(&self, vm: &MicrovmRow) -> Result<()> {
        self.claim_and_insert(std::slice::from_ref(vm), None)
    }

    fn ownership(&self, id: &str) -> Result<Option<(String, i64)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT node, epoch FROM microvms WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    fn move_suspended(
        &self,
        id: &str,
        from: &str,
        epoch: i64,
        to: &str,
        capacity_mib: Option<i64>,
    ) -> Result<i64> {
        let tx = self.conn.unchecked_transaction()?;
        let need: Option<i64> = tx
            .query_row(
                "SELECT memory_mib FROM microvms WHERE id = ?1 AND node = ?2 AND epoch = ?3 AND state = 'SUSPENDED'",
                params![id, from, epoch],
                |r| r.get(0),
            )
            .optional()?;
        let fenced = || StoreError::Fenced {
            id: id.to_string(),
            from: from.to_string(),
            epoch,
        };
        let need = need.ok_or_else(fenced)?;
        if let Some(capacity) = capacity_mib {
            let used = used_mib(&tx, to)?;
            crate::check_room(to, capacity, used, need)?;
        }
        tx.execute(
            "UPDATE microvms SET node = ?1, epoch = epoch + 1 WHERE id = ?2",
            params![to, id],
        )?;
        tx.commit()?;
        Ok(epoch + 1)
    }

    fn claim_and_insert(&self, vms: &[MicrovmRow], capacity_mib: Option<i64>) -> Result<()> {
        let Some(node) = vms.first().map(|v| v.node.as_str()) else {
            return Ok(());
        };
        let tx = self.conn.unchecked_transaction()?;
        if capacity_mib.is_some() {
            let used = used_mib(&tx, node)?;
            crate::check_fits(node, capacity_mib, used, vms)?;
        }
        for vm in vms {
            tx.execute(
                "INSERT INTO microvms (id, image_id, image_name, state, state_reason, created_at, state_changed_at, last_activity_at, config, usage, labels, node, memory_mib)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    vm.id, vm.image_id, vm.image_name, vm.state.as_str(), vm.state_reason, vm.created_at, vm.state_changed_at,
                    vm.last_activity_at, serde_json::to_string(&vm.config)?, serde_json::to_string(&vm.usage)?,
                    serde_json::to_string(&vm.labels)?, vm.node, vm.memory_mib
                ],
            )?;
            tx.execute(
                "INSERT INTO events (at_ms, microvm_id, image_id, kind, to_state, reason) VALUES (?1, ?2, ?3, 'microvm', ?4, ?5)",
                params![now_ms(), vm.id, vm.image_id, vm.state.as_str(), vm.state_reason],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn microvm(&self, id: &str) -> Result<Option<MicrovmRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("{} WHERE id = ?1", Self::MICROVM_COLS),
                [id],
                Self::microvm_from_row,
            )
            .optional()?)
    }

    fn microvms(
        &self,
        state: Option<MicrovmState>,
        image: Option<&str>,
    ) -> Result<Vec<MicrovmRow>> {
        let state = state.map(MicrovmState::as_str);
        let mut stmt = self.conn.prepare(&format!(
            "{} WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR image_id = ?2 OR image_name = ?2) ORDER BY created_at, id",
            Self::MICROVM_COLS
        ))?;
        let rows = stmt
            .query_map(params![state, image], Self::microvm_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Moves a microVM to `to` and records the event, atomically, if the lifecycle graph
    /// allows it ([`MicrovmState::can_become`]); otherwise nothing is written.
    fn set_state(&self, id: &str, to: MicrovmState, reason: Option<&str>) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        let from: String = tx
            .query_row("SELECT state FROM microvms WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| StoreError::NoSuchMicrovm(id.to_string()))?;
        let from = crate::check_transition(id, &from, to)?;
        let now = now_ms();
        tx.execute(
            "UPDATE microvms SET state = ?2, state_reason = ?3, state_changed_at = ?4 WHERE id = ?1",
            params![id, to.as_str(), reason, now],
        )?;
        tx.execute(
            "INSERT INTO events (at_ms, microvm_id, kind, from_state, to_state, reason) VALUES (?1, ?2, 'microvm', ?3, ?4, ?5)",
            params![now, id, from.as_str(), to.as_str(), reason],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn touch(&self, id: &str, at_ms: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE microvms SET last_activity_at = MAX(last_activity_at, ?2) WHERE id = ?1",
            params![id, at_ms],
        )?;
        Ok(())
    }

    /// [`StateStore::touch`] for many microVMs in one transaction (activity counted in memory).
    fn touch_many(&self, activity: &[(String, i64)]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE microvms SET last_activity_at = MAX(last_activity_at, ?2) WHERE id = ?1",
            )?;
            for (id, at) in activity {
                stmt.execute(params![id, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Adds a webhook whose cursor is the newest event now (it gets what happens next).
    fn insert_webhook(&self, w: &WebhookRow) -> Result<i64> {
        let tx = self.conn.unchecked_transaction()?;
        let newest: i64 =
            tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
        tx.execute(
            "INSERT INTO webhooks (id, url, events, description, secret, created_at, cursor) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![w.id, w.url, serde_json::to_string(&w.events)?, w.description, w.secret, w.created_at, newest],
        )?;
        tx.commit()?;
        Ok(newest)
    }

    fn webhooks(&self) -> Result<Vec<WebhookRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, url, events, description, secret, created_at, cursor FROM webhooks ORDER BY created_at, id",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let events: String = r.get(2)?;
                Ok(WebhookRow {
                    id: r.get(0)?,
                    url: r.get(1)?,
                    events: serde_json::from_str(&events).unwrap_or_default(),
                    description: r.get(3)?,
                    secret: r.get(4)?,
                    created_at: r.get(5)?,
                    cursor: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn delete_webhook(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM webhooks WHERE id = ?1", [id])?
            == 1)
    }

    fn set_webhook_cursor(&self, id: &str, seq: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE webhooks SET cursor = MAX(cursor, ?2) WHERE id = ?1",
            params![id, seq],
        )?;
        Ok(())
    }

    /// Replaces a microVM's labels; `false` when there is no such microVM.
    fn set_microvm_labels(&self, id: &str, labels: &Labels) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE microvms SET labels = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(labels)?],
        )?;
        Ok(n == 1)
    }

    /// Replaces an image build's labels; `false` when there is no such build.
    fn set_image_labels(&self, id: &str, labels: &Labels) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE images SET labels = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(labels)?],
        )?;
        Ok(n == 1)
    }

    fn set_usage(&self, id: &str, usage: &serde_json::Value) -> Result<()> {
        self.conn.execute(
            "UPDATE microvms SET usage = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(usage)?],
        )?;
        Ok(())
    }

    /// Keeps (or with `None` forgets) what a restarted kilnd needs to take the microVM's
    /// running processes back. Written before the state that needs it.
    fn set_runtime(&self, id: &str, runtime: Option<&serde_json::Value>) -> Result<()> {
        let text = runtime.map(serde_json::to_string).transpose()?;
        self.conn.execute(
            "UPDATE microvms SET runtime = ?2 WHERE id = ?1",
            params![id, text],
        )?;
        Ok(())
    }

    /// What [`StateStore::set_runtime`] kept for a microVM.
    fn runtime(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT runtime FROM microvms WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .flatten();
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }

    /// Records an event about a microVM that is not a state change (e.g. `egress`).
    fn record_event(&self, microvm_id: &str, kind: &str, reason: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO events (at_ms, microvm_id, kind, reason) VALUES (?1, ?2, ?3, ?4)",
            params![now_ms(), microvm_id, kind, reason],
        )?;
        Ok(())
    }

    /// Events after `cursor` (a sequence number), oldest first.
    /// Calls `f` with an event's sequence number whenever one is recorded. It runs inside the
    /// recording transaction: a reader that takes the store (its lock) after it sees the event
    /// committed, or not at all if the transaction rolled back.
    fn subscribe(&self, mut f: Box<dyn FnMut(i64) + Send>) {
        self.conn.update_hook(Some(
            move |action: rusqlite::hooks::Action, _db: &str, table: &str, rowid: i64| {
                if action == rusqlite::hooks::Action::SQLITE_INSERT && table == "events" {
                    f(rowid);
                }
            },
        ));
    }

    /// The newest event's sequence number (0 when there is none).
    fn last_event_seq(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?)
    }

    fn events_since(&self, cursor: i64, limit: i64) -> Result<Vec<EventRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, at_ms, microvm_id, image_id, kind, from_state, to_state, reason FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![cursor, limit], |r| {
                Ok(EventRow {
                    seq: r.get(0)?,
                    at_ms: r.get(1)?,
                    microvm_id: r.get(2)?,
                    image_id: r.get(3)?,
                    kind: r.get(4)?,
                    from_state: r.get(5)?,
                    to_state: r.get(6)?,
                    reason: r.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}
