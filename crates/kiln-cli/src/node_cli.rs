//! `kiln node`: the kilnd nodes sharing one database (ListNodes).

use clap::Subcommand;
use kiln_client::{Client, ClientError};

use crate::remote::{print_json, Conn};

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List the nodes: capacity, heartbeat, reachability and microVMs.
    #[command(visible_alias = "ls")]
    List,
    /// Drain a node: it suspends its microVMs and hands them to other nodes (they resume
    /// there on their next request); RunMicrovm through it places new ones elsewhere.
    Drain { name: String },
    /// Let a drained node take microVMs again.
    Undrain { name: String },
    /// Forget a node that is gone for good (its lease ran out) and holds no microVM. A
    /// node drained and then stopped cleanly leaves by itself.
    #[command(visible_alias = "rm")]
    Remove { name: String },
}

pub fn run(conn: Conn, cmd: NodeCommand) -> i32 {
    match execute(&conn, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e}");
            e.exit_code()
        }
    }
}

fn execute(conn: &Conn, cmd: NodeCommand) -> Result<i32, ClientError> {
    let c = Client::from_env(conn.endpoint.clone(), conn.api_key.clone())?;
    match cmd {
        NodeCommand::Drain { ref name } | NodeCommand::Undrain { ref name } => {
            let draining = matches!(cmd, NodeCommand::Drain { .. });
            let name = name.clone();
            let node = if draining {
                c.drain_node(&name)?
            } else {
                c.undrain_node(&name)?
            };
            if conn.json() {
                print_json(&node);
            } else if draining {
                println!(
                    "node {} is draining: its {} microVMs are suspended and handed to other nodes",
                    node.name, node.microvms
                );
            } else {
                println!("node {} takes microVMs again", node.name);
            }
        }
        NodeCommand::Remove { name } => {
            c.remove_node(&name)?;
            if !conn.json() {
                println!("node {name} removed");
            }
        }
        NodeCommand::List => {
            let list = c.list_nodes()?;
            if conn.json() {
                print_json(&list);
                return Ok(0);
            }
            println!(
                "{:<20} {:<22} {:>9} {:>5} {:>10} {:>8} {:<11} HEARTBEAT",
                "NODE", "ADVERTISE", "MEM MiB", "vCPU", "DISK MiB", "MICROVMS", "STATE"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            for n in list.nodes {
                let name = if n.name == list.this_node {
                    format!("{} (this)", n.name)
                } else {
                    n.name
                };
                println!(
                    "{:<20} {:<22} {:>9} {:>5} {:>10} {:>8} {:<11} {:.1} s ago",
                    name,
                    n.advertise,
                    n.capacity.memory_mib,
                    n.capacity.vcpus,
                    n.capacity.disk_mib,
                    n.microvms,
                    match (n.reachable, n.draining) {
                        (false, _) => "UNREACHABLE",
                        (true, true) => "draining",
                        (true, false) => "reachable",
                    },
                    (now - n.heartbeat_at_ms).max(0) as f64 / 1000.0
                );
            }
        }
    }
    Ok(0)
}
