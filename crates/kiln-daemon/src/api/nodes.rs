//! The nodes of a cluster: ListNodes, DrainNode, UndrainNode, RemoveNode.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use kiln_api::{ErrorBody, Node, NodeList};
use kiln_store::now_ms;
use kiln_types::MicrovmState;

use crate::cluster::{is_shared, owner, reachable};
use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

fn nodes(m: &Manager) -> ApiResult<Vec<Node>> {
    let rows = m.store().nodes()?;
    let microvms = m.store().microvms(None, None)?;
    let draining = crate::drain::draining_nodes(m)?;
    let now = now_ms();
    Ok(rows
        .into_iter()
        .filter(|n| is_shared(m) || n.name == m.cfg.node_name)
        .map(|n| Node {
            microvms: microvms
                .iter()
                .filter(|r| r.state != MicrovmState::Terminated && owner(m, r) == n.name)
                .count(),
            reachable: reachable(m, &n, now),
            capacity: serde_json::from_value(n.capacity).unwrap_or_default(),
            started_at: n.started_at / 1000,
            heartbeat_at_ms: n.heartbeat_at,
            advertise: n.advertise,
            draining: draining.contains(&n.name),
            name: n.name,
        })
        .collect())
}

#[utoipa::path(
    get, path = "/v1/nodes", operation_id = "ListNodes", tag = "system", security(("bearer" = [])),
    description = "ListNodes: the kilnd nodes sharing this database, with their capacity, \
        heartbeat, microVMs and whether they are draining (one, this node, without a cluster).",
    responses(
        (status = 200, description = "The nodes", body = NodeList),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn list_nodes(State(m): State<Arc<Manager>>) -> ApiResult<Json<NodeList>> {
    Ok(Json(NodeList {
        nodes: nodes(&m)?,
        this_node: m.cfg.node_name.clone(),
    }))
}

async fn set_draining(m: &Manager, name: &str, on: bool) -> ApiResult<Json<Node>> {
    if !is_shared(m) {
        return Err(ApiError::conflict(
            "a single kilnd has no other node to hand its microVMs to: draining is for a \
             cluster (kilnd --database-url-file and --object-store)",
        ));
    }
    if on && m.blobs.is_none() {
        return Err(ApiError::conflict(
            "draining moves SUSPENDED microVMs through object storage: start the nodes with \
             --object-store",
        ));
    }
    let find = |m: &Manager| -> ApiResult<Option<Node>> {
        Ok(nodes(m)?.into_iter().find(|n| n.name == name))
    };
    if find(m)?.is_none() {
        return Err(ApiError::not_found("node", name));
    }
    crate::drain::set(m, name, on)?;
    find(m)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("node", name))
}

#[utoipa::path(
    post, path = "/v1/nodes/{name}/drain", operation_id = "DrainNode", tag = "system",
    security(("bearer" = [])),
    description = "DrainNode: the node takes no new microVMs (RunMicrovm through it places \
        them on another node), suspends its RUNNING microVMs and hands each, with its \
        snapshot, to the node with the most free memory, where it resumes on its next \
        request. Idempotent; UndrainNode ends it.",
    params(("name" = String, Path, description = "The node's --node-name")),
    responses(
        (status = 200, description = "The node, draining", body = Node),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Not a cluster with object storage", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn drain_node(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    set_draining(&m, &name, true).await
}

#[utoipa::path(
    post, path = "/v1/nodes/{name}/undrain", operation_id = "UndrainNode", tag = "system",
    security(("bearer" = [])),
    description = "UndrainNode: the node takes new microVMs again (those it handed off stay \
        where they went).",
    params(("name" = String, Path, description = "The node's --node-name")),
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Not a cluster", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn undrain_node(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    set_draining(&m, &name, false).await
}

#[utoipa::path(
    delete, path = "/v1/nodes/{name}", operation_id = "RemoveNode", tag = "system",
    security(("bearer" = [])),
    description = "RemoveNode: forgets a node that is gone for good (its lease ran out) and \
        holds no microVM that is not TERMINATED. A node that is drained and then stopped \
        cleanly leaves by itself.",
    params(("name" = String, Path, description = "The node's --node-name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "No or a wrong API key", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Not a cluster, the node is running, or it still holds microVMs", body = ErrorBody),
        (status = 500, description = "kilnd failed", body = ErrorBody),
    )
)]
pub async fn remove_node(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    if !is_shared(&m) {
        return Err(ApiError::conflict(
            "a single kilnd is its own only node: there is no node to remove",
        ));
    }
    let Some(node) = nodes(&m)?.into_iter().find(|n| n.name == name) else {
        return Err(ApiError::not_found("node", &name));
    };
    if node.reachable {
        return Err(ApiError::conflict(format!(
            "node {name:?} is running (its last heartbeat was {:.1} s ago): drain it (kiln node \
             drain {name}) and stop its kilnd; it then leaves by itself",
            (now_ms() - node.heartbeat_at_ms).max(0) as f64 / 1000.0
        )));
    }
    if node.microvms > 0 {
        return Err(ApiError::conflict(format!(
            "node {name:?} still holds {} microVMs that are not TERMINATED: its SUSPENDED ones \
             move to another node on their next request, its RUNNING ones are UNREACHABLE \
             until it is back; remove it once they are gone",
            node.microvms
        )));
    }
    crate::drain::forget_node(&m, &name)?;
    tracing::info!(node = name, "node removed from the cluster");
    Ok(StatusCode::NO_CONTENT)
}
