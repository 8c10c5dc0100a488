//! spec/openapi.yaml is what kilnd's API types and handlers generate (run with
//! KILN_UPDATE_SPEC=1 to rewrite it), it lists exactly the API's routes, and it documents the
//! security scheme and the error responses of every operation. (tests/api.rs checks the live
//! router against the same spec, both ways.)

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use utoipa::openapi::path::Operation;
use utoipa::openapi::RefOr;

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/openapi.yaml");

/// The API's routes as the README and the clients know them.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/v1/nodes"),
    ("post", "/v1/nodes/{name}/drain"),
    ("post", "/v1/nodes/{name}/undrain"),
    ("delete", "/v1/nodes/{name}"),
    ("post", "/v1/artifacts"),
    ("post", "/v1/images"),
    ("get", "/v1/images"),
    ("get", "/v1/images/{id}"),
    ("patch", "/v1/images/{id}"),
    ("delete", "/v1/images/{id}"),
    ("get", "/v1/images/{id}/logs"),
    ("post", "/v1/microvms"),
    ("get", "/v1/microvms"),
    ("patch", "/v1/microvms/{id}"),
    ("get", "/v1/microvms/{id}"),
    ("delete", "/v1/microvms/{id}"),
    ("post", "/v1/microvms/{id}/suspend"),
    ("post", "/v1/microvms/{id}/resume"),
    ("post", "/v1/microvms/{id}/fork"),
    ("post", "/v1/microvms/{id}/image"),
    ("post", "/v1/microvms/{id}/terminate"),
    ("post", "/v1/microvms/{id}/exec"),
    ("get", "/v1/microvms/{id}/metrics"),
    ("get", "/v1/microvms/{id}/logs"),
    ("get", "/v1/microvms/{id}/disk"),
    ("get", "/v1/microvms/{id}/files"),
    ("delete", "/v1/microvms/{id}/files"),
    ("get", "/v1/microvms/{id}/files/stat"),
    ("get", "/v1/microvms/{id}/files/content"),
    ("put", "/v1/microvms/{id}/files/content"),
    ("get", "/v1/microvms/{id}/files/archive"),
    ("put", "/v1/microvms/{id}/files/archive"),
    ("post", "/v1/microvms/{id}/files/mkdir"),
    ("post", "/v1/microvms/{id}/files/move"),
    ("get", "/v1/microvms/{id}/files/watch"),
    ("get", "/v1/events"),
    ("get", "/v1/events/stream"),
    ("get", "/v1/ingress"),
    ("post", "/v1/auth-tokens"),
    ("post", "/v1/auth-tokens/rotate-key"),
    ("delete", "/v1/auth-tokens/{id}"),
    ("post", "/v1/microvms/{id}/revoke-tokens"),
    ("post", "/v1/webhooks"),
    ("get", "/v1/webhooks"),
    ("delete", "/v1/webhooks/{id}"),
    ("get", "/v1/webhooks/{id}/deliveries"),
    ("post", "/v1/microvms/{id}/processes"),
    ("get", "/v1/microvms/{id}/processes"),
    ("get", "/v1/microvms/{id}/processes/{pid}"),
    ("get", "/v1/microvms/{id}/processes/{pid}/output"),
    ("post", "/v1/microvms/{id}/processes/{pid}/stdin"),
    ("post", "/v1/microvms/{id}/processes/{pid}/signal"),
    ("post", "/v1/microvms/{id}/processes/{pid}/resize"),
];

#[test]
fn the_checked_in_spec_is_the_generated_one() {
    let generated = kiln_daemon::api::openapi_yaml().unwrap();
    if std::env::var_os("KILN_UPDATE_SPEC").is_some() {
        std::fs::write(SPEC, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(SPEC).unwrap_or_default();
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or(
                checked_in.lines().count().min(generated.lines().count()),
                |i| i,
            );
        panic!(
            "spec/openapi.yaml is stale (first difference at line {}): regenerate it with \
             `KILN_UPDATE_SPEC=1 cargo test -p kiln-daemon --test openapi` and commit it",
            line + 1
        );
    }
}

#[test]
fn the_spec_lists_exactly_the_routes() {
    let documented: BTreeSet<(String, String)> =
        kiln_daemon::api::operations().into_iter().collect();
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = listed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "listed but not in the spec: {missing:?}"
    );
    assert!(extra.is_empty(), "in the spec but not listed: {extra:?}");
}

fn operations() -> Vec<(String, String, Operation)> {
    let spec = kiln_daemon::api::openapi();
    let mut out = Vec::new();
    for (path, item) in spec.paths.paths {
        for (method, op) in [
            ("get", item.get),
            ("post", item.post),
            ("put", item.put),
            ("delete", item.delete),
            ("patch", item.patch),
        ] {
            if let Some(op) = op {
                out.push((method.to_string(), path.clone(), op));
            }
        }
    }
    out
}

/// Every error an operation documents has the error body.
fn error_statuses(op: &Operation) -> BTreeSet<u16> {
    op.responses
        .responses
        .iter()
        .filter_map(|(status, resp)| {
            let code: u16 = status.parse().ok()?;
            if code < 400 {
                return None;
            }
            let RefOr::T(resp) = resp else {
                return Some(code);
            };
            let json = resp.content.get("application/json");
            assert!(json.is_some(), "{} has no JSON error body", status);
            Some(code)
        })
        .collect()
}

#[test]
fn every_operation_documents_its_security_and_errors() {
    let spec = kiln_daemon::api::openapi();
    let schemes = &spec.components.as_ref().unwrap().security_schemes;
    assert!(schemes.contains_key("bearer"), "no bearer scheme");
    for (method, path, op) in operations() {
        let what = format!("{method} {path}");
        let public = path == "/health" || path == "/metrics";
        let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
        assert_eq!(secured, !public, "{what}: security");
        let errors = error_statuses(&op);
        if !public {
            assert!(errors.contains(&401), "{what} does not document 401");
        }
        if path.contains("/v1/microvms/{id}") || path.starts_with("/v1/images/{id}") {
            assert!(errors.contains(&404), "{what} does not document 404");
        }
        let has_query = op.parameters.as_ref().is_some_and(|ps| {
            ps.iter()
                .any(|p| p.parameter_in == utoipa::openapi::path::ParameterIn::Query)
        });
        if op.request_body.is_some() || has_query {
            assert!(errors.contains(&400), "{what} does not document 400");
        }
        if path != "/health" && path != "/v1/auth-tokens/{id}" {
            assert!(errors.contains(&500), "{what} does not document 500");
        }
        assert!(op.description.is_some(), "{what} has no description");
    }
}
