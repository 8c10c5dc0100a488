//! Commands that talk to a running kilnd over its REST API: run, get, list, suspend,
//! resume, terminate, token, exec, events. Human tables by default, `--json` for scripts;
//! exit codes: 2 validation, 3 not found, 4 conflict, 5 auth, 6 kilnd unreachable.

use std::time::Duration;

use clap::{Args, Subcommand};
use kiln_client::{Client, ClientError};
use serde_json::{json, Value};

#[derive(Args)]
pub struct Conn {
    /// kilnd's API (default: $KILN_ENDPOINT, else $KILN_HOME/kilnd.addr).
    #[arg(long, global = true)]
    pub(crate) endpoint: Option<String>,
    /// API key (default: $KILN_API_KEY, else $KILN_HOME/api-key).
    #[arg(long, global = true)]
    pub(crate) api_key: Option<String>,
    /// Output format of API commands: text (tables) or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub(crate) output: String,
}

impl Conn {
    pub(crate) fn json(&self) -> bool {
        self.output == "json"
    }
}

#[derive(Subcommand)]
pub enum Remote {
    /// RunMicrovm: start a microVM from an image.
    Run {
        image: String,
        #[arg(long, default_value_t = 300)]
        idle_seconds: u64,
        #[arg(long, default_value_t = 1800)]
        suspended_seconds: u64,
        #[arg(long)]
        no_auto_resume: bool,
        /// Body of the /run hook.
        #[arg(long)]
        payload: Option<String>,
        #[arg(long)]
        max_duration: Option<u64>,
        /// Egress connectors as JSON, e.g. '[{"type":"none"}]' (default: internet).
        #[arg(long, value_parser = parse_json)]
        connectors: Option<Value>,
        /// Wait until it is RUNNING (or TERMINATED).
        #[arg(long)]
        wait: bool,
    },
    /// GetMicrovm.
    Get { id: String },
    /// ListMicrovms.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        image: Option<String>,
    },
    /// SuspendMicrovm.
    Suspend { id: String },
    /// ResumeMicrovm.
    Resume { id: String },
    /// TerminateMicrovm.
    Terminate { id: String },
    /// CreateMicrovmAuthToken: `kiln token [create] <microvmId>`.
    Token {
        #[arg(num_args = 1..=2, required = true, value_name = "[create] MICROVM_ID")]
        target: Vec<String>,
        /// Allowed port (repeatable; default 8080).
        #[arg(long = "port")]
        ports: Vec<u16>,
        #[arg(long, default_value_t = 5)]
        minutes: u64,
        /// ingress or shell.
        #[arg(long, default_value = "ingress")]
        kind: String,
    },
    /// Run a command in a RUNNING microVM.
    Exec {
        id: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// An interactive terminal in a microVM (through the ingress, with a shell token).
    Shell {
        id: String,
        /// host:port of the ingress (default: $KILN_INGRESS, else $KILN_HOME/kilnd.ingress).
        #[arg(long)]
        ingress: Option<String>,
    },
    /// Lifecycle events after a cursor.
    Events {
        #[arg(long, default_value_t = 0)]
        since: i64,
    },
    /// Download a SUSPENDED microVM's whole disk as one standalone qcow2 (also for one
    /// this host can no longer resume).
    Disk {
        id: String,
        /// Where to write it (default: <id>.qcow2).
        file: Option<std::path::PathBuf>,
    },
    /// The app's stdout and stderr in a RUNNING microVM (-f: keep printing new output).
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
        /// How much of the newest output to fetch.
        #[arg(long, default_value_t = 64 << 10)]
        max_bytes: u32,
    },
}

/// What `new` adds after `old`, when both are tails of one growing log: the longest
/// suffix of `old` that starts `new` is the overlap.
fn log_increment<'a>(old: &str, new: &'a str) -> &'a str {
    if old.is_empty() {
        return new;
    }
    if let Some(rest) = new.strip_prefix(old) {
        return rest;
    }
    for (i, _) in old.char_indices().skip(1) {
        if let Some(rest) = new.strip_prefix(&old[i..]) {
            return rest;
        }
    }
    new
}

/// Parses a JSON flag value (clap reports the error with the flag's name).
pub fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

fn print_table(rows: &[&Value]) {
    println!(
        "{:<22} {:<11} {:<20} {:<34} REASON",
        "MICROVM", "STATE", "IMAGE", "ENDPOINT"
    );
    for r in rows {
        println!(
            "{:<22} {:<11} {:<20} {:<34} {}",
            r["microvmId"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            r["imageName"].as_str().unwrap_or(""),
            r["endpoint"].as_str().unwrap_or(""),
            r["stateReason"].as_str().unwrap_or("")
        );
    }
}

pub fn run(conn: Conn, cmd: Remote) -> i32 {
    match execute(&conn, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e}");
            e.exit_code()
        }
    }
}

fn execute(conn: &Conn, cmd: Remote) -> Result<i32, ClientError> {
    let c = Client::from_env(conn.endpoint.clone(), conn.api_key.clone())?;
    let show = |v: &Value| {
        if conn.json() {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print_table(&[v]);
        }
    };
    match cmd {
        Remote::Run {
            image,
            idle_seconds,
            suspended_seconds,
            no_auto_resume,
            payload,
            max_duration,
            connectors,
            wait,
        } => {
            let idle = json!({"maxIdleDurationSeconds": idle_seconds, "suspendedDurationSeconds": suspended_seconds, "autoResumeEnabled": !no_auto_resume});
            let run = c.run_microvm(&image, Some(idle), payload, max_duration, connectors)?;
            let id = run["microvmId"].as_str().unwrap_or_default().to_string();
            let mut view = run;
            if wait {
                view = c.wait_microvm(&id, "RUNNING", Duration::from_secs(180))?;
            }
            if conn.json() {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view).unwrap_or_default()
                );
            } else {
                println!("{id}");
            }
            Ok(if view["state"] == "TERMINATED" { 1 } else { 0 })
        }
        Remote::Get { id } => {
            show(&c.get(&format!("/v1/microvms/{id}"))?);
            Ok(0)
        }
        Remote::List { state, image } => {
            let mut q = Vec::new();
            if let Some(s) = state {
                q.push(format!("state={s}"));
            }
            if let Some(i) = image {
                q.push(format!("imageIdentifier={i}"));
            }
            let path = if q.is_empty() {
                "/v1/microvms".to_string()
            } else {
                format!("/v1/microvms?{}", q.join("&"))
            };
            let list = c.get(&path)?;
            if conn.json() {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
            } else {
                let rows: Vec<&Value> = list["microvms"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default();
                print_table(&rows);
            }
            Ok(0)
        }
        Remote::Suspend { id } => {
            show(&c.post(&format!("/v1/microvms/{id}/suspend"), json!({}))?);
            Ok(0)
        }
        Remote::Resume { id } => {
            show(&c.post(&format!("/v1/microvms/{id}/resume"), json!({}))?);
            Ok(0)
        }
        Remote::Terminate { id } => {
            show(&c.post(&format!("/v1/microvms/{id}/terminate"), json!({}))?);
            Ok(0)
        }
        Remote::Token {
            target,
            ports,
            minutes,
            kind,
        } => {
            let id = match target.as_slice() {
                [id] => id.clone(),
                [verb, id] if verb == "create" => id.clone(),
                _ => {
                    return Err(crate::image_api::usage(format!(
                        "kiln token {}: use `kiln token [create] <microvmId>`",
                        target.join(" ")
                    )))
                }
            };
            let ports: Vec<Value> = if ports.is_empty() {
                vec![json!({"port": 8080})]
            } else {
                ports.iter().map(|p| json!({"port": p})).collect()
            };
            let t = c.post("/v1/auth-tokens", json!({"microvmIdentifier": id, "expirationInMinutes": minutes, "allowedPorts": ports, "kind": kind}))?;
            if conn.json() {
                println!("{}", serde_json::to_string_pretty(&t).unwrap_or_default());
            } else {
                println!(
                    "{}",
                    t["authToken"]["X-Kiln-Auth"].as_str().unwrap_or_default()
                );
            }
            Ok(0)
        }
        Remote::Exec {
            id,
            timeout,
            command,
        } => {
            let out = c.post(
                &format!("/v1/microvms/{id}/exec"),
                json!({"command": command, "timeoutSeconds": timeout}),
            )?;
            if conn.json() {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                print!("{}", out["stdout"].as_str().unwrap_or_default());
                eprint!("{}", out["stderr"].as_str().unwrap_or_default());
            }
            Ok(out["exitCode"]
                .as_i64()
                .map(|c| c as i32)
                .unwrap_or(128 + out["signal"].as_i64().unwrap_or(0) as i32))
        }
        Remote::Shell { id, ingress } => {
            let home = std::env::var_os("KILN_HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| "/var/lib/kiln".into());
            let ingress = ingress
                .or_else(|| std::env::var("KILN_INGRESS").ok())
                .or_else(|| {
                    std::fs::read_to_string(home.join("kilnd.ingress"))
                        .ok()
                        .map(|s| s.trim().to_string())
                })
                .unwrap_or_else(|| "127.0.0.1:8443".into());
            crate::shell::run(&c, &id, &ingress)
        }
        Remote::Disk { id, file } => {
            let output = file.unwrap_or_else(|| format!("{id}.qcow2").into());
            let mut body = c.get_stream(&format!("/v1/microvms/{id}/disk"))?;
            let part = output.with_extension("qcow2.part");
            let written = std::fs::File::create(&part)
                .and_then(|mut f| std::io::copy(&mut body, &mut f))
                .and_then(|n| std::fs::rename(&part, &output).map(|()| n));
            match written {
                Ok(n) => {
                    eprintln!("wrote {n} bytes to {}", output.display());
                    Ok(0)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&part);
                    Err(ClientError::Unreachable {
                        endpoint: c.endpoint().to_string(),
                        detail: format!("downloading the disk to {}: {e}", output.display()),
                    })
                }
            }
        }
        Remote::Logs {
            id,
            follow,
            max_bytes,
        } => {
            let path = format!("/v1/microvms/{id}/logs?maxBytes={max_bytes}");
            let mut shown = String::new();
            loop {
                let logs = c.get(&path)?;
                let text = logs["logs"].as_str().unwrap_or_default().to_string();
                print!("{}", log_increment(&shown, &text));
                let _ = std::io::Write::flush(&mut std::io::stdout());
                if !follow {
                    return Ok(0);
                }
                shown = text;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Remote::Events { since } => {
            let ev = c.get(&format!("/v1/events?since={since}"))?;
            if conn.json() {
                println!("{}", serde_json::to_string_pretty(&ev).unwrap_or_default());
            } else {
                for e in ev["events"].as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {} {:<22} {:>10} -> {:<10} {}",
                        e["seq"],
                        e["at_ms"],
                        e["microvm_id"]
                            .as_str()
                            .or(e["image_id"].as_str())
                            .unwrap_or(""),
                        e["from_state"].as_str().unwrap_or("-"),
                        e["to_state"].as_str().unwrap_or("-"),
                        e["reason"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_increment;

    #[test]
    fn following_prints_only_what_is_new() {
        assert_eq!(log_increment("", "a\nb\n"), "a\nb\n");
        assert_eq!(log_increment("a\nb\n", "a\nb\nc\n"), "c\n");
        // The kept tail moved on: the overlap is found, not repeated.
        assert_eq!(log_increment("a\nb\nc\n", "b\nc\nd\n"), "d\n");
        assert_eq!(log_increment("same", "same"), "");
        // Nothing in common (the buffer wrapped entirely): everything is new.
        assert_eq!(log_increment("old", "xyz"), "xyz");
    }
}
