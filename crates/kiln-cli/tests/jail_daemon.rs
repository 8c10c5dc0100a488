//! kilnd's microVMs are jailed, its health says how, and a kill -9 of kilnd followed by a
//! restart leaves no cgroup, uid or file of a jail behind.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use common::{kiln, kilnd};

fn context() -> Vec<u8> {
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

fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn files_owned_by(dir: &Path, uid: u32, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.uid() == uid {
            out.push(p.clone());
        }
        if meta.is_dir() {
            files_owned_by(&p, uid, out);
        }
    }
}

#[test]
fn kilnd_jails_its_microvms_and_a_kill_9_leaves_no_jail_behind() {
    let mut d = kilnd();
    let (code, health, err) = kiln(&d, &["doctor", "--json"]);
    assert_eq!(code, 0, "{health}{err}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["jail"]["ok"], true, "{health}");
    let kilnd_jail = &health["daemon"]["health"]["jail"];
    assert_eq!(kilnd_jail["uidRange"], "1900000000-1900065535", "{health}");
    assert!(
        kilnd_jail["cgroups"].as_array().unwrap().len() >= 3,
        "{kilnd_jail}"
    );

    // Not through KILN_HOME in this process: kilnd's restart below finds its assets by it.
    let addr = std::fs::read_to_string(d.home.path().join("kilnd.addr")).unwrap();
    let key = std::fs::read_to_string(d.home.path().join("api-key")).unwrap();
    let client = kiln_client::Client::from_env(
        Some(format!("http://{}", addr.trim())),
        Some(key.trim().into()),
    )
    .unwrap();
    let image = client.create_image("jailed", &context()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let v = client.get(&format!("/v1/images/{image}")).unwrap();
        if v["status"] == "SUCCESSFUL" {
            break;
        }
        assert!(v["status"] != "FAILED" && Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, id, err) = kiln(&d, &["run", "jailed", "--wait"]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    let pid_file = d.home.path().join("microvms").join(&id).join("qemu.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let uid = uid_of(pid).expect("QEMU runs");
    assert!(
        uid >= kiln_jail::UID_BASE,
        "QEMU runs as a jail uid, not {uid}"
    );
    let (code, out, err) = kiln(&d, &["exec", &id, "--", "echo", "jailed"]);
    assert_eq!((code, out.as_str()), (0, "jailed\n"), "{err}");

    d.kill_hard();
    let deadline = Instant::now() + Duration::from_secs(20);
    while uid_of(pid) == Some(uid) {
        assert!(Instant::now() < deadline, "QEMU outlived kilnd's kill -9");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !kiln_jail::cgroup::existing(uid).is_empty() || !kiln_jail::uids::is_free(uid),
        "the kill left the jail's cgroups (what the restart must clean)"
    );

    d.start_again(&[]);
    assert!(
        kiln_jail::cgroup::existing(uid).is_empty() || !kiln_jail::uids::is_free(uid),
        "cgroups of a dead jail survived kilnd's restart"
    );
    let mut left = Vec::new();
    files_owned_by(d.home.path(), uid, &mut left);
    assert!(left.is_empty(), "files of the dead jail's uid: {left:?}");
    let (code, out, _) = kiln(&d, &["get", &id, "--output", "json"]);
    assert_eq!(code, 0);
    let vm: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vm["state"], "TERMINATED", "{vm}");
}
