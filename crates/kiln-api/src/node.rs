//! kilnd nodes: in a cluster, the kilnds sharing one database (single-node kilnd lists
//! itself).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a node offers to microVMs (its flags, else the machine).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    pub memory_mib: u64,
    pub vcpus: u32,
    pub disk_mib: u64,
}

/// `GET /v1/nodes` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// `--node-name`.
    #[schema(example = "node-a")]
    pub name: String,
    /// Where the other nodes reach its API (`--advertise`).
    #[schema(example = "10.0.0.5:7070")]
    pub advertise: String,
    pub capacity: NodeCapacity,
    /// Unix seconds.
    pub started_at: i64,
    /// Unix milliseconds of its last heartbeat.
    pub heartbeat_at_ms: i64,
    /// Its lease is valid (a heartbeat within `--node-lease-seconds`): it serves its
    /// microVMs. Otherwise they are unreachable until it comes back.
    pub reachable: bool,
    /// Its microVMs that are not TERMINATED.
    pub microvms: usize,
    /// Drained (`kiln node drain`): it takes no new microVMs and hands its own to other
    /// nodes, suspended.
    #[serde(default)]
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeList {
    pub nodes: Vec<Node>,
    /// The node that answered.
    pub this_node: String,
}
