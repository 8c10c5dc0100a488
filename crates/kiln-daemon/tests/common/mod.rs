//! A real `kilnd` process for tests, with a throw-away KILN_HOME, fast idle settings and a
//! blocking HTTP client; plus a hook-recording test image and a host-side report server.
#![allow(dead_code)]

pub mod nodes;
pub mod pg;
pub mod steps;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct TestDaemon {
    pub home: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    pub base: String,
    pub key: String,
    /// host:port of the ingress proxy.
    pub ingress: String,
    /// The kilnd binary to start (another build of it, for upgrade tests).
    pub program: Option<PathBuf>,
    /// The API client (one trusting a test CA, for an API over TLS: [`TestDaemon::trust`]).
    pub agent: ureq::Agent,
}

impl TestDaemon {
    pub fn start() -> TestDaemon {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> TestDaemon {
        Self::start_seeded(extra, &[])
    }

    /// Starts kilnd on a home that already holds these files (mode 0600): another node's
    /// `api-key`, say.
    pub fn start_seeded(extra: &[&str], files: &[(&str, &str)]) -> TestDaemon {
        let tmp = tempfile::Builder::new()
            .prefix("kilnd-test-")
            .tempdir()
            .unwrap();
        let mut d = TestDaemon {
            home: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
            child: None,
            base: String::new(),
            key: String::new(),
            ingress: String::new(),
            program: None,
            agent: ureq::agent(),
        };
        for (name, text) in files {
            let path = d.home.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        d.spawn(extra);
        d
    }

    /// (Re)starts kilnd on this home.
    pub fn spawn(&mut self, extra: &[&str]) {
        self.spawn_env(extra, &[]);
    }

    /// (Re)starts kilnd on this home with more environment (the fault-injection hook).
    pub fn spawn_env(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        let _ = std::fs::remove_file(self.home.join("kilnd.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("kilnd.log"))
            .unwrap();
        let program = self
            .program
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kilnd")));
        let child = Command::new(program)
            .args(["--home"])
            .arg(&self.home)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--ingress-listen",
                "127.0.0.1:0",
                "--ingress-header-timeout-ms",
                "1000",
                "--min-idle-seconds",
                "1",
                "--tick-ms",
                "200",
                // Ten guests restoring at once under TCG on two cores (the concurrent-runs
                // test) take more than 5 s to answer their first hook; none waits on it.
                "--hook-timeout",
                "30",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .env("KILN_ASSETS", kiln_vmm::GuestAssets::default_dir())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.home.join("kilnd.addr").exists() {
            assert!(
                Instant::now() < deadline,
                "kilnd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // `https://host:port` when the API speaks TLS, else `host:port`.
        let addr = std::fs::read_to_string(self.home.join("kilnd.addr")).unwrap();
        let addr = addr.trim();
        self.base = if addr.starts_with("https://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        self.key = std::fs::read_to_string(self.home.join("api-key"))
            .unwrap()
            .trim()
            .to_string();
        self.ingress = std::fs::read_to_string(self.home.join("kilnd.ingress"))
            .unwrap()
            .trim()
            .to_string();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("kilnd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Waits for kilnd to end on its own (a fault-injection step killed it).
    pub fn wait_exit(&mut self, timeout: Duration) {
        let mut c = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        while c.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "kilnd did not reach its fault step: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A POST that may meet a kilnd dying under it: the status, or None.
    pub fn try_post(&self, path: &str, body: Value) -> Option<u16> {
        match self
            .auth(self.agent.post(&format!("{}{path}", self.base)))
            .timeout(Duration::from_secs(300))
            .send_json(body)
        {
            Ok(r) => Some(r.status()),
            Err(ureq::Error::Status(s, _)) => Some(s),
            Err(_) => None,
        }
    }

    pub fn sigterm(&mut self) {
        let mut c = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap();
    }

    fn respond(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
        match r {
            Ok(resp) => {
                let status = resp.status();
                let text = resp.into_string().unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                )
            }
            Err(e) => panic!("request failed: {e}"),
        }
    }

    fn auth(&self, req: ureq::Request) -> ureq::Request {
        req.set("Authorization", &format!("Bearer {}", self.key))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        Self::respond(
            self.auth(self.agent.get(&format!("{}{path}", self.base)))
                .call(),
        )
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        Self::respond(
            self.auth(self.agent.post(&format!("{}{path}", self.base)))
                .send_json(body),
        )
    }

    pub fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        Self::respond(
            self.auth(self.agent.request("PATCH", &format!("{}{path}", self.base)))
                .send_json(body),
        )
    }

    pub fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        auth: bool,
    ) -> (u16, Value) {
        let mut req = self
            .agent
            .post(&format!("{}{path}", self.base))
            .set("Content-Type", content_type);
        if auth {
            req = self.auth(req);
        }
        Self::respond(req.send_bytes(body))
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        Self::respond(
            self.auth(self.agent.delete(&format!("{}{path}", self.base)))
                .call(),
        )
    }

    /// Polls GetMicrovm until `state` (or fails with the last view).
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, v) = self.get(&format!("/v1/microvms/{id}"));
            if v["state"] == state {
                return v;
            }
            assert!(
                v["state"] != "TERMINATED",
                "{id} ended instead of reaching {state}: {v}\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "{id} never reached {state}: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Uploads a context (files) and builds it; returns the image id once SUCCESSFUL.
    pub fn build_image(&self, name: &str, files: &[(&str, &str)], build_args: Value) -> String {
        self.build_image_tar(name, tar_of(files), build_args)
    }

    pub fn build_image_tar(&self, name: &str, tar: Vec<u8>, build_args: Value) -> String {
        let (status, art) = self.post_raw("/v1/artifacts", "application/x-tar", &tar, true);
        assert_eq!(status, 200, "{art}");
        let (status, img) = self.post("/v1/images", json!({"name": name, "codeArtifact": {"artifactId": art["artifactId"]}, "buildArgs": build_args}));
        assert_eq!(status, 202, "{img}");
        let id = img["imageIdentifier"].as_str().unwrap().to_string();
        self.wait_image(&id);
        id
    }

    /// Waits until build `id` is SUCCESSFUL (fails the test if it FAILED or takes 5 min).
    pub fn wait_image(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let (_, v) = self.get(&format!("/v1/images/{id}"));
            match v["status"].as_str() {
                Some("SUCCESSFUL") => return,
                Some("FAILED") => panic!("image failed: {v}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "image build too slow: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The QEMUs of this daemon's microVMs: those whose command line mentions its home,
    /// but for the ones started ahead and still waiting for a launch (see
    /// [`TestDaemon::prestarted_qemus`]).
    pub fn qemu_processes(&self) -> Vec<u32> {
        self.split_qemus().0
    }

    /// The QEMUs started ahead of a launch that no microVM took yet.
    pub fn prestarted_qemus(&self) -> Vec<u32> {
        self.split_qemus().1
    }

    /// The ids kilnd keeps a pre-started QEMU's file for (`$KILN_HOME/prestarted/`).
    pub fn prestarted_ids(&self) -> Vec<String> {
        std::fs::read_dir(self.home.join("prestarted"))
            .map(|e| {
                e.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().to_string();
                        let id = n.strip_suffix(".json").or(n.strip_suffix(".starting"))?;
                        Some(id.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (microVMs' QEMUs, pre-started ones). The processes are listed before the files:
    /// a pre-started QEMU's file is written before it starts and removed after it ended or
    /// was taken, so none is miscounted.
    fn split_qemus(&self) -> (Vec<u32>, Vec<u32>) {
        let pids = kiln_testkit::guests_of(&self.home);
        let waiting = self.prestarted_ids();
        let (mut mine, mut ahead) = (Vec::new(), Vec::new());
        for pid in pids {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            if waiting
                .iter()
                .any(|id| cmd.contains(&format!("/microvms/{id}/")))
            {
                ahead.push(pid);
            } else {
                mine.push(pid);
            }
        }
        (mine, ahead)
    }
}

impl TestDaemon {
    /// A GET without the key (health, metrics).
    pub fn respond_public(&self, path: &str) -> (u16, Value) {
        Self::respond(self.agent.get(&format!("{}{path}", self.base)).call())
    }

    /// The value of one series of `/metrics` (`name` with its labels, as printed).
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.respond_public("/metrics").1;
        let text = text.as_str().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// A client view of this daemon with another key (owns no process).
    pub fn clone_with_key(&self, key: String) -> TestDaemon {
        TestDaemon {
            home: self.home.clone(),
            _tmp: None,
            child: None,
            base: self.base.clone(),
            ingress: self.ingress.clone(),
            key,
            program: None,
            agent: self.agent.clone(),
        }
    }

    pub fn forget(&mut self) {
        self.child = None;
    }

    /// Calls the API trusting the CA certificates in `ca_pem` (an API over TLS).
    pub fn trust(&mut self, ca_pem: &str) {
        self.agent = ureq::AgentBuilder::new()
            .tls_config(trusting(ca_pem))
            .build();
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Guests outlive kilnd; a test's go with its home.
        if self._tmp.is_some() {
            kiln_testkit::kill_guests_of(&self.home);
        }
    }
}

pub fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let bytes: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (*p, d.as_bytes())).collect();
    tar_of_bytes(&bytes)
}

pub fn tar_of_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(if path.ends_with(".sh") || !path.contains('.') {
            0o755
        } else {
            0o644
        });
        h.set_cksum();
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Records what guests report: `GET /hook/<name>?body=<payload>` lines.
pub struct ReportServer {
    pub port: u16,
    pub calls: Arc<Mutex<Vec<String>>>,
}

impl ReportServer {
    pub fn start() -> ReportServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_ok() {
                    if let Some(path) = line.split_whitespace().nth(1) {
                        c.lock().unwrap().push(path.to_string());
                    }
                }
                let mut s = stream;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
            }
        });
        ReportServer { port, calls }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

/// A busybox image whose hook server (nc + sh) answers every hook and reports each call
/// (with its body) to the host's report server through the user-mode network gateway.
pub const HOOK_SH: &str = r#"#!/bin/sh
read -r method path proto
len=0
while IFS= read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
  case "$line" in [Cc]ontent-[Ll]ength:*) len=$(echo "${line#*:}" | tr -d ' ');; esac
done
body=""
if [ "$len" -gt 0 ] 2>/dev/null; then body=$(head -c "$len"); fi
code="200 OK"
case "$body" in *fail*) code="500 Internal Server Error";; esac
if [ "$path" != "/ready" ]; then wget -q -O /dev/null "http://10.0.2.2:$REPORT_PORT/hook$path?body=$body" 2>/dev/null; fi
printf 'HTTP/1.1 %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok' "$code"
"#;

pub const START_SH: &str = "#!/bin/sh\nexec nc -ll -p 9000 -e /srv/hook.sh\n";

pub const DOCKERFILE: &str = "FROM busybox\nARG REPORT_PORT\nENV REPORT_PORT=$REPORT_PORT\nCOPY hook.sh start.sh /srv/\nCMD [\"/srv/start.sh\"]\n";

pub fn hook_image(d: &TestDaemon, report: &ReportServer) -> String {
    d.build_image(
        "hooks",
        &[
            ("Dockerfile", DOCKERFILE),
            ("hook.sh", HOOK_SH),
            ("start.sh", START_SH),
        ],
        json!({"REPORT_PORT": report.port.to_string()}),
    )
}

pub fn dir_exists(p: &Path) -> bool {
    p.exists()
}

/// A TLS client configuration trusting only the CA certificates in `ca_pem`.
pub fn trusting(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}
