//! A real kilnd for the CLI's tests, on a throw-away KILN_HOME.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    child: Child,
    pub home: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Guests outlive kilnd; a test's go with its home.
        kiln_testkit::kill_guests_of(self.home.path());
    }
}

/// Runs the `kiln` binary against `d`: (exit code, stdout, stderr).
/// `kiln` with `input` on its stdin.
#[allow(dead_code)]
pub fn kiln_stdin(d: &Daemon, args: &[&str], input: &[u8]) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", d.home.path())
        .env("KILN_ASSETS", kiln_vmm::GuestAssets::default_dir())
        .env_remove("KILN_ENDPOINT")
        .env_remove("KILN_API_KEY")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn kiln(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", d.home.path())
        .env("KILN_ASSETS", kiln_vmm::GuestAssets::default_dir())
        .env_remove("KILN_ENDPOINT")
        .env_remove("KILN_API_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn kilnd() -> Daemon {
    kilnd_with(&[])
}

/// kilnd with more flags.
pub fn kilnd_with(extra: &[&str]) -> Daemon {
    let home = tempfile::tempdir().unwrap();
    let child = spawn_kilnd(home.path(), extra);
    Daemon { child, home }
}

impl Daemon {
    /// Stops kilnd with SIGTERM (its default shutdown suspends running microVMs).
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }

    /// Kills kilnd with SIGKILL: no shutdown of any kind runs.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts kilnd again on the same home.
    pub fn start_again(&mut self, extra: &[&str]) {
        self.child = spawn_kilnd(self.home.path(), extra);
    }
}

fn spawn_kilnd(home: &Path, extra: &[&str]) -> Child {
    // The workspace test build builds kilnd (kiln-daemon's tests need it) next to `kiln`.
    // Building it here instead would compile with other features in the middle of the
    // suite, starving the guests of the tests running beside this one.
    let kilnd = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kilnd");
    assert!(
        kilnd.is_file(),
        "{} is missing: run the suite with `cargo nextest run --workspace` (scripts/test.sh)",
        kilnd.display()
    );
    let _ = std::fs::remove_file(home.join("kilnd.addr"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("kilnd.log"))
        .unwrap();
    let mut child = Command::new(&kilnd)
        .args(["--home"])
        .arg(home)
        .args(["--listen", "127.0.0.1:0", "--ingress-listen", "127.0.0.1:0"])
        .args(extra)
        .env("KILN_ASSETS", kiln_vmm::GuestAssets::default_dir())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !home.join("kilnd.addr").exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "kilnd ended at start ({status}):\n{}",
                std::fs::read_to_string(home.join("kilnd.log")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "kilnd did not start:\n{}",
            std::fs::read_to_string(home.join("kilnd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// A busybox build context whose app answers every lifecycle hook on port 9000 with 200
/// ("fail" in a body answers 500).
pub fn context() -> Vec<u8> {
    let hook = "#!/bin/sh\nread -r m p v\nlen=0\nwhile IFS= read -r l; do l=$(printf '%s' \"$l\" | tr -d '\\r'); [ -z \"$l\" ] && break; \
        case \"$l\" in [Cc]ontent-[Ll]ength:*) len=$(echo \"${l#*:}\" | tr -d ' ');; esac; done\n\
        body=\"\"; if [ \"$len\" -gt 0 ] 2>/dev/null; then body=$(head -c \"$len\"); fi\n\
        code='200 OK'; case \"$body\" in *fail*) code='500 Internal Server Error';; esac\n\
        printf 'HTTP/1.1 %s\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok' \"$code\"\n";
    let files: [(&str, &str); 3] = [
        (
            "Dockerfile",
            "FROM busybox\nCOPY start.sh hook.sh /srv/\nCMD [\"/srv/start.sh\"]\n",
        ),
        (
            "start.sh",
            "#!/bin/sh\necho app-started-$((6*7))\nexec nc -ll -p 9000 -e /srv/hook.sh\n",
        ),
        ("hook.sh", hook),
    ];
    let mut b = tar::Builder::new(Vec::new());
    for (p, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, p, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// A client of `d`, configured explicitly (not through KILN_HOME in the test's environment,
/// which a restarted kilnd would also read).
pub fn client(d: &Daemon) -> kiln_client::Client {
    let addr = std::fs::read_to_string(d.home.path().join("kilnd.addr")).unwrap();
    let key = std::fs::read_to_string(d.home.path().join("api-key")).unwrap();
    kiln_client::Client::from_env(
        Some(format!("http://{}", addr.trim())),
        Some(key.trim().into()),
    )
    .unwrap()
}

/// Waits until image `id` is SUCCESSFUL (panics on FAILED or after 3 minutes).
pub fn wait_image(client: &kiln_client::Client, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = client.raw_get(&format!("/v1/images/{id}")).unwrap();
        if v["status"] == "SUCCESSFUL" {
            return v;
        }
        assert!(v["status"] != "FAILED" && Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
