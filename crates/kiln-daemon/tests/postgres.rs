//! kilnd with its state in PostgreSQL (the store a cluster's nodes share) instead of
//! KILN_HOME/kiln.db: a microVM's whole lifecycle with every state where psql sees it, a
//! kill -9 of kilnd that loses nothing, one kilnd per node name,
//! and a URL file others can read refused. The test PostgreSQL is started by scripts/test.sh
//! (KILN_TEST_DATABASE_URL); each test makes its own database.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::pg::{admin, fresh_database, refused_start, write_secret, Link};
use common::steps::{assert_counts_on, count, sh, COUNTER};
use common::TestDaemon;
use serde_json::json;

fn db_state(url: &str, id: &str) -> String {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    c.query_one("SELECT state FROM microvms WHERE id = $1", &[&id])
        .unwrap()
        .get(0)
}

#[test]
fn kilnd_keeps_its_state_in_postgres_and_a_kill_loses_nothing() {
    let Some(admin) = admin() else { return };
    let url = fresh_database(&admin);
    let secrets = tempfile::tempdir().unwrap();
    let url_file = secrets.path().join("database-url");
    write_secret(&url_file, &format!("{url}\n"), 0o600);
    let flags = ["--database-url-file", url_file.to_str().unwrap()];
    let mut d = TestDaemon::start_with(&flags);
    assert!(
        !d.home.join("kiln.db").exists(),
        "no SQLite file beside PostgreSQL"
    );
    assert!(d.log().contains("state in PostgreSQL"), "{}", d.log());

    d.build_image("pg", &[("Dockerfile", "FROM busybox\n")], json!({}));
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "pg"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    assert_eq!(db_state(&url, &id), "RUNNING");
    sh(&d, &id, &format!("echo kept > /root/file; {COUNTER}"));
    std::thread::sleep(Duration::from_millis(400));

    // Suspend and resume: each state is PostgreSQL's, and the guest goes on.
    let (status, v) = d.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    assert_eq!(status, 200, "{v}");
    d.wait_state(&id, "SUSPENDED", Duration::from_secs(120));
    assert_eq!(db_state(&url, &id), "SUSPENDED");
    let (status, v) = d.post(&format!("/v1/microvms/{id}/resume"), json!({}));
    assert_eq!(status, 200, "{v}");
    d.wait_state(&id, "RUNNING", Duration::from_secs(120));
    let before = count(&d, &id);

    // kill -9: the next kilnd finds the microVM in PostgreSQL and takes it back running.
    d.kill9();
    d.spawn(&flags);
    assert_eq!(
        d.wait_state(&id, "RUNNING", Duration::from_secs(60))["state"],
        "RUNNING"
    );
    assert_counts_on(&d, &id, before);
    assert_eq!(sh(&d, &id, "cat /root/file").trim(), "kept");
    let (_, ev) = d.get("/v1/events?since=0&limit=1000");
    let events: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["microvmId"] == id.as_str())
        .filter_map(|e| e["toState"].as_str().or(e["kind"].as_str()))
        .collect();
    assert_eq!(
        events,
        [
            "PENDING",
            "RUNNING",
            "SUSPENDED",
            "RESUMING",
            "RUNNING",
            "adopted"
        ],
        "{ev}"
    );

    // One kilnd per node name: a second one named the same (the host's) is refused, and
    // says what to do.
    let other = tempfile::tempdir().unwrap();
    let err = refused_start(other.path(), &flags);
    assert!(
        err.contains("already runs on") && err.contains("--node-name"),
        "{err}"
    );
    // A URL file others can read is refused before anything connects.
    write_secret(&url_file, &url, 0o644);
    let err = refused_start(other.path(), &flags);
    assert!(err.contains("chmod 600"), "{err}");
    write_secret(&url_file, &url, 0o600);

    let (status, v) = d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    assert_eq!(status, 200, "{v}");
    d.wait_state(&id, "TERMINATED", Duration::from_secs(60));
    assert_eq!(db_state(&url, &id), "TERMINATED");
}

#[test]
fn kilnd_speaks_tls_to_postgres_verified_against_its_ca() {
    let Some(admin) = admin() else { return };
    let Ok(ca) = std::env::var("KILN_TEST_DATABASE_CA") else {
        eprintln!("not run: KILN_TEST_DATABASE_CA is not set (scripts/test.sh sets it)");
        return;
    };
    // The test server refuses the role kiln_tls without TLS.
    let url = fresh_database(&admin).replace("user=kiln ", "user=kiln_tls ");
    let home = tempfile::tempdir().unwrap();
    let url_file = home.path().join("database-url");
    write_secret(&url_file, &url, 0o600);
    let url_flag = url_file.to_str().unwrap();
    let err = refused_start(home.path(), &["--database-url-file", url_flag]);
    assert!(
        err.contains("Cannot reach PostgreSQL") && err.contains("pg_hba.conf"),
        "{err}"
    );
    // sslmode=require alone: the system's CAs do not know the test CA.
    write_secret(&url_file, &format!("{url} sslmode=require"), 0o600);
    let err = refused_start(home.path(), &["--database-url-file", url_flag]);
    assert!(
        err.contains("Cannot reach PostgreSQL") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    let err = refused_start(home.path(), &["--database-ca-file", &ca]);
    assert!(
        err.contains("--database-ca-file is for PostgreSQL"),
        "{err}"
    );

    // With the CA: kilnd runs on it, over TLS.
    write_secret(&url_file, &url, 0o600);
    let d = TestDaemon::start_with(&[
        "--database-url-file",
        url_flag,
        "--database-ca-file",
        &ca,
        "--allow-private-webhook-targets",
    ]);
    let (status, v) = d.get("/v1/nodes");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["nodes"][0]["reachable"], true, "{v}");
    // A write through kilnd lands in the database.
    let (status, v) = d.post("/v1/webhooks", json!({"url": "http://127.0.0.1:9/kiln"}));
    assert_eq!(status, 201, "{v}");
    let plain_url = url.replace("user=kiln_tls ", "user=kiln ");
    let mut c = postgres::Client::connect(&plain_url, postgres::NoTls).unwrap();
    let hooks: i64 = c
        .query_one(
            "SELECT count(*) FROM webhooks WHERE url = 'http://127.0.0.1:9/kiln'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(hooks, 1);
    let over_tls: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = 'kiln_tls' AND s.ssl",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(over_tls >= 1, "kilnd's connections are TLS");
}

#[test]
fn an_unreachable_database_stops_kilnd_at_start_with_where_it_looked() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = tempfile::tempdir().unwrap();
    let url_file = home.path().join("database-url");
    write_secret(
        &url_file,
        &format!("postgresql://kiln:secret-password@127.0.0.1:{port}/kiln"),
        0o600,
    );
    let err = refused_start(
        home.path(),
        &["--database-url-file", url_file.to_str().unwrap()],
    );
    assert!(
        err.contains(&format!("Cannot reach PostgreSQL at 127.0.0.1:{port}/kiln")),
        "{err}"
    );
    assert!(
        !err.contains("secret-password"),
        "the password is never printed: {err}"
    );
}

#[test]
fn a_database_outage_answers_503_and_kilnd_carries_on_when_it_is_back() {
    let Some(admin) = admin() else { return };
    let url = fresh_database(&admin);
    let pg_port: u16 = url
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .unwrap()
        .parse()
        .unwrap();
    let link = Link::to(pg_port);
    let via_link = url.replace(&format!("port={pg_port}"), &format!("port={}", link.port));
    let secrets = tempfile::tempdir().unwrap();
    let url_file = secrets.path().join("database-url");
    write_secret(&url_file, &via_link, 0o600);
    let d = TestDaemon::start_with(&["--database-url-file", url_file.to_str().unwrap()]);
    d.build_image("outage", &[("Dockerfile", "FROM busybox\n")], json!({}));
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": "outage"}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));

    link.cut();
    // The first call may find its connection broken, the next finds PostgreSQL unreachable:
    // both say so with a 503, and nothing is launched.
    for _ in 0..2 {
        let (status, v) = d.get(&format!("/v1/microvms/{id}"));
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["code"], "ServiceUnavailable", "{v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains("the database is unreachable"), "{message}");
        assert!(message.contains("retry"), "{message}");
    }
    let (status, v) = d.post("/v1/microvms", json!({"imageIdentifier": "outage"}));
    assert_eq!(status, 503, "{v}");
    // The guest does not depend on the database: its QEMU runs on.
    assert_eq!(d.qemu_processes().len(), 1, "{}", d.log());

    link.restore();
    let (status, v) = d.get(&format!("/v1/microvms/{id}"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "RUNNING");
    assert_eq!(sh(&d, &id, "echo alive").trim(), "alive");
    let (status, v) = d.get("/v1/microvms");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["microvms"].as_array().unwrap().len(),
        1,
        "nothing launched in the outage: {v}"
    );
    let (status, v) = d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    assert_eq!(status, 200, "{v}");
    d.wait_state(&id, "TERMINATED", Duration::from_secs(60));
}
