//! Cluster nodes for tests: each node's flags (a database, capacity, its own jail uids and
//! cgroup root, object storage), and the steps the cluster tests share.

use std::time::Duration;

use serde_json::{json, Value};

use super::pg::{admin, fresh_database, object_store_flags, url_file};
use super::TestDaemon;

/// A node's own jail uids (1000 of them, by its name's first letter) and cgroup root, as
/// nodes sharing a machine are told.
pub fn jail_of(name: &str) -> (u32, u32, String) {
    let n = u32::from(name.as_bytes()[0].wrapping_sub(b'a') % 26);
    let first = kiln_jail::UID_BASE + 30_000 + n * 1000;
    (first, first + 999, format!("kiln-node-{name}"))
}

pub fn node_flags(name: &str, url_file: &str) -> Vec<String> {
    let (first, last, cgroup) = jail_of(name);
    let jail = [
        "--jail-uids".to_string(),
        format!("{first}-{last}"),
        "--jail-cgroup".to_string(),
        cgroup,
    ];
    [
        "--node-name",
        name,
        "--database-url-file",
        url_file,
        "--node-lease-seconds",
        "3",
        "--capacity-memory-mib",
        "4096",
        "--capacity-vcpus",
        "2",
        "--capacity-disk-mib",
        "20000",
    ]
    .map(String::from)
    .into_iter()
    .chain(jail)
    .collect()
}

/// Microvm `id`'s QEMU on node `name` (`d`) runs with one of the node's uids, in a cgroup
/// under the node's root, and the node's `/health` names both.
pub fn assert_jailed_in_node(d: &TestDaemon, name: &str, id: &str) {
    let (first, last, cgroup) = jail_of(name);
    let pid = std::fs::read_to_string(d.home.join("microvms").join(id).join("qemu.pid")).unwrap();
    let pid = pid.trim();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!((first..=last).contains(&uid), "{id} on {name}: uid {uid}");
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory = groups
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.is_empty() || c.split(',').any(|c| c == "memory"))
        })
        .unwrap();
    assert!(
        memory.contains(&format!("/{cgroup}/vm-{uid}-")),
        "{id} on {name}: {memory}"
    );
    let (status, health) = d.get("/health");
    assert_eq!(status, 200);
    assert_eq!(
        health["jail"]["uidRange"],
        format!("{first}-{last}"),
        "{health}"
    );
    assert!(
        health["jail"]["cgroups"]
            .to_string()
            .contains(&format!("/{cgroup}")),
        "{health}"
    );
}

/// Sets a node's `--capacity-memory-mib`.
pub fn set_capacity(flags: &mut [String], mib: u32) {
    let at = flags
        .iter()
        .position(|f| f == "--capacity-memory-mib")
        .unwrap();
    flags[at + 1] = mib.to_string();
}

pub fn launch(d: &TestDaemon, image: &str) -> String {
    let (status, r) = d.post("/v1/microvms", json!({"imageIdentifier": image}));
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    id
}

pub fn nodes(d: &TestDaemon) -> Value {
    let (status, v) = d.get("/v1/nodes");
    assert_eq!(status, 200, "{v}");
    v
}

pub fn node<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name}: {list}"))
}

/// Each node's flags for one database and one object store (`None`: the test services
/// are not running), and the directory holding their secrets.
pub fn object_store_nodes(names: &[&str]) -> Option<(Vec<Vec<String>>, tempfile::TempDir)> {
    let admin = admin()?;
    let secrets = tempfile::tempdir().unwrap();
    let objects = object_store_flags(secrets.path(), names.join("-").as_str())?;
    let file = url_file(secrets.path(), &fresh_database(&admin));
    let flags = names
        .iter()
        .map(|name| {
            let mut f = node_flags(name, &file);
            f.extend(objects.iter().cloned());
            f
        })
        .collect();
    Some((flags, secrets))
}

pub fn build_app(d: &TestDaemon, name: &str) -> String {
    d.build_image(
        name,
        &[
            ("Dockerfile", APP_DOCKERFILE),
            ("app.sh", APP_SH),
            ("hook.sh", super::HOOK_SH),
        ],
        json!({}),
    )
}

pub const APP_DOCKERFILE: &str =
    "FROM busybox\nCOPY app.sh hook.sh /srv/\nEXPOSE 8080\nCMD [\"/srv/app.sh\"]\n";

pub const APP_SH: &str = "#!/bin/sh\nmkdir -p /www\necho 'app on a' > /www/index.html\n\
httpd -p 8080 -h /www\nexec nc -ll -p 9000 -e /srv/hook.sh\n";

/// Each node's flags as `&str`s, for `TestDaemon::start_with`.
pub fn as_strs(flags: &[Vec<String>]) -> Vec<Vec<&str>> {
    flags
        .iter()
        .map(|f| f.iter().map(String::as_str).collect())
        .collect()
}
