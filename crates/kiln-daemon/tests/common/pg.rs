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
    // Tests run in parallel: a counter keeps two started in the same millisecond apart.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("kiln_d_{}_{}_{n}", std::process::id(), kiln_store::now_ms());
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

/// kilnd's flags for the test object storage (scripts/test.sh starts SeaweedFS and sets
/// KILN_TEST_S3_URL and its key), under a prefix of this test's own, the key in a 0600 file
/// in `dir`; `None` when it is not set.
pub fn object_store_flags(dir: &Path, name: &str) -> Option<Vec<String>> {
    let Ok(url) = std::env::var("KILN_TEST_S3_URL") else {
        eprintln!(
            "not run: KILN_TEST_S3_URL is not set (scripts/test.sh starts SeaweedFS and sets it)"
        );
        return None;
    };
    let (base, query) = url.split_once('?').unwrap();
    let url = format!(
        "{base}/t-{}-{}-{name}?{query}",
        std::process::id(),
        kiln_store::now_ms()
    );
    let key = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let creds = dir.join("object-store-key");
    write_secret(
        &creds,
        &format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
            key("AWS_ACCESS_KEY_ID"),
            key("AWS_SECRET_ACCESS_KEY")
        ),
        0o600,
    );
    Some(vec![
        "--object-store".into(),
        url,
        "--object-store-credentials-file".into(),
        creds.to_str().unwrap().to_string(),
    ])
}

/// A TCP forwarder to a test server (PostgreSQL, SeaweedFS) that the test can cut (every
/// connection closed, new ones closed at once) and restore: a real network outage.
pub struct Link {
    pub port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Link {
    pub fn to(upstream: u16) -> Link {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let link = Link {
            port: listener.local_addr().unwrap().port(),
            up: Default::default(),
            open: Default::default(),
        };
        link.up.store(true, Ordering::SeqCst);
        let (up, open) = (link.up.clone(), link.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let server = match std::net::TcpStream::connect(("127.0.0.1", upstream)) {
                    Ok(s) if up.load(Ordering::SeqCst) => s,
                    _ => continue, // dropped: the client sees its connection closed
                };
                let mut open = open.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        link
    }

    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
