//! Where a new microVM runs in a cluster (RunMicrovm through any node).
//!
//! The candidates are the reachable, undrained nodes that can launch the image: the node
//! that built it and, once the image is in object storage, every node. The one with the
//! most memory free (what it offers, less what its microVMs that are not TERMINATED hold)
//! wins; ties go to a node with the image cached (no fetch), then to this node (no
//! forward), then by name. So microVMs spread over the nodes, and an image is fetched
//! where it is needed.
//!
//! The claim that counts is the owner's transaction (`claim_and_insert`): two nodes placing
//! at once may pick the same node, and the loser's refusal (429) sends the call on to the
//! next candidate with room. A burst never overfills a node, and is refused only when no
//! node has room.

use std::collections::HashMap;
use std::path::PathBuf;

use kiln_api::ErrorCode;
use kiln_store::{now_ms, ImageRow, NodeRow};
use kiln_types::MicrovmState;

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;

/// Where to try a RunMicrovm, in order.
#[derive(Debug)]
pub enum Target {
    Here,
    Node(NodeRow),
}

/// A node that could run a microVM of an image.
#[derive(Debug)]
pub struct Candidate {
    pub node: NodeRow,
    /// Its memory (MiB) offered and free.
    pub capacity: i64,
    pub free: i64,
    /// It holds the image's files (built it, or fetched them).
    pub cached: bool,
}

const CACHED: &str = "image-cached/";

fn cached_key(image: &str, node: &str) -> String {
    format!("{CACHED}{image}/{node}")
}

/// Records that this node holds `image`'s files now (fetched from object storage).
pub fn mark_cached(m: &Manager, image: &str) {
    if let Err(e) = m.write(|s| s.set_shared_value(&cached_key(image, &m.cfg.node_name), "1")) {
        tracing::warn!(image, "recording the image as cached here failed: {e}");
    }
}

/// Forgets, for every node, that it cached `image` (the image is deleted).
pub fn forget_cached(m: &Manager, image: &str) {
    let Ok(nodes) = m.store().nodes() else { return };
    for n in nodes {
        let _ = m.write(|s| s.delete_shared_value(&cached_key(image, &n.name)));
    }
}

/// Forgets which images `node` cached (it left the cluster).
pub fn forget_node(m: &Manager, node: &str) -> ApiResult<()> {
    let suffix = format!("/{node}");
    let names = m.store().shared_value_names(CACHED)?;
    for name in names.into_iter().filter(|n| n.ends_with(&suffix)) {
        m.write(|s| s.delete_shared_value(&name))?;
    }
    Ok(())
}

/// The memory (MiB) held on each node by its microVMs that are not TERMINATED.
pub(crate) fn used_by_node(m: &Manager) -> ApiResult<HashMap<String, i64>> {
    let mut used = HashMap::new();
    for r in m.store().microvms(None, None)? {
        if r.state != MicrovmState::Terminated {
            *used.entry(r.node).or_insert(0) += r.memory_mib;
        }
    }
    Ok(used)
}

/// `node`'s memory (MiB) offered, and free given `used`.
pub(crate) fn memory(node: &NodeRow, used: &HashMap<String, i64>) -> (i64, i64) {
    let capacity = node.capacity["memoryMib"].as_i64().unwrap_or(0);
    (
        capacity,
        capacity - used.get(&node.name).copied().unwrap_or(0),
    )
}

/// The memory (MiB) a microVM of `img` takes.
pub(crate) fn need_of(img: &ImageRow) -> i64 {
    img.record["memory_mib"].as_i64().unwrap_or(512)
}

/// Whether `node` holds `img`'s files because it built them.
fn built_on(m: &Manager, img: &ImageRow, node: &str) -> bool {
    if img.node.is_empty() {
        node == m.cfg.node_name
    } else {
        img.node == node
    }
}

/// The nodes that could run a microVM of `img`, best first (see the module's doc).
pub fn candidates(m: &Manager, img: &ImageRow) -> ApiResult<Vec<Candidate>> {
    let shared = crate::share::in_object_storage(m, &img.id)?;
    let draining = crate::drain::draining_nodes(m)?;
    let used = used_by_node(m)?;
    let now = now_ms();
    let mut out = Vec::new();
    // Bound first: the store's guard must not live across the loop's own reads.
    let nodes = m.store().nodes()?;
    for node in nodes {
        let built = built_on(m, img, &node.name);
        if draining.contains(&node.name)
            || !crate::cluster::reachable(m, &node, now)
            || !(built || shared)
        {
            continue;
        }
        let cached = built
            || m.store()
                .shared_value(&cached_key(&img.id, &node.name))?
                .is_some();
        let (capacity, free) = memory(&node, &used);
        out.push(Candidate {
            node,
            capacity,
            free,
            cached,
        });
    }
    rank(&mut out, &m.cfg.node_name);
    Ok(out)
}

/// Best first: the most memory free, then the image cached, then `here`, then by name.
fn rank(candidates: &mut [Candidate], here: &str) {
    candidates.sort_by_key(|c| {
        (
            std::cmp::Reverse(c.free),
            std::cmp::Reverse(c.cached),
            c.node.name != here,
            c.node.name.clone(),
        )
    });
}

/// Where to try a RunMicrovm of `image`, in order: every candidate with room, or, when none
/// has, the best one (its refusal says why). A call another node passed on runs here (one
/// hop). Without a shared store, always here.
pub fn targets(m: &Manager, image: &str, forwarded: bool) -> ApiResult<Vec<Target>> {
    if !crate::cluster::is_shared(m) || forwarded {
        return Ok(vec![Target::Here]);
    }
    let Some(img) = m.store().image(image)? else {
        // RunMicrovm answers 404.
        return Ok(vec![Target::Here]);
    };
    let need = need_of(&img);
    let all = candidates(m, &img)?;
    if all.is_empty() {
        return Err(nowhere(m, &img));
    }
    let with_room = all.iter().filter(|c| c.free >= need).count().max(1);
    Ok(all
        .into_iter()
        .take(with_room)
        .map(|c| {
            if c.node.name == m.cfg.node_name {
                Target::Here
            } else {
                Target::Node(c.node)
            }
        })
        .collect())
}

/// Why no node can run a microVM of `img`.
fn nowhere(m: &Manager, img: &ImageRow) -> ApiError {
    let shared = crate::share::in_object_storage(m, &img.id).unwrap_or(false);
    let holder = if img.node.is_empty() {
        m.cfg.node_name.as_str()
    } else {
        img.node.as_str()
    };
    let message = if shared {
        format!(
            "no node can run image {} now: every node is draining or has sent no heartbeat \
             within its lease; retry later",
            img.id
        )
    } else if crate::drain::is_draining(m, holder) {
        format!(
            "image {} is held by node {holder:?}, which is draining, and is not in object \
             storage for another node to run it: undrain the node, or rebuild the image with \
             --object-store",
            img.id
        )
    } else {
        let node = m
            .store()
            .nodes()
            .ok()
            .and_then(|n| n.into_iter().find(|n| n.name == holder));
        format!(
            "image {} is held by node {holder:?}, which {}: its microVMs run there (it is not \
             in object storage); retry when it is back",
            img.id,
            match node {
                Some(n) => format!(
                    "sent no heartbeat for {} s",
                    (now_ms() - n.heartbeat_at) / 1000
                ),
                None => "is not registered".to_string(),
            }
        )
    };
    ApiError::new(ErrorCode::ServiceUnavailable, message)
}

/// The template a microVM of `image` launches from here: `None` for this node's own build
/// (or an unknown image: RunMicrovm answers 404), else this node's copy of the image from
/// object storage (fetched on a miss).
pub async fn template_here(m: &Manager, image: &str) -> ApiResult<Option<PathBuf>> {
    if !crate::cluster::is_shared(m) {
        return Ok(None);
    }
    let Some(img) = m.store().image(image)? else {
        return Ok(None);
    };
    if built_on(m, &img, &m.cfg.node_name) {
        return Ok(None);
    }
    crate::share::template_here(m, &img).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(name: &str, free: i64, cached: bool) -> Candidate {
        Candidate {
            node: NodeRow {
                name: name.into(),
                advertise: String::new(),
                capacity: serde_json::json!({}),
                started_at: 0,
                heartbeat_at: 0,
            },
            capacity: 1024,
            free,
            cached,
        }
    }

    fn ranked(mut c: Vec<Candidate>, here: &str) -> Vec<String> {
        rank(&mut c, here);
        c.into_iter().map(|c| c.node.name).collect()
    }

    #[test]
    fn the_most_free_memory_wins_then_the_cache_then_this_node() {
        let order = ranked(
            vec![
                candidate("a", 512, true),
                candidate("b", 1024, false),
                candidate("c", 1024, false),
            ],
            "c",
        );
        assert_eq!(order, ["c", "b", "a"]);
        let order = ranked(
            vec![
                candidate("a", 1024, true),
                candidate("b", 1024, false),
                candidate("c", 1024, false),
            ],
            "c",
        );
        assert_eq!(order, ["a", "c", "b"]);
        let order = ranked(vec![candidate("b", 0, true), candidate("a", 0, true)], "x");
        assert_eq!(order, ["a", "b"]);
    }
}
