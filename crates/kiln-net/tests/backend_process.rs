//! The `kiln-net-backend` binary on its own: its seccomp filter denies what it must and
//! allows what the stack needs; a bad configuration ends it with the reason.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn the_filter_denies_exec_namespaces_and_netlink_but_not_sockets_or_threads() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-net-backend"))
        .arg("--check-seccomp")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "socket(AF_NETLINK): failed: Operation not permitted (os error 1) (ok)",
        "socket(AF_INET): allowed (ok)",
        "unshare(CLONE_NEWUSER): failed: Operation not permitted (os error 1) (ok)",
        "threads: allowed (ok)",
        "execve: failed: Operation not permitted (os error 1) (ok)",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

#[test]
fn a_bad_configuration_ends_the_backend_with_the_reason() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-net-backend"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"policy\": 5}")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kiln-net-backend: the network backend's configuration is not valid"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
