//! Commands that talk to a running kilnd over its REST API: run, get, list, suspend,
//! resume, terminate, token, exec, events. Human tables by default, `--json` for scripts;
//! exit codes: 2 validation, 3 not found, 4 conflict, 5 auth, 6 kilnd unreachable.

use std::time::Duration;

use clap::{Args, Subcommand};
use kiln_client::api::{
    AllowedPort, Connector, CreateTokenRequest, ExecRequest, IdlePolicy, ListMicrovmsQuery,
    Microvm, MicrovmState, RunMicrovmRequest, TokenKind,
};
use kiln_client::{Client, ClientError};
use serde::Serialize;

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
        #[arg(long, value_parser = parse_connectors)]
        connectors: Option<Connectors>,
        /// Wait until it is RUNNING (or TERMINATED).
        #[arg(long)]
        wait: bool,
        /// A label, `key=value` (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// GetMicrovm.
    Get { id: String },
    /// ListMicrovms (every page); `kiln ls MICROVM_ID:/path` lists that directory instead.
    #[command(visible_alias = "ls")]
    List {
        /// A directory in a microVM, `MICROVM_ID:/path`.
        target: Option<String>,
        /// The guest user to list as (with a target).
        #[arg(long)]
        user: Option<String>,
        #[arg(long, value_parser = parse_state)]
        state: Option<MicrovmState>,
        #[arg(long)]
        image: Option<String>,
        /// Only those with this label: `key=value`, or `key` for any value (repeatable: all).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// GetMicrovmMetrics: the newest sample (CPU, memory, disk, network); --output json
    /// prints the whole history kilnd keeps.
    Metrics { id: String },
    /// UpdateMicrovm: `kiln label <microvmId> key=value… key-…` sets and removes labels.
    Label {
        id: String,
        #[arg(required = true, value_parser = parse_label_change)]
        changes: Vec<(String, Option<String>)>,
    },
    /// SuspendMicrovm.
    Suspend { id: String },
    /// ResumeMicrovm.
    Resume { id: String },
    /// TerminateMicrovm.
    Terminate { id: String },
    /// ForkMicrovm: copy a RUNNING microVM (memory, processes, disk) into new microVMs;
    /// prints their ids.
    Fork {
        id: String,
        /// How many clones (1 to 100).
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Wait until every clone is RUNNING (or TERMINATED).
        #[arg(long)]
        wait: bool,
    },
    /// SaveMicrovmImage ("save as image"): a RUNNING microVM's memory, processes and disk
    /// become a new image (the microVM runs on); prints the image's build id.
    Save {
        id: String,
        /// The new image's name.
        #[arg(long)]
        name: String,
        /// Wait until the image is SUCCESSFUL (or FAILED).
        #[arg(long)]
        wait: bool,
    },
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
        #[arg(long, default_value = "ingress", value_parser = parse_kind)]
        kind: TokenKind,
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

/// `--connectors`: a JSON array of connectors (one flag value, so clap must not see a Vec).
#[derive(Clone, Debug)]
pub struct Connectors(pub Vec<Connector>);

/// Parses `--connectors`, checked here, not by kilnd.
pub fn parse_connectors(text: &str) -> Result<Connectors, String> {
    serde_json::from_str(text)
        .map(Connectors)
        .map_err(|e| format!("not a JSON array of connectors: {e}"))
}

fn parse_state(text: &str) -> Result<MicrovmState, String> {
    text.parse()
        .map_err(|e: kiln_client::api::ParseStateError| e.to_string())
}

fn parse_kind(text: &str) -> Result<TokenKind, String> {
    match text {
        "ingress" => Ok(TokenKind::Ingress),
        "shell" => Ok(TokenKind::Shell),
        _ => Err("use ingress or shell".into()),
    }
}

/// Prints `v` as pretty JSON (what `--output json` shows).
pub(crate) fn print_json(v: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_table(rows: &[&Microvm]) {
    println!(
        "{:<22} {:<11} {:<20} {:<40} {:<24} REASON",
        "MICROVM", "STATE", "IMAGE", "ENDPOINT", "LABELS"
    );
    for r in rows {
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<22} {:<11} {:<20} {:<40} {:<24} {}",
            r.microvm_id,
            r.state.as_str(),
            r.image_name,
            r.endpoint,
            labels.join(","),
            r.state_reason.as_deref().unwrap_or("")
        );
    }
}

pub fn run(conn: Conn, cmd: Remote) -> i32 {
    if let Remote::List {
        target: Some(target),
        user,
        ..
    } = cmd
    {
        return crate::files_cli::ls(conn, &target, user);
    }
    match execute(&conn, cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {e}");
            e.exit_code()
        }
    }
}

/// `key=value` (a label to set).
pub(crate) fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: write a label as key=value"))?;
    kiln_types::labels::check_key(k).map_err(|e| e.to_string())?;
    kiln_types::labels::check_value(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v.to_string()))
}

/// `key=value` (set) or `key-` (remove).
pub(crate) fn parse_label_change(s: &str) -> Result<(String, Option<String>), String> {
    match s.strip_suffix('-').filter(|_| !s.contains('=')) {
        Some(k) => {
            kiln_types::labels::check_key(k).map_err(|e| e.to_string())?;
            Ok((k.to_string(), None))
        }
        None => parse_label(s).map(|(k, v)| (k, Some(v))),
    }
}

fn execute(conn: &Conn, cmd: Remote) -> Result<i32, ClientError> {
    let c = Client::from_env(conn.endpoint.clone(), conn.api_key.clone())?;
    let show = |v: &Microvm| {
        if conn.json() {
            print_json(v);
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
            labels,
        } => {
            let req = RunMicrovmRequest {
                image_identifier: image,
                idle_policy: Some(IdlePolicy {
                    max_idle_duration_seconds: idle_seconds,
                    suspended_duration_seconds: suspended_seconds,
                    auto_resume_enabled: !no_auto_resume,
                }),
                run_hook_payload: payload,
                max_duration_seconds: max_duration,
                connectors: connectors.map(|c| c.0),
                labels: (!labels.is_empty()).then(|| labels.into_iter().collect()),
                ..Default::default()
            };
            let run = c.run_microvm(&req)?;
            if !wait {
                if conn.json() {
                    print_json(&run);
                } else {
                    println!("{}", run.microvm_id);
                }
                return Ok(0);
            }
            let view = c.wait_microvm(
                &run.microvm_id,
                MicrovmState::Running,
                Duration::from_secs(180),
            )?;
            if conn.json() {
                print_json(&view);
            } else {
                println!("{}", view.microvm_id);
            }
            Ok(if view.state == MicrovmState::Terminated {
                1
            } else {
                0
            })
        }
        Remote::Get { id } => {
            show(&c.get_microvm(&id)?);
            Ok(0)
        }
        Remote::List {
            state,
            image,
            labels,
            ..
        } => {
            let microvms = c.list_all_microvms(&ListMicrovmsQuery {
                state,
                image_identifier: image,
                label: labels,
                ..Default::default()
            })?;
            if conn.json() {
                print_json(&kiln_client::api::MicrovmList {
                    microvms,
                    next_cursor: None,
                });
            } else {
                print_table(&microvms.iter().collect::<Vec<_>>());
            }
            Ok(0)
        }
        Remote::Metrics { id } => {
            let h = c.microvm_metrics(&id)?;
            if conn.json() {
                print_json(&h);
                return Ok(0);
            }
            let Some(s) = h.samples.last() else {
                println!("{id}: no samples (it is not RUNNING, or has just started)");
                return Ok(1);
            };
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |b| format!("{:.1} MiB", mib(b)));
            println!(
                "cpu               {:.1} % ({:.1} CPU-seconds)",
                s.cpu_percent, s.cpu_seconds
            );
            println!("host memory (PSS) {:.1} MiB", mib(s.host_memory_bytes));
            println!(
                "guest memory      {} total, {} available",
                opt(s.guest_memory_total_bytes),
                opt(s.guest_memory_available_bytes)
            );
            println!(
                "host disk         {:.1} MiB (overlay)",
                mib(s.host_disk_bytes)
            );
            println!(
                "guest disk        {} total, {} used",
                opt(s.guest_disk_total_bytes),
                opt(s.guest_disk_used_bytes)
            );
            println!(
                "network           {} bytes in, {} bytes out",
                s.network_bytes_in, s.network_bytes_out
            );
            Ok(0)
        }
        Remote::Label { id, changes } => {
            let req = kiln_client::api::UpdateLabelsRequest {
                labels: changes.into_iter().collect(),
            };
            show(&c.update_microvm_labels(&id, &req)?);
            Ok(0)
        }
        Remote::Suspend { id } => {
            show(&c.suspend_microvm(&id)?);
            Ok(0)
        }
        Remote::Resume { id } => {
            show(&c.resume_microvm(&id)?);
            Ok(0)
        }
        Remote::Terminate { id } => {
            show(&c.terminate_microvm(&id)?);
            Ok(0)
        }
        Remote::Fork { id, count, wait } => fork(&c, conn, &id, count, wait),
        Remote::Save { id, name, wait } => save(&c, conn, &id, &name, wait),
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
            let t = c.create_token(&CreateTokenRequest {
                microvm_identifier: id,
                expiration_in_minutes: minutes,
                allowed_ports: ports.into_iter().map(|port| AllowedPort { port }).collect(),
                kind: Some(kind),
            })?;
            if conn.json() {
                print_json(&t);
            } else {
                println!("{}", t.auth_token.kiln_auth);
            }
            Ok(0)
        }
        Remote::Exec {
            id,
            timeout,
            command,
        } => {
            let out = c.exec(
                &id,
                &ExecRequest {
                    command,
                    timeout_seconds: Some(timeout),
                },
            )?;
            if conn.json() {
                print_json(&out);
            } else {
                print!("{}", out.stdout);
                eprint!("{}", out.stderr);
            }
            Ok(out.exit_code.unwrap_or(128 + out.signal.unwrap_or(0)))
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
        Remote::Disk { id, file } => download_disk(&c, &id, file),
        Remote::Logs {
            id,
            follow,
            max_bytes,
        } => {
            let mut shown = String::new();
            loop {
                let text = c.microvm_logs(&id, Some(max_bytes))?.logs;
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
            let ev = c.events(since, None)?;
            if conn.json() {
                print_json(&ev);
            } else {
                for e in &ev.events {
                    println!(
                        "{:>6} {} {:<22} {:>10} -> {:<10} {}",
                        e.seq,
                        e.at_ms,
                        e.microvm_id
                            .as_deref()
                            .or(e.image_id.as_deref())
                            .unwrap_or(""),
                        e.from_state.as_deref().unwrap_or("-"),
                        e.to_state.as_deref().unwrap_or("-"),
                        e.reason.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(0)
        }
    }
}

/// `kiln disk`: the stream goes to a `.part` file, renamed once whole.
fn download_disk(
    c: &Client,
    id: &str,
    file: Option<std::path::PathBuf>,
) -> Result<i32, ClientError> {
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

/// `kiln fork`: the clones' ids (or, with --wait, their views once RUNNING); exit 1 if any
/// clone ended instead.
fn fork(c: &Client, conn: &Conn, id: &str, count: u64, wait: bool) -> Result<i32, ClientError> {
    let forked = c.fork_microvm(id, count)?;
    if !wait {
        if conn.json() {
            print_json(&forked);
        } else {
            forked
                .microvms
                .iter()
                .for_each(|m| println!("{}", m.microvm_id));
        }
        return Ok(0);
    }
    let mut views = Vec::with_capacity(forked.microvms.len());
    for m in &forked.microvms {
        views.push(c.wait_microvm(
            &m.microvm_id,
            MicrovmState::Running,
            Duration::from_secs(180),
        )?);
    }
    if conn.json() {
        print_json(&views);
    } else {
        print_table(&views.iter().collect::<Vec<_>>());
    }
    let ended = views.iter().any(|v| v.state == MicrovmState::Terminated);
    Ok(i32::from(ended))
}

fn save(c: &Client, conn: &Conn, id: &str, name: &str, wait: bool) -> Result<i32, ClientError> {
    let saved = c.save_microvm_image(id, name)?;
    if !wait {
        if conn.json() {
            print_json(&saved);
        } else {
            println!("{}", saved.image_identifier);
        }
        return Ok(0);
    }
    let image = c.wait_image(&saved.image_identifier, Duration::from_secs(3600))?;
    if conn.json() {
        print_json(&image);
    } else {
        let why = image
            .status_reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        println!(
            "{} {} {}{why}",
            image.name,
            image.image_identifier,
            image.status.as_str()
        );
    }
    Ok(i32::from(
        image.status != kiln_client::api::ImageStatus::Successful,
    ))
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
