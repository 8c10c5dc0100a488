//! Two kilnd nodes sharing one PostgreSQL database: both registered with their capacity and
//! heartbeats; ingress tokens from either valid on both, a revocation on one holding on the
//! other; each microVM owned by the node that launched it and served through either
//! (API calls forwarded to the owner, ingress traffic tunnelled to it, a SUSPENDED one
//! resumed by its owner on a request anywhere); a node killed with -9 leaves its microVMs UNREACHABLE
//! from the other (answered 503, never started a second time), and takes them back running
//! when it returns; one kilnd per node name; RunMicrovm on any node runs where the image's
//! files are, and a burst of them never takes more of a node's memory than it offers. With
//! object storage: images and SUSPENDED microVMs travel between nodes, drain, outages, and
//! three nodes over which RunMicrovm spreads microVMs by free memory.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::nodes::*;
use common::pg::{admin, fresh_database, refused_start, url_file, Link};
use common::steps::{assert_counts_on, count, sh, COUNTER};
use common::TestDaemon;
use serde_json::{json, Value};

/// `n` RunMicrovm of `image` at once, the i-th through `via[i % len]`: the ids placed, the
/// refusals (429), and every answer.
fn burst(
    via: &[&TestDaemon],
    n: usize,
    image: &str,
) -> (Vec<String>, Vec<Value>, Vec<(u16, Value)>) {
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..n)
            .map(|i| {
                let d = via[i % via.len()];
                s.spawn(move || d.post("/v1/microvms", json!({"imageIdentifier": image})))
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let placed = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, r)| r["microvmId"].as_str().unwrap().to_string())
        .collect();
    let refused = answers
        .iter()
        .filter(|(status, _)| *status == 429)
        .map(|(_, r)| r.clone())
        .collect();
    (placed, refused, answers)
}

/// A token for port 8080 of `id` from `d`, and its id.
fn token_and_id(d: &TestDaemon, id: &str) -> (String, String) {
    let (status, t) = d.post(
        "/v1/auth-tokens",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5, "allowedPorts": [{"port": 8080}]}),
    );
    assert_eq!(status, 200, "{t}");
    (
        t["authToken"]["X-Kiln-Auth"].as_str().unwrap().to_string(),
        t["tokenId"].as_str().unwrap().to_string(),
    )
}

fn token_via(d: &TestDaemon, id: &str) -> String {
    let (status, t) = d.post(
        "/v1/auth-tokens",
        json!({"microvmIdentifier": id, "expirationInMinutes": 5, "allowedPorts": [{"port": 8080}]}),
    );
    assert_eq!(status, 200, "{t}");
    t["authToken"]["X-Kiln-Auth"].as_str().unwrap().to_string()
}

/// GET / of the app through `d`'s ingress (path style): status and body.
fn app_via_ingress(d: &TestDaemon, id: &str, token: &str) -> (u16, String) {
    let r = ureq::get(&format!("http://{}/m/{id}/", d.ingress))
        .set("X-Kiln-Auth", token)
        .set("X-Kiln-Port", "8080")
        .timeout(Duration::from_secs(120))
        .call();
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
        Err(e) => panic!("ingress request failed: {e}"),
    }
}

#[test]
fn two_nodes_serve_each_others_microvms_and_a_dead_node_is_never_doubled() {
    let Some(admin) = admin() else { return };
    let url = fresh_database(&admin);
    let secrets = tempfile::tempdir().unwrap();
    let file = url_file(secrets.path(), &url);
    let flags_a = node_flags("a", &file);
    let flags_a: Vec<&str> = flags_a.iter().map(String::as_str).collect();
    let flags_b = node_flags("b", &file);
    let flags_b: Vec<&str> = flags_b.iter().map(String::as_str).collect();
    let mut a = TestDaemon::start_with(&flags_a);
    // Every node accepts the same API key: B is given A's api-key file. (Ingress token
    // keys travel through the database.)
    let b = TestDaemon::start_seeded(&flags_b, &[("api-key", &a.key)]);
    assert_eq!(a.key, b.key);

    let list = nodes(&b);
    assert_eq!(list["thisNode"], "b");
    for name in ["a", "b"] {
        let n = node(&list, name);
        assert_eq!(n["reachable"], true, "{list}");
        assert_eq!(
            n["capacity"],
            json!({"memoryMib": 4096, "vcpus": 2, "diskMib": 20000})
        );
    }
    assert_eq!(
        node(&list, "a")["advertise"],
        a.base.trim_start_matches("http://")
    );

    // Images are node-local until object storage carries them: one per node.
    a.build_image(
        "on-a",
        &[
            ("Dockerfile", APP_DOCKERFILE),
            ("app.sh", APP_SH),
            ("hook.sh", common::HOOK_SH),
        ],
        json!({}),
    );
    b.build_image("on-b", &[("Dockerfile", "FROM busybox\n")], json!({}));
    let va = launch(&a, "on-a");
    let vb = launch(&b, "on-b");
    let (_, all) = b.get("/v1/microvms");
    let owners: Vec<(String, String)> = all["microvms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["microvmId"].as_str().unwrap().into(),
                m["node"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(owners.contains(&(va.clone(), "a".into())), "{all}");
    assert!(owners.contains(&(vb.clone(), "b".into())), "{all}");
    assert_eq!(node(&nodes(&a), "a")["microvms"], 1);

    // Through B, A's microVM: exec, files, suspend and resume all happen on A.
    sh(&b, &va, &format!("echo from-b > /root/note; {COUNTER}"));
    assert_eq!(sh(&a, &va, "cat /root/note").trim(), "from-b");
    let (status, v) = b.post(&format!("/v1/microvms/{va}/suspend"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&va, "SUSPENDED", Duration::from_secs(120));
    let (status, v) = b.post(&format!("/v1/microvms/{va}/resume"), json!({}));
    assert_eq!(status, 200, "{v}");
    b.wait_state(&va, "RUNNING", Duration::from_secs(120));
    assert_eq!(a.qemu_processes().len(), 1, "va runs on A");
    assert_eq!(b.qemu_processes().len(), 1, "vb runs on B");

    // B's ingress serves A's microVM with a token issued by A, and A's with one issued by
    // B; a token revoked on A is refused on B soon after (a heartbeat).
    let (revoked, jti) = token_and_id(&a, &va);
    let app = (200, "app on a\n".to_string());
    assert_eq!(app_via_ingress(&b, &va, &revoked), app);
    let (status, v) = a.delete(&format!("/v1/auth-tokens/{jti}"));
    assert_eq!(status, 204, "{v}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while app_via_ingress(&b, &va, &revoked).0 == 200 {
        assert!(Instant::now() < deadline, "the revocation never reached B");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(app_via_ingress(&b, &va, &revoked).0, 401);
    let token = token_via(&b, &va);
    assert_eq!(app_via_ingress(&a, &va, &token), app);
    // A request to it through B while it is SUSPENDED resumes it on A.
    let (status, v) = a.post(&format!("/v1/microvms/{va}/suspend"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&va, "SUSPENDED", Duration::from_secs(120));
    assert_eq!(
        app_via_ingress(&b, &va, &token),
        (200, "app on a\n".to_string())
    );
    assert_eq!(a.get(&format!("/v1/microvms/{va}")).1["state"], "RUNNING");
    assert_eq!(a.qemu_processes().len(), 1, "resumed on A, its owner");
    assert_eq!(b.qemu_processes().len(), 1);
    let before = count(&b, &va);
    // A call marked as passed on already is never acted on by a node that does not own the
    // microVM (it would have no actor for it): refused, whoever set the mark.
    let marked = ureq::post(&format!("{}/v1/microvms/{va}/terminate", b.base))
        .set("Authorization", &format!("Bearer {}", b.key))
        .set("x-kiln-forwarded-by", "somebody")
        .send_json(json!({}));
    let Err(ureq::Error::Status(409, r)) = marked else {
        panic!("a marked call was served by B: {marked:?}")
    };
    let body: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("belongs to node \"a\""),
        "{body}"
    );
    assert_eq!(a.get(&format!("/v1/microvms/{va}")).1["state"], "RUNNING");

    // A second kilnd named "a" is refused while A runs.
    let other = tempfile::tempdir().unwrap();
    let err = refused_start(other.path(), &flags_a);
    assert!(err.contains("a kilnd named \"a\" already runs"), "{err}");

    // kill -9 A: once its lease runs out, B reports its microVM unreachable and leaves it be.
    a.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    while node(&nodes(&b), "a")["reachable"] == true {
        assert!(Instant::now() < deadline, "A's lease never ran out");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, v) = b.get(&format!("/v1/microvms/{va}"));
    assert_eq!(status, 503, "{v}");
    // Listed from B with the reason; B's own microVM is not.
    let (_, all) = b.get("/v1/microvms");
    let listed = |id: &str| -> Value {
        all["microvms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["microvmId"] == id)
            .cloned()
            .unwrap()
    };
    assert!(
        listed(&va)["unreachable"]
            .as_str()
            .unwrap()
            .contains("UNREACHABLE"),
        "{all}"
    );
    assert!(listed(&vb).get("unreachable").is_none(), "{all}");
    let (status, body) = app_via_ingress(&b, &va, &token);
    assert_eq!(status, 502, "the ingress says so too: {body}");
    assert!(body.contains("UNREACHABLE"), "{body}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("UNREACHABLE") && message.contains("\"a\""),
        "{message}"
    );
    let (status, v) = b.post(&format!("/v1/microvms/{va}/terminate"), json!({}));
    assert_eq!(status, 503, "nothing acts on it meanwhile: {v}");
    assert_eq!(a.qemu_processes().len(), 1, "its QEMU outlives A's kilnd");
    assert_eq!(b.qemu_processes().len(), 1, "B started no second copy");
    assert_eq!(
        sh(&b, &vb, "echo ok").trim(),
        "ok",
        "B's own microVM is unaffected"
    );

    // A returns: it takes its microVM back, and B serves it again.
    a.spawn(&flags_a);
    a.wait_state(&va, "RUNNING", Duration::from_secs(60));
    assert_counts_on(&b, &va, before);
    assert_eq!(sh(&b, &va, "cat /root/note").trim(), "from-b");
    assert_eq!(node(&nodes(&b), "a")["reachable"], true);
    assert!(b
        .get(&format!("/v1/microvms/{va}"))
        .1
        .get("unreachable")
        .is_none());

    for (d, id) in [(&b, &va), (&b, &vb)] {
        let (status, v) = d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
        assert_eq!(status, 200, "{v}");
    }
    a.wait_state(&va, "TERMINATED", Duration::from_secs(60));
    b.wait_state(&vb, "TERMINATED", Duration::from_secs(60));
    // A TERMINATED microVM is a record any node answers for.
    assert_eq!(
        b.get(&format!("/v1/microvms/{va}")).1["state"],
        "TERMINATED"
    );
}

#[test]
fn a_burst_of_runs_through_both_nodes_places_each_once_within_capacity() {
    let Some(admin) = admin() else { return };
    let url = fresh_database(&admin);
    let secrets = tempfile::tempdir().unwrap();
    let file = url_file(secrets.path(), &url);
    let mut flags_a = node_flags("a", &file);
    // Room for three 512 MiB microVMs on A.
    let cap = flags_a
        .iter()
        .position(|f| f == "--capacity-memory-mib")
        .unwrap();
    flags_a[cap + 1] = "1536".into();
    let flags_a: Vec<&str> = flags_a.iter().map(String::as_str).collect();
    let flags_b = node_flags("b", &file);
    let flags_b: Vec<&str> = flags_b.iter().map(String::as_str).collect();
    let a = TestDaemon::start_with(&flags_a);
    let b = TestDaemon::start_seeded(&flags_b, &[("api-key", &a.key)]);
    a.build_image("burst", &[("Dockerfile", "FROM busybox\n")], json!({}));

    // Five at once, through either node: the image's files are on A, so all go there.
    let (placed, refused, answers) = burst(&[&a, &b], 5, "burst");
    assert_eq!((placed.len(), refused.len()), (3, 2), "{answers:?}");
    for r in refused {
        let message = r["message"].as_str().unwrap();
        assert!(
            message.contains("node \"a\" has 0 MiB of its 1536 MiB free")
                && message.contains("--capacity-memory-mib"),
            "{message}"
        );
    }
    let unique: std::collections::HashSet<&String> = placed.iter().collect();
    assert_eq!(unique.len(), 3, "each placed once: {placed:?}");
    for id in &placed {
        let v = b.wait_state(id, "RUNNING", Duration::from_secs(120));
        assert_eq!(v["node"], "a", "{v}");
    }
    assert_eq!(node(&nodes(&b), "a")["microvms"], 3);
    assert_eq!(node(&nodes(&b), "b")["microvms"], 0);
    assert_eq!(a.qemu_processes().len(), 3);
    assert!(b.qemu_processes().is_empty());

    // Room again once one is TERMINATED.
    let (status, v) = b.post(&format!("/v1/microvms/{}/terminate", placed[0]), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&placed[0], "TERMINATED", Duration::from_secs(60));
    let (status, v) = b.post("/v1/microvms", json!({"imageIdentifier": "burst"}));
    assert_eq!(status, 200, "{v}");
    for id in placed[1..]
        .iter()
        .chain([&v["microvmId"].as_str().unwrap().to_string()])
    {
        let (status, v) = a.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
        assert_eq!(status, 200, "{v}");
    }
}

#[test]
fn an_image_built_on_one_node_launches_on_another_from_object_storage() {
    let Some((flags, _secrets)) = object_store_nodes(&["a", "b"]) else {
        return;
    };
    let flags_a: Vec<&str> = flags[0].iter().map(String::as_str).collect();
    let flags_b: Vec<&str> = flags[1].iter().map(String::as_str).collect();
    let mut a = TestDaemon::start_with(&flags_a);
    let b = TestDaemon::start_seeded(&flags_b, &[("api-key", &a.key)]);
    let image = build_app(&a, "shared");
    // SUCCESSFUL in the store means uploaded: B needs nothing of A's, which is gone.
    a.kill9();
    let id = launch(&b, "shared");
    let v = b.get(&format!("/v1/microvms/{id}")).1;
    assert_eq!(v["node"], "b", "{v}");
    assert_eq!(b.qemu_processes().len(), 1, "it runs on B");
    assert!(a.qemu_processes().is_empty());
    // The image's own files and app, from A's build, on B.
    assert!(sh(&b, &id, "cat /srv/app.sh").contains("httpd -p 8080"));
    let token = token_via(&b, &id);
    assert_eq!(
        app_via_ingress(&b, &id, &token),
        (200, "app on a\n".to_string())
    );
    // Assembled once in B's home from blobs checked against their digests; the disk is one
    // standalone qcow2 (A's layer paths mean nothing here).
    let template = b.home.join("imported").join(&image).join("template");
    assert!(template.join("manifest.json").is_file());
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(template.join("disk.qcow2"))
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    let blobs = std::fs::read_dir(b.home.join("blobs")).unwrap().count();
    // A second launch uses the same template and downloads nothing more.
    let second = launch(&b, "shared");
    assert_eq!(
        std::fs::read_dir(b.home.join("blobs")).unwrap().count(),
        blobs
    );
    for id in [&id, &second] {
        let (status, v) = b.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
        assert_eq!(status, 200, "{v}");
        b.wait_state(id, "TERMINATED", Duration::from_secs(60));
    }
}

#[test]
fn a_suspended_microvm_resumes_on_another_node_once_its_own_is_gone_and_never_twice() {
    let Some((flags, _secrets)) = object_store_nodes(&["a", "b"]) else {
        return;
    };
    let flags_a: Vec<&str> = flags[0].iter().map(String::as_str).collect();
    let flags_b: Vec<&str> = flags[1].iter().map(String::as_str).collect();
    let mut a = TestDaemon::start_with(&flags_a);
    let mut b = TestDaemon::start_seeded(&flags_b, &[("api-key", &a.key)]);
    build_app(&a, "travel");
    let id = launch(&a, "travel");
    // The seed's prompt 2: a file and a process, then suspend.
    sh(&a, &id, &format!("echo kept > /root/file; {COUNTER}"));
    let before = count(&a, &id);
    let token = token_via(&b, &id);
    let (status, v) = a.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&id, "SUSPENDED", Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.log().contains("snapshot uploaded") {
        assert!(Instant::now() < deadline, "no upload: {}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // While A is alive, its SUSPENDED microVM stays A's.
    assert_eq!(b.get(&format!("/v1/microvms/{id}")).1["node"], "a");

    a.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    while node(&nodes(&b), "a")["reachable"] == true {
        assert!(Instant::now() < deadline, "A's lease never ran out");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The next request, through B's ingress: B takes it over and resumes it. B dies first
    // right after the move (fault injection): restarted, it holds the microVM, SUSPENDED.
    b.sigterm();
    b.spawn_env(&flags_b, &[("KILN_FAULT_AT", "takeover.moved")]);
    let _ = ureq::get(&format!("http://{}/m/{id}/", b.ingress))
        .set("X-Kiln-Auth", &token)
        .set("X-Kiln-Port", "8080")
        .timeout(Duration::from_secs(120))
        .call();
    b.wait_exit(Duration::from_secs(60));
    assert!(
        b.log().contains("killing this process at takeover.moved"),
        "{}",
        b.log()
    );
    b.spawn(&flags_b);
    let v = b.get(&format!("/v1/microvms/{id}")).1;
    assert_eq!(
        (&v["node"], &v["state"]),
        (&json!("b"), &json!("SUSPENDED")),
        "{v}"
    );
    assert_eq!(
        app_via_ingress(&b, &id, &token),
        (200, "app on a\n".to_string())
    );
    let v = b.get(&format!("/v1/microvms/{id}")).1;
    assert_eq!(
        (&v["node"], &v["state"]),
        (&json!("b"), &json!("RUNNING")),
        "{v}"
    );
    assert_eq!(b.qemu_processes().len(), 1, "it runs on B");
    assert_eq!(sh(&b, &id, "cat /root/file").trim(), "kept");
    assert_counts_on(&b, &id, before);

    // A comes back: it neither resumes nor serves it, and keeps nothing of it.
    a.spawn(&flags_a);
    assert!(a.log().contains("moved to another node"), "{}", a.log());
    assert!(!a.home.join("microvms").join(&id).exists());
    assert!(a.qemu_processes().is_empty());
    let v = a.get(&format!("/v1/microvms/{id}")).1;
    assert_eq!(
        (&v["node"], &v["state"]),
        (&json!("b"), &json!("RUNNING")),
        "{v}"
    );
    let (status, body) = app_via_ingress(&a, &id, &token);
    assert_eq!(status, 200, "served through A by B: {body}");
    assert!(a.qemu_processes().is_empty());
    let (status, v) = a.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    assert_eq!(status, 200, "{v}");
    b.wait_state(&id, "TERMINATED", Duration::from_secs(60));
    assert!(b.qemu_processes().is_empty());
}

#[test]
fn a_drained_node_hands_its_microvms_to_another_and_places_new_ones_there() {
    let Some((flags, _secrets)) = object_store_nodes(&["a", "b"]) else {
        return;
    };
    let flags_a: Vec<&str> = flags[0].iter().map(String::as_str).collect();
    let flags_b: Vec<&str> = flags[1].iter().map(String::as_str).collect();
    let mut a = TestDaemon::start_with(&flags_a);
    let b = TestDaemon::start_seeded(&flags_b, &[("api-key", &a.key)]);
    build_app(&a, "drained");
    let id = launch(&a, "drained");
    sh(&a, &id, &format!("echo kept > /root/file; {COUNTER}"));
    let before = count(&a, &id);
    let token = token_via(&a, &id);

    let (status, v) = b.post("/v1/nodes/a/drain", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["draining"], true, "{v}");
    assert_eq!(node(&nodes(&a), "a")["draining"], true);
    // A suspends it and hands it to B, which holds it SUSPENDED.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = b.get(&format!("/v1/microvms/{id}")).1;
        if v["node"] == "b" && v["state"] == "SUSPENDED" {
            break;
        }
        assert!(Instant::now() < deadline, "never handed to B: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(a.qemu_processes().is_empty());
    // Its next request, through A's ingress: it resumes on B, files and processes kept.
    assert_eq!(
        app_via_ingress(&a, &id, &token),
        (200, "app on a\n".to_string())
    );
    let v = a.get(&format!("/v1/microvms/{id}")).1;
    assert_eq!(
        (&v["node"], &v["state"]),
        (&json!("b"), &json!("RUNNING")),
        "{v}"
    );
    assert_eq!(sh(&a, &id, "cat /root/file").trim(), "kept");
    assert_counts_on(&b, &id, before);
    assert!(a.qemu_processes().is_empty());
    assert!(
        !a.home.join("microvms").join(&id).exists(),
        "A keeps nothing"
    );

    // RunMicrovm through the drained A runs on B; undrained, A takes them again.
    let (status, r) = a.post("/v1/microvms", json!({"imageIdentifier": "drained"}));
    assert_eq!(status, 200, "{r}");
    let placed = r["microvmId"].as_str().unwrap().to_string();
    assert_eq!(
        b.wait_state(&placed, "RUNNING", Duration::from_secs(90))["node"],
        "b"
    );
    let (status, v) = a.post("/v1/nodes/a/undrain", json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["draining"], false, "{v}");
    let again = launch(&a, "drained");
    assert_eq!(a.get(&format!("/v1/microvms/{again}")).1["node"], "a");
    let (status, v) = b.post("/v1/nodes/nowhere/drain", json!({}));
    assert_eq!(status, 404, "{v}");
    for id in [&id, &placed, &again] {
        let (status, v) = b.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
        assert_eq!(status, 200, "{v}");
        b.wait_state(id, "TERMINATED", Duration::from_secs(60));
    }

    // A running node is not removed; drained and stopped, it leaves by itself, with
    // nothing of it left in the cluster's store.
    let (status, v) = b.delete("/v1/nodes/a");
    assert_eq!(status, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("is running"), "{v}");
    let (status, v) = b.post("/v1/nodes/a/drain", json!({}));
    assert_eq!(status, 200, "{v}");
    a.sigterm();
    assert!(
        a.log().contains("this node left the cluster"),
        "{}",
        a.log()
    );
    let list = nodes(&b);
    let names: Vec<&Value> = list["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["name"])
        .collect();
    assert_eq!(names, [&json!("b")], "{list}");
    let (status, v) = b.delete("/v1/nodes/a");
    assert_eq!(status, 404, "{v}");
    // Its TERMINATED microVMs stay, as records.
    assert_eq!(
        b.get(&format!("/v1/microvms/{again}")).1["state"],
        "TERMINATED"
    );
}

#[test]
fn an_object_storage_outage_is_reported_loses_nothing_and_the_cluster_carries_on() {
    let Some((mut flags, _secrets)) = object_store_nodes(&["a", "b"]) else {
        return;
    };
    // Both nodes reach the storage through a link the test cuts.
    let url = std::env::var("KILN_TEST_S3_URL").unwrap();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let link = Link::to(port);
    for f in &mut flags {
        let at = f.iter().position(|x| x == "--object-store").unwrap() + 1;
        f[at] = f[at].replace(&format!(":{port}"), &format!(":{}", link.port));
    }
    // A offers less memory than B, so RunMicrovm through B places images from object
    // storage on B (placement goes by free memory).
    set_capacity(&mut flags[0], 1024);
    let flags_a: Vec<&str> = flags[0].iter().map(String::as_str).collect();
    let flags_b: Vec<&str> = flags[1].iter().map(String::as_str).collect();
    let a = TestDaemon::start_with(&flags_a);
    let b = TestDaemon::start_seeded(&flags_b, &[("api-key", &a.key)]);
    a.build_image("first", &[("Dockerfile", "FROM busybox\n")], json!({}));

    link.cut();
    // B cannot fetch the image: it says so, and nothing is started.
    let (status, v) = b.post("/v1/microvms", json!({"imageIdentifier": "first"}));
    assert_eq!(status, 503, "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("could not be fetched from object storage")
            && message.contains("nothing was started"),
        "{message}"
    );
    assert!(b.get("/v1/microvms").1["microvms"]
        .as_array()
        .unwrap()
        .is_empty());
    // An image built meanwhile is SUCCESSFUL on A and runs there.
    a.build_image("second", &[("Dockerfile", "FROM busybox\n")], json!({}));
    assert!(a
        .log()
        .contains("uploading the image to object storage failed"));
    let on_a = launch(&b, "second");
    assert_eq!(b.get(&format!("/v1/microvms/{on_a}")).1["node"], "a");
    // A suspend whose upload fails keeps the microVM, resumable where it is.
    sh(&a, &on_a, "echo kept > /root/file");
    let (status, v) = b.post(&format!("/v1/microvms/{on_a}/suspend"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&on_a, "SUSPENDED", Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.log().contains("uploading the snapshot failed") {
        assert!(Instant::now() < deadline, "{}", a.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, v) = b.post(&format!("/v1/microvms/{on_a}/resume"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&on_a, "RUNNING", Duration::from_secs(120));
    assert_eq!(sh(&b, &on_a, "cat /root/file").trim(), "kept");
    // Suspended again in the outage: its snapshot goes up once the storage is back.
    let (status, v) = b.post(&format!("/v1/microvms/{on_a}/suspend"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(&on_a, "SUSPENDED", Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.log().matches("uploading the snapshot failed").count() < 2 {
        assert!(Instant::now() < deadline, "{}", a.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!a.log().contains("snapshot uploaded"));

    // Back: B fetches and runs the first image, and A uploads the second image and the
    // snapshot by itself.
    link.restore();
    let on_b = launch(&b, "first");
    assert_eq!(b.get(&format!("/v1/microvms/{on_b}")).1["node"], "b");
    let deadline = Instant::now() + Duration::from_secs(90);
    while a.log().matches("image uploaded to object storage").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second image was never uploaded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    while !a.log().contains("snapshot uploaded") {
        assert!(Instant::now() < deadline, "the snapshot was never uploaded");
        std::thread::sleep(Duration::from_millis(200));
    }
    let second_on_b = launch(&b, "second");
    assert_eq!(b.get(&format!("/v1/microvms/{second_on_b}")).1["node"], "b");
    for id in [&on_a, &on_b, &second_on_b] {
        let (status, v) = b.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
        assert_eq!(status, 200, "{v}");
    }
}

/// The node a microVM runs on, asked through `d`.
fn node_of(d: &TestDaemon, id: &str) -> String {
    let v = d.wait_state(id, "RUNNING", Duration::from_secs(90));
    v["node"].as_str().unwrap().to_string()
}

#[test]
fn three_nodes_spread_microvms_and_a_stranded_one_resumes_on_a_node_with_room() {
    let Some((mut flags, _secrets)) = object_store_nodes(&["a", "b", "c"]) else {
        return;
    };
    // Room for two 512 MiB microVMs on each node.
    for f in &mut flags {
        set_capacity(f, 1024);
    }
    let flags = as_strs(&flags);
    let mut a = TestDaemon::start_with(&flags[0]);
    let b = TestDaemon::start_seeded(&flags[1], &[("api-key", &a.key)]);
    let mut c = TestDaemon::start_seeded(&flags[2], &[("api-key", &a.key)]);
    build_app(&a, "spread");

    // Three launches through C: each lands on the node with the most memory free, so one
    // on each (A first: it holds the image; then C, which needs no forward; then B).
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let (status, r) = c.post("/v1/microvms", json!({"imageIdentifier": "spread"}));
            assert_eq!(status, 200, "{r}");
            r["microvmId"].as_str().unwrap().to_string()
        })
        .collect();
    let placed: Vec<String> = ids.iter().map(|id| node_of(&c, id)).collect();
    assert_eq!(placed, ["a", "c", "b"], "spread across the nodes");
    // Each runs in its node's own uid range and cgroup root.
    for (id, (d, name)) in ids.iter().zip([(&a, "a"), (&c, "c"), (&b, "b")]) {
        assert_jailed_in_node(d, name, id);
    }
    let list = nodes(&b);
    for name in ["a", "b", "c"] {
        assert_eq!(node(&list, name)["microvms"], 1, "{list}");
    }
    // A list through C shows the live figures of A's microVM (shared at A's heartbeat),
    // as A's own GET does.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, list) = c.get("/v1/microvms");
        assert_eq!(status, 200, "{list}");
        let on_a = list["microvms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["microvmId"] == ids[0].as_str())
            .cloned()
            .unwrap();
        if on_a["metrics"]["hostMemoryBytes"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no live figures through C: {on_a}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // C fetched the image once and records that it holds it.
    assert!(c.home.join("imported").is_dir());
    assert_eq!(a.qemu_processes().len(), 1);
    assert_eq!(b.qemu_processes().len(), 1);
    assert_eq!(c.qemu_processes().len(), 1);
    // A fourth through C: every node has 512 MiB free and the image now: C, as it needs
    // no forward. C is full then.
    let (status, r) = c.post("/v1/microvms", json!({"imageIdentifier": "spread"}));
    assert_eq!(status, 200, "{r}");
    let fourth = r["microvmId"].as_str().unwrap().to_string();
    assert_eq!(node_of(&a, &fourth), "c");

    // The seed's prompt 2 on A's microVM: a file and a process, suspend, kill -9 A.
    let id = &ids[0];
    sh(&a, id, &format!("echo kept > /root/file; {COUNTER}"));
    let before = count(&a, id);
    let token = token_via(&c, id);
    let (status, v) = c.post(&format!("/v1/microvms/{id}/suspend"), json!({}));
    assert_eq!(status, 200, "{v}");
    a.wait_state(id, "SUSPENDED", Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.log().contains("snapshot uploaded") {
        assert!(Instant::now() < deadline, "no upload: {}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    a.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    while node(&nodes(&c), "a")["reachable"] == true {
        assert!(Instant::now() < deadline, "A's lease never ran out");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The next request, through C's ingress: C has no room, so it hands the microVM to
    // B (the node with room), which resumes it, file and process kept.
    assert_eq!(
        app_via_ingress(&c, id, &token),
        (200, "app on a\n".to_string())
    );
    assert!(
        c.log().contains("handed to a node with room"),
        "{}",
        c.log()
    );
    let v = c.get(&format!("/v1/microvms/{id}")).1;
    assert_eq!(
        (&v["node"], &v["state"]),
        (&json!("b"), &json!("RUNNING")),
        "{v}"
    );
    assert_eq!(b.qemu_processes().len(), 2, "it runs on B");
    assert_eq!(c.qemu_processes().len(), 2, "and not on C");
    assert_eq!(sh(&c, id, "cat /root/file").trim(), "kept");
    assert_counts_on(&b, id, before);
    // Every node full: RunMicrovm says so, naming a node and its capacity.
    let (status, v) = c.post("/v1/microvms", json!({"imageIdentifier": "spread"}));
    assert_eq!(status, 429, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("--capacity-memory-mib"),
        "{v}"
    );

    // A restarted neither resumes nor serves it, and keeps nothing of it.
    a.spawn(&flags[0]);
    assert!(a.log().contains("moved to another node"), "{}", a.log());
    assert!(!a.home.join("microvms").join(id).exists());
    assert!(a.qemu_processes().is_empty());
    let (status, body) = app_via_ingress(&a, id, &token);
    assert_eq!(status, 200, "served through A by B: {body}");
    assert!(a.qemu_processes().is_empty());
    for id in ids.iter().chain([&fourth]) {
        let (status, v) = a.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
        assert_eq!(status, 200, "{v}");
        a.wait_state(id, "TERMINATED", Duration::from_secs(60));
    }
    // C gone for good (killed, its lease run out, nothing of it left running): removed.
    c.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    while node(&nodes(&a), "c")["reachable"] == true {
        assert!(Instant::now() < deadline, "C's lease never ran out");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, v) = a.delete("/v1/nodes/c");
    assert_eq!(status, 204, "{v}");
    assert!(nodes(&a)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["name"] != "c"));
}

#[test]
fn nodes_call_each_other_over_tls_verified_against_the_cluster_ca() {
    let Some(admin) = admin() else { return };
    let secrets = tempfile::tempdir().unwrap();
    let file = url_file(secrets.path(), &fresh_database(&admin));
    // Each node's API certificate (for 127.0.0.1, its --advertise host) from a CA of its
    // own; the cluster CA file holds both.
    let loopback = [std::net::IpAddr::from([127, 0, 0, 1])];
    let mut cas = String::new();
    let mut certs = Vec::new();
    for name in ["a", "b"] {
        let dir = secrets.path().join(format!("tls-{name}"));
        let (cert, key) = kiln_daemon::tls::ensure(&dir, "kiln.localhost", &loopback).unwrap();
        let ca = dir.join("tls").join("ca.pem");
        cas.push_str(&std::fs::read_to_string(&ca).unwrap());
        certs.push((cert, key, ca));
    }
    let cluster_ca = secrets.path().join("cluster-ca.pem");
    std::fs::write(&cluster_ca, &cas).unwrap();
    let flags = |i: usize, name: &str, ca: &std::path::Path| -> Vec<String> {
        let mut f = node_flags(name, &file);
        let (cert, key, _) = &certs[i];
        for (flag, path) in [
            ("--api-tls-cert", cert.as_path()),
            ("--api-tls-key", key.as_path()),
            ("--cluster-ca-file", ca),
        ] {
            f.push(flag.to_string());
            f.push(path.to_str().unwrap().to_string());
        }
        f
    };
    let flags_a = flags(0, "a", &cluster_ca);
    let flags_b = flags(1, "b", &cluster_ca);
    let flags_a: Vec<&str> = flags_a.iter().map(String::as_str).collect();
    let flags_b: Vec<&str> = flags_b.iter().map(String::as_str).collect();
    let mut a = TestDaemon::start_with(&flags_a);
    a.trust(&cas);
    let mut b = TestDaemon::start_seeded(&flags_b, &[("api-key", &a.key)]);
    b.trust(&cas);
    assert!(b.base.starts_with("https://"), "{}", b.base);
    build_app(&a, "tls");

    // The image is on A only (no object storage): RunMicrovm through B is passed to A,
    // and so are B's calls about it, over TLS; B's ingress reaches it through the tunnel.
    let id = launch(&b, "tls");
    assert_eq!(b.get(&format!("/v1/microvms/{id}")).1["node"], "a");
    assert!(sh(&b, &id, "cat /srv/app.sh").contains("httpd -p 8080"));
    let token = token_via(&b, &id);
    assert_eq!(
        app_via_ingress(&b, &id, &token),
        (200, "app on a\n".to_string())
    );
    assert!(!b.log().contains("calls the others over plain HTTP"));

    // B trusting only its own CA refuses A's certificate, and the call says so.
    b.sigterm();
    let alone = flags(1, "b", &certs[1].2);
    let alone: Vec<&str> = alone.iter().map(String::as_str).collect();
    b.spawn(&alone);
    let (status, v) = b.get(&format!("/v1/microvms/{id}"));
    assert_eq!(status, 503, "{v}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("does not answer") && message.contains("invalid peer certificate"),
        "{message}"
    );
    // Without the certificate the flag makes no sense: refused at start.
    let home = tempfile::tempdir().unwrap();
    let err = refused_start(
        home.path(),
        &["--cluster-ca-file", cluster_ca.to_str().unwrap()],
    );
    assert!(err.contains("--api-tls-cert"), "{err}");
    let (status, v) = a.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn a_burst_through_three_nodes_fills_each_within_capacity_and_places_each_once() {
    let Some((mut flags, _secrets)) = object_store_nodes(&["a", "b", "c"]) else {
        return;
    };
    // Room for two 512 MiB microVMs on each node: six in all.
    for f in &mut flags {
        set_capacity(f, 1024);
    }
    let flags = as_strs(&flags);
    let a = TestDaemon::start_with(&flags[0]);
    let b = TestDaemon::start_seeded(&flags[1], &[("api-key", &a.key)]);
    let c = TestDaemon::start_seeded(&flags[2], &[("api-key", &a.key)]);
    a.build_image("burst3", &[("Dockerfile", "FROM busybox\n")], json!({}));

    // Seven at once through the three nodes: each is placed on a node with room (the next
    // one when its first choice filled meanwhile), so six run, two on each node, and one is
    // refused naming the capacity.
    let (placed, refused, answers) = burst(&[&a, &b, &c], 7, "burst3");
    assert_eq!((placed.len(), refused.len()), (6, 1), "{answers:?}");
    assert!(
        refused[0]["message"]
            .as_str()
            .unwrap()
            .contains("--capacity-memory-mib"),
        "{answers:?}"
    );
    let unique: std::collections::HashSet<&String> = placed.iter().collect();
    assert_eq!(unique.len(), 6, "each placed once: {placed:?}");
    let mut on: std::collections::HashMap<String, usize> = Default::default();
    for id in &placed {
        *on.entry(node_of(&b, id)).or_default() += 1;
    }
    assert_eq!(
        on,
        [("a", 2), ("b", 2), ("c", 2)]
            .map(|(n, k)| (n.to_string(), k))
            .into(),
        "within each node's capacity"
    );
    let list = nodes(&c);
    for (name, d) in [("a", &a), ("b", &b), ("c", &c)] {
        assert_eq!(node(&list, name)["microvms"], 2, "{list}");
        assert_eq!(d.qemu_processes().len(), 2, "node {name}");
    }
    for id in &placed {
        let (status, v) = c.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
        assert_eq!(status, 200, "{v}");
    }
}
