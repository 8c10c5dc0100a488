//! Ingress traffic for another node's microVM: the receiving node's proxy checks the token
//! and parses HTTP as for its own microVMs, and gets its byte stream to the guest port
//! through the owner node: an HTTP upgrade to `GET /internal/v1/tunnel/{id}/{port}` on the
//! owner's API (the cluster key), after which the connection carries the guest port's bytes
//! both ways. The owner connects as its own ingress would, auto-resuming a SUSPENDED
//! microVM, and holds the microVM's activity while the tunnel is open.
//!
//! Not in the OpenAPI spec: nodes call it, clients do not.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use kiln_proxy::server::{Backend, BackendError, GuestStream};
use kiln_store::NodeRow;

use crate::ingress::IngressBackend;
use crate::manager::Manager;

/// The `Upgrade` protocol of a tunnel.
pub const PROTOCOL: &str = "kiln-tunnel";
/// The route on the owner node.
pub const ROUTE: &str = "/internal/v1/tunnel/{id}/{port}";
/// The most of an owner's refusal (its message) that is read.
const MAX_REFUSAL: usize = 4096;

fn refuse(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// The owner's side: connects to the guest port, then answers 101 and splices.
pub async fn serve(
    State(m): State<Arc<Manager>>,
    Path((id, port)): Path<(String, u16)>,
    mut req: Request,
) -> Response {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(PROTOCOL) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("a tunnel needs Upgrade: {PROTOCOL}"),
        );
    }
    let backend = IngressBackend(m.clone());
    if backend.hook_port(&id) == Some(port) {
        return refuse(
            StatusCode::FORBIDDEN,
            "the lifecycle hook port is not reachable".into(),
        );
    }
    let guest = match backend.connect(&id, port).await {
        Ok(g) => g,
        Err(BackendError::NotFound) => {
            return refuse(StatusCode::NOT_FOUND, format!("no microVM {id}"))
        }
        Err(BackendError::NotRunning(why)) => return refuse(StatusCode::CONFLICT, why),
        Err(BackendError::Unavailable(why)) => return refuse(StatusCode::BAD_GATEWAY, why),
    };
    let activity = backend.activity(&id);
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _activity = activity;
        if let Ok(upgraded) = on_upgrade.await {
            let mut client = TokioIo::new(upgraded);
            let mut guest = guest;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The receiving node's side: a stream to `port` of `id`, through its owner `node`.
pub async fn open(
    m: &Manager,
    key: &str,
    node: &NodeRow,
    id: &str,
    port: u16,
) -> Result<Box<dyn GuestStream>, BackendError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        BackendError::Unavailable(format!(
            "node {:?} at {}, which runs microVM {id}, does not answer ({e})",
            node.name, node.advertise
        ))
    };
    let mut sender = crate::cluster::connect_node(m, node)
        .await
        .map_err(|e| unavailable(&e))?;
    let req = hyper::Request::get(format!("/internal/v1/tunnel/{id}/{port}"))
        .header(header::HOST, &node.advertise)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PROTOCOL)
        .header(crate::cluster::FORWARDED_BY, &m.cfg.node_name)
        .body(Empty::<Bytes>::new())
        .map_err(|e| unavailable(&e))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| unavailable(&e))?;
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| unavailable(&e))?;
        return Ok(Box::new(TokioIo::new(upgraded)));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_REFUSAL)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Err(match status {
        StatusCode::NOT_FOUND => BackendError::NotFound,
        StatusCode::CONFLICT => BackendError::NotRunning(body),
        _ => BackendError::Unavailable(format!("node {:?}: {status} {body}", node.name)),
    })
}
