use super::*;
use rusqlite::Connection;
use std::time::Duration;

/// The admin connection string of the test PostgreSQL (scripts/test.sh starts one).
fn pg_admin() -> Option<String> {
    let url = std::env::var("KILN_TEST_DATABASE_URL").ok();
    if url.is_none() {
        eprintln!("PostgreSQL backend not tested: KILN_TEST_DATABASE_URL is not set (scripts/test.sh sets it)");
    }
    url
}

/// A new, empty database on the test PostgreSQL; its connection string.
fn fresh_database(admin: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "kiln_t_{}_{}_{}",
        std::process::id(),
        now_ms(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut c = postgres::Client::connect(admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    format!("{admin} dbname={name}")
}

/// Runs `test` on a fresh SQLite store and, where the test PostgreSQL is set, a fresh
/// PostgreSQL store: the two backends behave the same.
fn each_backend(test: impl Fn(&Store)) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(&dir.path().join("kiln.db")).unwrap();
    eprintln!("backend: {}", sqlite.backend());
    test(&sqlite);
    if let Some(admin) = pg_admin() {
        let pg = Store::connect(&fresh_database(&admin)).unwrap();
        eprintln!("backend: {}", pg.backend());
        test(&pg);
    }
}

fn vm(id: &str, image: &str) -> MicrovmRow {
    MicrovmRow {
        id: id.into(),
        image_id: image.into(),
        image_name: "app".into(),
        state: MicrovmState::Pending,
        state_reason: None,
        created_at: 1,
        state_changed_at: 1,
        last_activity_at: 1,
        config: serde_json::json!({"maxDurationSeconds": 60}),
        usage: serde_json::json!({}),
        labels: [("team".to_string(), "a".to_string())]
            .into_iter()
            .collect(),
        node: "n1".into(),
        memory_mib: 512,
    }
}

#[test]
fn migrates_once_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            sqlite::MIGRATIONS.len() as i64
        );
        store.insert_microvm(&vm("a", "img-1")).unwrap();
        store.insert_microvm(&vm("b", "img-1")).unwrap();
    }
    let store = Store::open(&path).unwrap();
    // A state no kiln wrote is an error when read, not a guess.
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE microvms SET state = 'ON_FIRE' WHERE id = 'b'", [])
        .unwrap();
    assert!(store.microvm("b").is_err());
    assert_eq!(
        store.microvm("a").unwrap().unwrap().config["maxDurationSeconds"],
        60
    );
}

#[test]
fn refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    drop(Store::open(&path).unwrap());
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    assert!(matches!(
        Store::open(&path),
        Err(StoreError::TooNew { found: 99, .. })
    ));
}

#[test]
fn state_changes_are_recorded_as_events() {
    each_backend(|store| {
        store.insert_microvm(&vm("a", "img-1")).unwrap();
        store.set_state("a", MicrovmState::Running, None).unwrap();
        store
            .set_state("a", MicrovmState::Terminated, Some("run hook failed"))
            .unwrap();
        let events = store.events_since(0, 100).unwrap();
        let states: Vec<_> = events
            .iter()
            .map(|e| (e.from_state.clone(), e.to_state.clone()))
            .collect();
        assert_eq!(
            states,
            vec![
                (None, Some("PENDING".into())),
                (Some("PENDING".into()), Some("RUNNING".into())),
                (Some("RUNNING".into()), Some("TERMINATED".into()))
            ]
        );
        assert_eq!(events[2].reason.as_deref(), Some("run hook failed"));
        assert_eq!(
            store.events_since(events[1].seq, 100).unwrap().len(),
            1,
            "cursor skips what was seen"
        );
        let vm = store.microvm("a").unwrap().unwrap();
        assert_eq!(
            (vm.state, vm.state_reason.as_deref()),
            (MicrovmState::Terminated, Some("run hook failed"))
        );
    });
}

#[test]
fn a_transition_the_lifecycle_forbids_writes_nothing() {
    each_backend(|store| {
        store.insert_microvm(&vm("a", "img-1")).unwrap();
        let before = store.events_since(0, 100).unwrap().len();
        // PENDING cannot be RESUMING (only a fork's clone goes PENDING → SUSPENDED); TERMINATED
        // is never left.
        let err = store
            .set_state("a", MicrovmState::Resuming, Some("x"))
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Transition {
                    from: MicrovmState::Pending,
                    to: MicrovmState::Resuming,
                    ..
                }
            ),
            "{err}"
        );
        store
            .set_state("a", MicrovmState::Terminated, None)
            .unwrap();
        let err = store
            .set_state("a", MicrovmState::Running, None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "microVM a is TERMINATED; it cannot become RUNNING"
        );
        let vm = store.microvm("a").unwrap().unwrap();
        assert_eq!(vm.state, MicrovmState::Terminated);
        assert_eq!(store.events_since(0, 100).unwrap().len(), before + 1);
        assert!(matches!(
            store.set_state("nope", MicrovmState::Running, None),
            Err(StoreError::NoSuchMicrovm(_))
        ));
    });
}

#[test]
fn images_resolve_by_name_to_the_newest_good_build() {
    each_backend(|store| {
        let img = |id: &str, status: ImageStatus, at: i64| ImageRow {
            id: id.into(),
            name: "app".into(),
            status,
            reason: None,
            created_at: at,
            record: serde_json::json!({}),
            labels: Labels::new(),
            node: "n1".into(),
        };
        store
            .upsert_image(&img("app-1", ImageStatus::Successful, 1))
            .unwrap();
        store
            .upsert_image(&img("app-2", ImageStatus::Failed, 2))
            .unwrap();
        assert_eq!(store.image("app").unwrap().unwrap().id, "app-1");
        assert_eq!(store.image("app").unwrap().unwrap().node, "n1");
        assert_eq!(
            store.image("app-2").unwrap().unwrap().status,
            ImageStatus::Failed
        );
        assert_eq!(store.images().unwrap().len(), 1);
        store.insert_microvm(&vm("v", "app-1")).unwrap();
        assert_eq!(store.live_microvms_of_image("app-1").unwrap(), vec!["v"]);
        store
            .set_state("v", MicrovmState::Terminated, None)
            .unwrap();
        assert!(store.live_microvms_of_image("app-1").unwrap().is_empty());
        assert!(store.delete_image("app-2").unwrap());
        assert!(store.image("app-2").unwrap().is_none());
    });
}

#[test]
fn a_runtime_record_is_kept_until_forgotten_and_old_databases_gain_the_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    {
        // A database from before the column: only the first migration applied.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(sqlite::MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO microvms (id, image_id, image_name, state, created_at, state_changed_at, \
             last_activity_at, config, usage) VALUES ('a', 'img-1', 'app', 'PENDING', 1, 1, 1, '{}', '{}')",
            [],
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.runtime("a").unwrap(), None);
    // Later migrations' columns: labels start empty.
    assert_eq!(store.microvm("a").unwrap().unwrap().labels, Labels::new());
    let record = serde_json::json!({"qemu": {"pid": 42}});
    store.set_runtime("a", Some(&record)).unwrap();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.runtime("a").unwrap(), Some(record));
    store.set_runtime("a", None).unwrap();
    assert_eq!(store.runtime("a").unwrap(), None);
    assert_eq!(store.runtime("missing").unwrap(), None);
}

#[test]
fn activity_is_written_in_one_transaction_and_never_goes_back() {
    each_backend(|store| {
        store.insert_microvm(&vm("a", "img-1")).unwrap();
        store.insert_microvm(&vm("b", "img-1")).unwrap();
        store
            .touch_many(&[("a".into(), 50), ("b".into(), 70), ("nope".into(), 9)])
            .unwrap();
        store.touch_many(&[("a".into(), 20)]).unwrap();
        assert_eq!(store.microvm("a").unwrap().unwrap().last_activity_at, 50);
        assert_eq!(store.microvm("b").unwrap().unwrap().last_activity_at, 70);
    });
}

#[test]
fn both_backends_have_the_same_migrations() {
    assert_eq!(sqlite::MIGRATIONS.len(), pg::MIGRATIONS.len());
}

#[test]
fn postgres_migrates_once_when_nodes_start_together() {
    let Some(admin) = pg_admin() else { return };
    let url = fresh_database(&admin);
    let nodes: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || Store::connect(&url).map(|s| s.schema_version()))
        })
        .collect();
    for n in nodes {
        let version = n.join().unwrap().unwrap().unwrap();
        assert_eq!(version, pg::MIGRATIONS.len() as i64);
    }
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.execute("UPDATE kiln_schema SET version = 99", &[])
        .unwrap();
    assert!(matches!(
        Store::connect(&url),
        Err(StoreError::TooNew { found: 99, .. })
    ));
}

#[test]
fn postgres_unreachable_is_a_clear_error() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Err(err) = Store::connect(&format!("host=127.0.0.1 port={port} user=kiln dbname=kiln"))
    else {
        panic!("connected to a port nothing listens on");
    };
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("Cannot reach PostgreSQL at 127.0.0.1:{port}/kiln")
    );
    assert!(matches!(
        Store::connect("postgresql://[nonsense"),
        Err(StoreError::Invalid(_))
    ));
}

/// The full error chain, as kilnd shows it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

#[test]
fn postgres_over_tls_verifies_the_server_and_carries_the_store() {
    let Some(admin) = pg_admin() else { return };
    let Ok(ca) = std::env::var("KILN_TEST_DATABASE_CA") else {
        eprintln!("TLS to PostgreSQL not tested: KILN_TEST_DATABASE_CA is not set");
        return;
    };
    let ca = std::path::PathBuf::from(ca);
    // The test server refuses the role kiln_tls without TLS.
    let url = fresh_database(&admin).replace("user=kiln ", "user=kiln_tls ");
    let Err(plain) = Store::connect(&url) else {
        panic!("kiln_tls connected without TLS: the test proves nothing");
    };
    assert!(chain(&plain).contains("pg_hba.conf"), "{}", chain(&plain));
    // With the CA: TLS, verified, and the store works over it (events' LISTEN too).
    let store = Store::connect_with_ca(&url, Some(&ca)).unwrap();
    store.insert_microvm(&vm("a", "img-1")).unwrap();
    assert_eq!(store.microvm("a").unwrap().unwrap().image_id, "img-1");
    let store = Store::connect(&format!("{url} sslmode=require"));
    // sslmode=require alone trusts the system's CAs, which do not know the test CA.
    let Err(untrusted) = store else {
        panic!("a certificate from an unknown CA was accepted");
    };
    let text = chain(&untrusted);
    assert!(
        text.contains("Cannot reach PostgreSQL at 127.0.0.1:"),
        "{text}"
    );
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    // A CA file with no certificate in it says so.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let Err(e) = Store::connect_with_ca(&url, Some(&empty)) else {
        panic!("an empty CA file was accepted");
    };
    assert!(
        matches!(&e, StoreError::Tls(m) if m.contains("holds no PEM certificate")),
        "{e}"
    );
}

#[test]
fn postgres_reconnects_after_losing_its_connection() {
    let Some(admin) = pg_admin() else { return };
    let url = fresh_database(&admin);
    let store = Store::connect(&url).unwrap();
    store.insert_microvm(&vm("a", "img-1")).unwrap();
    let db = url.rsplit("dbname=").next().unwrap().to_string();
    let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    let killed = c
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&db],
        )
        .unwrap();
    assert_eq!(killed.len(), 1, "the store's one connection");
    // The call that finds the connection gone says so; the next one connects again.
    if let Err(e) = store.microvm("a") {
        assert!(e.is_unavailable(), "{e:?}");
    }
    assert_eq!(store.microvm("a").unwrap().unwrap().id, "a");
}

#[test]
fn postgres_events_from_one_node_wake_another() {
    let Some(admin) = pg_admin() else { return };
    let url = fresh_database(&admin);
    let a = Store::connect(&url).unwrap();
    let b = Store::connect(&url).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    b.on_event(move |seq| {
        let _ = tx.send(seq);
    });
    // The listener first reports the newest event (none yet: 0).
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
    a.insert_microvm(&vm("a", "img-1")).unwrap();
    a.set_state("a", MicrovmState::Running, None).unwrap();
    let newest = a.last_event_seq().unwrap();
    let mut seen = 0;
    while seen < newest {
        seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    assert_eq!(seen, newest);
}

#[test]
fn postgres_event_numbers_follow_commit_order() {
    // A reader paging by sequence number while four nodes write must see every event once:
    // if numbers were not handed out in commit order, it would skip one that committed late.
    let Some(admin) = pg_admin() else { return };
    let url = fresh_database(&admin);
    let setup = Store::connect(&url).unwrap();
    for n in 0..4 {
        setup
            .insert_microvm(&vm(&format!("vm{n}"), "img-1"))
            .unwrap();
    }
    let start = setup.last_event_seq().unwrap();
    let writers: Vec<_> = (0..4)
        .map(|n| {
            let url = url.clone();
            std::thread::spawn(move || {
                let store = Store::connect(&url).unwrap();
                for i in 0..50 {
                    store
                        .record_event(&format!("vm{n}"), "test", &i.to_string())
                        .unwrap();
                }
            })
        })
        .collect();
    let (mut cursor, mut seen) = (start, Vec::new());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 200 && std::time::Instant::now() < deadline {
        for e in setup.events_since(cursor, 1000).unwrap() {
            cursor = e.seq;
            seen.push(e.seq);
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    seen.extend(
        setup
            .events_since(cursor, 1000)
            .unwrap()
            .iter()
            .map(|e| e.seq),
    );
    let all: Vec<i64> = setup
        .events_since(start, 1000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(all.len(), 200);
    assert_eq!(
        seen, all,
        "the tailing reader saw every event, in order, once"
    );
}

#[test]
fn postgres_calls_work_from_tokio_workers_of_either_flavor() {
    let Some(admin) = pg_admin() else { return };
    // As kilnd holds it: behind a mutex, shared by the tasks.
    let store = std::sync::Arc::new(std::sync::Mutex::new(
        Store::connect(&fresh_database(&admin)).unwrap(),
    ));
    for rt in [
        tokio::runtime::Builder::new_multi_thread().build().unwrap(),
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap(),
    ] {
        let store = store.clone();
        let n = rt.block_on(async move {
            tokio::spawn(async move { store.lock().unwrap().count_live_microvms().unwrap() })
                .await
                .unwrap()
        });
        assert_eq!(n, 0);
    }
}

#[test]
fn nodes_register_heartbeat_and_own_their_microvms() {
    each_backend(|store| {
        let node = |name: &str, at: i64| NodeRow {
            name: name.into(),
            advertise: format!("127.0.0.1:{at}"),
            capacity: serde_json::json!({"memoryMib": 1024}),
            started_at: at,
            heartbeat_at: at,
        };
        store.upsert_node(&node("n2", 5)).unwrap();
        store.upsert_node(&node("n1", 1)).unwrap();
        assert!(store.heartbeat("n1", 9).unwrap());
        assert!(
            store.heartbeat("n1", 3).unwrap(),
            "an old beat never moves it back"
        );
        assert!(!store.heartbeat("nope", 9).unwrap());
        let nodes = store.nodes().unwrap();
        assert_eq!(
            nodes
                .iter()
                .map(|n| (n.name.as_str(), n.heartbeat_at))
                .collect::<Vec<_>>(),
            [("n1", 9), ("n2", 5)]
        );
        assert_eq!(nodes[0].capacity["memoryMib"], 1024);
        // A restart registers again: a new start, the same name.
        store.upsert_node(&node("n1", 20)).unwrap();
        assert_eq!(store.nodes().unwrap()[0].started_at, 20);
        store.insert_microvm(&vm("a", "img-1")).unwrap();
        assert_eq!(store.microvm("a").unwrap().unwrap().node, "n1");
        assert_eq!(store.shared_value("keys").unwrap(), None);
        store.set_shared_value("keys", "one").unwrap();
        store.set_shared_value("keys", "two").unwrap();
        assert_eq!(store.shared_value("keys").unwrap().as_deref(), Some("two"));
        store.delete_shared_value("keys").unwrap();
        assert_eq!(store.shared_value("keys").unwrap(), None);
        // By prefix, sorted; `%` and `_` are plain characters in a prefix.
        for name in [
            "cached/img-1/b",
            "cached/img-1/a",
            "cached/img-2/a",
            "cachedx",
            "c%",
        ] {
            store.set_shared_value(name, "1").unwrap();
        }
        assert_eq!(
            store.shared_value_names("cached/").unwrap(),
            ["cached/img-1/a", "cached/img-1/b", "cached/img-2/a"]
        );
        assert_eq!(store.shared_value_names("c%").unwrap(), ["c%"]);
        assert!(store.shared_value_names("none/").unwrap().is_empty());
        // A node that left: its row goes, its microVMs' rows stay.
        let before = store.microvms(None, None).unwrap().len();
        assert!(store.remove_node("n1").unwrap());
        assert!(!store.remove_node("n1").unwrap());
        assert!(store.nodes().unwrap().iter().all(|n| n.name != "n1"));
        assert_eq!(store.microvms(None, None).unwrap().len(), before);
    });
}

#[test]
fn postgres_one_kilnd_per_node_name() {
    let Some(admin) = pg_admin() else { return };
    let url = fresh_database(&admin);
    let a = Store::connect(&url).unwrap();
    let b = Store::connect(&url).unwrap();
    a.claim_node("n1").unwrap();
    b.claim_node("n2").unwrap();
    let err = b.claim_node("n1").unwrap_err();
    assert!(matches!(err, StoreError::Busy(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("a kilnd named \"n1\" already runs"),
        "{err}"
    );
    // The name is free again once its holder is gone.
    drop(a);
    let c = Store::connect(&url).unwrap();
    c.claim_node("n1").unwrap();
}

#[test]
fn a_claim_that_does_not_fit_a_nodes_memory_writes_nothing() {
    each_backend(|store| {
        let (a, b, c) = (vm("a", "img-1"), vm("b", "img-1"), vm("c", "img-1"));
        store.claim_and_insert(&[a, b], Some(1536)).unwrap();
        let events = store.last_event_seq().unwrap();
        // 1024 of 1536 used: two more (a fork of two, say) do not fit, and neither is added.
        let err = store
            .claim_and_insert(&[c.clone(), vm("d", "img-1")], Some(1536))
            .unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::NodeFull {
                    free: 512,
                    need: 1024,
                    capacity: 1536,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "node \"n1\" has 512 MiB of its 1536 MiB free for microVMs; 1024 MiB more do not fit"
        );
        assert!(store.microvm("c").unwrap().is_none());
        assert_eq!(store.last_event_seq().unwrap(), events);
        store.claim_and_insert(&[c], Some(1536)).unwrap();
        // A TERMINATED microVM gives its memory back; another node's never counted.
        store
            .set_state("a", MicrovmState::Terminated, None)
            .unwrap();
        let mut elsewhere = vm("e", "img-1");
        elsewhere.node = "n2".into();
        store.claim_and_insert(&[elsewhere], Some(512)).unwrap();
        store
            .claim_and_insert(&[vm("f", "img-1")], Some(1536))
            .unwrap();
        assert_eq!(store.microvm("f").unwrap().unwrap().memory_mib, 512);
    });
}

#[test]
fn a_suspended_microvm_moves_once_within_capacity_and_a_stale_mover_is_fenced() {
    each_backend(|store| {
        store.insert_microvm(&vm("a", "img-1")).unwrap();
        assert_eq!(store.ownership("a").unwrap(), Some(("n1".into(), 0)));
        // Only a SUSPENDED one moves.
        let err = store.move_suspended("a", "n1", 0, "n2", None).unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
        for to in [MicrovmState::Running, MicrovmState::Suspended] {
            store.set_state("a", to, None).unwrap();
        }
        // No room on n2 for its 512 MiB: nothing moves.
        let mut other = vm("b", "img-1");
        other.node = "n2".into();
        store.insert_microvm(&other).unwrap();
        let err = store
            .move_suspended("a", "n1", 0, "n2", Some(768))
            .unwrap_err();
        assert!(matches!(err, StoreError::NodeFull { .. }), "{err}");
        assert_eq!(store.ownership("a").unwrap(), Some(("n1".into(), 0)));
        assert_eq!(
            store
                .move_suspended("a", "n1", 0, "n2", Some(1024))
                .unwrap(),
            1
        );
        assert_eq!(store.ownership("a").unwrap(), Some(("n2".into(), 1)));
        assert_eq!(store.microvm("a").unwrap().unwrap().node, "n2");
        // A second mover that saw the old owner and epoch loses.
        let err = store.move_suspended("a", "n1", 0, "n3", None).unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
        assert_eq!(store.ownership("a").unwrap(), Some(("n2".into(), 1)));
    });
}

#[test]
fn a_blob_claimed_recently_is_never_doomed_and_a_doomed_one_is_never_claimed() {
    each_backend(|store| {
        let (x, y) = ("a".repeat(64), "b".repeat(64));
        // Unclaimed: garbage collection may remove it.
        assert!(store.doom_blob(&x, 1_000, 1_000).unwrap());
        // While it is being removed, no upload may count on it: nothing is claimed.
        assert_eq!(
            store.claim_blobs(&[y.clone(), x.clone()], 1_500).unwrap(),
            std::slice::from_ref(&x)
        );
        assert_eq!(store.shared_value(&blob_claim_key(&y)).unwrap(), None);
        // Once it is deleted and forgotten, it is claimed again.
        store.bury_blob(&x).unwrap();
        assert!(store
            .claim_blobs(&[x.clone(), y.clone()], 2_000)
            .unwrap()
            .is_empty());
        // A claim at or after the cut-off keeps it; an older one does not.
        assert!(!store.doom_blob(&x, 2_000, 2_500).unwrap());
        assert!(store.doom_blob(&y, 2_001, 2_500).unwrap());
        assert_eq!(
            store.claim_blobs(std::slice::from_ref(&y), 3_000).unwrap(),
            std::slice::from_ref(&y)
        );
        // Marked twice keeps the first mark's time.
        assert!(store.doom_blob(&y, 2_001, 2_900).unwrap());
        assert_eq!(
            store.shared_value(&blob_doomed_key(&y)).unwrap().as_deref(),
            Some("2500")
        );
        // A claim that is no number counts as fresh.
        store.set_shared_value(&blob_claim_key(&x), "?").unwrap();
        assert!(!store.doom_blob(&x, i64::MAX, 4_000).unwrap());
    });
}
