//! The test PostgreSQL (scripts/test.sh starts it and sets KILN_TEST_DATABASE_URL): a
//! database per test, secret files, and kilnd starts that must fail.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn admin() -> Option<String> {
    let url = std::env::var("KILN_TEST_DATABASE_URL").ok();
    if url.is_none() {
        eprintln!("not run: KILN_TEST_DATABASE_URL is not set (scripts/test.sh starts PostgreSQL and sets it)");
    }
    url
}

/// A new database on the test server; its connection string.
pub fn fresh_database(admin: &str) -> String {
    let name = format!("kiln_d_{}_{}", std::process::id(), kiln_store::now_ms());
    let mut c = postgres::Client::connect(admin, postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    format!("{admin} dbname={name}")
}

pub fn write_secret(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts kilnd on `home` expecting it to refuse; returns what it printed.
pub fn refused_start(home: &Path, extra: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--home")
        .arg(home)
        .args(["--listen", "127.0.0.1:0", "--ingress-listen", "127.0.0.1:0"])
        .args(extra)
        .env("KILN_ASSETS", kiln_vmm::GuestAssets::default_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "kilnd did not refuse to start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "kilnd started: {err}");
    err
}

/// A 0600 file holding a database URL, and the kilnd flag naming it.
pub fn url_file(dir: &Path, url: &str) -> String {
    let path = dir.join("database-url");
    write_secret(&path, url, 0o600);
    path.to_str().unwrap().to_string()
}
