use super::*;

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
    }
}

#[test]
fn migrates_once_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    {
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        store.insert_microvm(&vm("a", "img-1")).unwrap();
    }
    let store = Store::open(&path).unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("kiln.db")).unwrap();
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
}

#[test]
fn a_transition_the_lifecycle_forbids_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("kiln.db")).unwrap();
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
    // A state no kiln wrote is an error when read, not a guess.
    store
        .conn
        .execute("UPDATE microvms SET state = 'ON_FIRE' WHERE id = 'a'", [])
        .unwrap();
    assert!(store.microvm("a").is_err());
}

#[test]
fn images_resolve_by_name_to_the_newest_good_build() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("kiln.db")).unwrap();
    let img = |id: &str, status: ImageStatus, at: i64| ImageRow {
        id: id.into(),
        name: "app".into(),
        status,
        reason: None,
        created_at: at,
        record: serde_json::json!({}),
        labels: Labels::new(),
    };
    store
        .upsert_image(&img("app-1", ImageStatus::Successful, 1))
        .unwrap();
    store
        .upsert_image(&img("app-2", ImageStatus::Failed, 2))
        .unwrap();
    assert_eq!(store.image("app").unwrap().unwrap().id, "app-1");
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
}

#[test]
fn a_runtime_record_is_kept_until_forgotten_and_old_databases_gain_the_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    {
        // A database from before the column: only the first migration applied.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("kiln.db")).unwrap();
    store.insert_microvm(&vm("a", "img-1")).unwrap();
    store.insert_microvm(&vm("b", "img-1")).unwrap();
    store
        .touch_many(&[("a".into(), 50), ("b".into(), 70), ("nope".into(), 9)])
        .unwrap();
    store.touch_many(&[("a".into(), 20)]).unwrap();
    assert_eq!(store.microvm("a").unwrap().unwrap().last_activity_at, 50);
    assert_eq!(store.microvm("b").unwrap().unwrap().last_activity_at, 70);
}
