//! Labels and list paging through the real API: labels set at creation are returned
//! everywhere, updated by PATCH (set, remove, kept), inherited by fork clones, kept across a
//! restart of kilnd; lists filter by state, image and labels on the server and page with a
//! cursor that neither loses nor repeats an item; malformed labels and cursors get a 400 that
//! says what to fix.

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::TestDaemon;
use serde_json::{json, Value};

const DOCKERFILE: &str = "FROM busybox\nCMD [\"sleep\", \"86400\"]\n";

fn run(d: &TestDaemon, labels: Value) -> String {
    let (status, r) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "tagged", "labels": labels}),
    );
    assert_eq!(status, 200, "{r}");
    let id = r["microvmId"].as_str().unwrap().to_string();
    d.wait_state(&id, "RUNNING", Duration::from_secs(90));
    id
}

/// The ids a list answers, in order, and its next cursor.
fn ids(d: &TestDaemon, query: &str) -> (Vec<String>, Option<String>) {
    let (status, v) = d.get(&format!("/v1/microvms?{query}"));
    assert_eq!(status, 200, "{query}: {v}");
    let ids = v["microvms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["microvmId"].as_str().unwrap().to_string())
        .collect();
    (ids, v["nextCursor"].as_str().map(String::from))
}

#[test]
fn labels_filter_page_update_and_survive_a_restart() {
    let mut d = TestDaemon::start();
    let (status, art) = d.post_raw(
        "/v1/artifacts",
        "application/x-tar",
        &common::tar_of(&[("Dockerfile", DOCKERFILE)]),
        true,
    );
    assert_eq!(status, 200, "{art}");
    let (status, img) = d.post(
        "/v1/images",
        json!({"name": "tagged", "codeArtifact": {"artifactId": art["artifactId"]},
               "waitForReady": false, "labels": {"team": "a", "tier": "gold"}}),
    );
    assert_eq!(status, 202, "{img}");
    d.wait_image(img["imageIdentifier"].as_str().unwrap());
    let (_, got) = d.get("/v1/images/tagged");
    assert_eq!(got["labels"], json!({"team": "a", "tier": "gold"}));
    // Image labels: filters, and an update that sets one and removes another.
    let (_, l) = d.get("/v1/images?label=team=a");
    assert_eq!(l["images"].as_array().unwrap().len(), 1, "{l}");
    let (_, l) = d.get("/v1/images?label=team=b");
    assert!(l["images"].as_array().unwrap().is_empty(), "{l}");
    let (status, upd) = d.patch(
        "/v1/images/tagged",
        json!({"labels": {"tier": null, "owner": "ops"}}),
    );
    assert_eq!(status, 200, "{upd}");
    assert_eq!(upd["labels"], json!({"team": "a", "owner": "ops"}));

    let a = run(&d, json!({"team": "a", "env": "dev"}));
    let b = run(&d, json!({"team": "b"}));
    let c = run(&d, json!({"team": "a"}));
    let (_, got) = d.get(&format!("/v1/microvms/{a}"));
    assert_eq!(got["labels"], json!({"team": "a", "env": "dev"}));

    // Server-side filters: labels (all must match), state and image together.
    assert_eq!(ids(&d, "label=team=a").0, vec![a.clone(), c.clone()]);
    assert_eq!(ids(&d, "label=team=a&label=env").0, vec![a.clone()]);
    assert_eq!(ids(&d, "label=env=prod").0, Vec::<String>::new());
    assert_eq!(
        ids(&d, "state=RUNNING&image=tagged&label=team=b").0,
        vec![b.clone()]
    );
    assert_eq!(
        ids(&d, "state=SUSPENDED&label=team=b").0,
        Vec::<String>::new()
    );

    // Pages of one: every microVM once, oldest first, then no cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=1&cursor={c}"),
            None => "limit=1".to_string(),
        };
        let (page, next) = ids(&d, &q);
        assert!(page.len() <= 1, "{page:?}");
        seen.extend(page);
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, vec![a.clone(), b.clone(), c.clone()]);

    // Updates: set, change and remove; labels not named are kept.
    let (status, upd) = d.patch(
        &format!("/v1/microvms/{b}"),
        json!({"labels": {"team": "a", "env": "prod"}}),
    );
    assert_eq!(status, 200, "{upd}");
    assert_eq!(upd["labels"], json!({"team": "a", "env": "prod"}));
    let (_, upd) = d.patch(
        &format!("/v1/microvms/{b}"),
        json!({"labels": {"env": null}}),
    );
    assert_eq!(upd["labels"], json!({"team": "a"}));
    assert_eq!(
        ids(&d, "label=team=a").0,
        vec![a.clone(), b.clone(), c.clone()]
    );

    // Clones of a fork inherit their parent's labels.
    let (status, forked) = d.post(&format!("/v1/microvms/{a}/fork"), json!({"count": 1}));
    assert_eq!(status, 200, "{forked}");
    let clone = forked["microvms"][0]["microvmId"]
        .as_str()
        .unwrap()
        .to_string();
    d.wait_state(&clone, "RUNNING", Duration::from_secs(90));
    assert_eq!(
        d.get(&format!("/v1/microvms/{clone}")).1["labels"],
        json!({"team": "a", "env": "dev"})
    );

    // Bad input: a 400 that names what to fix, and nothing changed.
    for (body, needle) in [
        (json!({"labels": {"bad key": "x"}}), "label key"),
        (json!({"labels": {"k": "tab\there"}}), "control characters"),
    ] {
        let (status, e) = d.patch(&format!("/v1/microvms/{c}"), body);
        assert_eq!(status, 400, "{e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{e}");
    }
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (status, e) = d.post(
        "/v1/microvms",
        json!({"imageIdentifier": "tagged", "labels": many}),
    );
    assert_eq!(status, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("at most 64"), "{e}");
    for query in ["label=bad%20key", "limit=0", "limit=1001", "cursor=..%2Fx", "label=a&label=b&label=c&label=d&label=e&label=f&label=g&label=h&label=i&label=j&label=k&label=l&label=m&label=n&label=o&label=p&label=q"] {
        let (status, e) = d.get(&format!("/v1/microvms?{query}"));
        assert_eq!(status, 400, "{query}: {e}");
    }
    let (status, _) = d.patch("/v1/microvms/mvm-0000000000000000", json!({"labels": {}}));
    assert_eq!(status, 404);
    assert_eq!(
        d.get(&format!("/v1/microvms/{c}")).1["labels"],
        json!({"team": "a"})
    );

    // Kept in SQLite across a restart of kilnd.
    d.sigterm();
    d.spawn(&[]);
    assert_eq!(
        d.get(&format!("/v1/microvms/{b}")).1["labels"],
        json!({"team": "a"})
    );
    assert_eq!(
        d.get("/v1/images/tagged").1["labels"],
        json!({"team": "a", "owner": "ops"})
    );
    assert_eq!(ids(&d, "label=env=dev").0, vec![a.clone(), clone.clone()]);
    for id in [a, b, c, clone] {
        d.post(&format!("/v1/microvms/{id}/terminate"), json!({}));
    }
}
