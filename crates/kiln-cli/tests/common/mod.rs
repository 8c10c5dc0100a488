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
    }
}

pub fn kilnd() -> Daemon {
    kilnd_with(&[])
}

/// kilnd with more flags.
pub fn kilnd_with(extra: &[&str]) -> Daemon {
    // The workspace test build builds kilnd (kiln-daemon's tests need it) next to `kiln`.
    // Building it here instead would compile with other features in the middle of the
    // suite, starving the guests of the tests running beside this one.
    let kilnd = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("kilnd");
    assert!(
        kilnd.is_file(),
        "{} is missing: run the suite with `cargo nextest run --workspace` (scripts/test.sh)",
        kilnd.display()
    );
    let home = tempfile::tempdir().unwrap();
    let child = Command::new(&kilnd)
        .args(["--home"])
        .arg(home.path())
        .args(["--listen", "127.0.0.1:0", "--ingress-listen", "127.0.0.1:0"])
        .args(extra)
        .env("KILN_ASSETS", kiln_vmm::GuestAssets::default_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !home.path().join("kilnd.addr").exists() {
        assert!(Instant::now() < deadline, "kilnd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon { child, home }
}
