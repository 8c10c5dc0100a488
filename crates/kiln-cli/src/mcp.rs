//! `kiln mcp`: a Model Context Protocol server on stdin/stdout (rmcp), so an AI agent can use
//! kiln sandboxes directly: create one from an image, run code in it through the ingress (a
//! POST to its executor, with a fresh token), read and write files, run commands, destroy it.
//! Every tool calls kilnd's API with the CLI's configuration (`--endpoint`, `KILN_HOME`, …).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use kiln_client::api::{
    ExecRequest, ExecResponse, IdlePolicy, ListMicrovmsQuery, MicrovmState, RunMicrovmRequest,
};
use kiln_client::{Client, SandboxRequest};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::schemars::{self, JsonSchema};
use rmcp::{tool, tool_handler, tool_router, ServerHandler, ServiceExt};
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest file `write_file` sends (a tool argument, so it sits in one JSON-RPC message).
const MAX_WRITE_BYTES: usize = 4 << 20;
/// Largest file `read_file` returns (its answer goes into a model's context).
const MAX_READ_BYTES: u64 = 1 << 20;

#[derive(Clone)]
pub struct KilnMcp {
    client: Arc<Client>,
    tool_router: ToolRouter<Self>,
}

#[derive(Deserialize, JsonSchema)]
pub struct CreateSandbox {
    /// Image name or id (see `kiln image list`).
    image: String,
    /// Suspend after this many idle seconds (default 300); a request resumes it.
    idle_seconds: Option<u64>,
    /// Body of the image's /run hook.
    run_hook_payload: Option<String>,
    /// Egress connectors, e.g. [{"type": "none"}] or [{"type": "allowlist", "destinations":
    /// [{"name": "api.example.com", "ports": [443]}]}]; default: public internet only.
    connectors: Option<Value>,
    /// Labels, e.g. {"task": "t-42"}, to find the sandbox again with list_sandboxes.
    labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize, JsonSchema)]
pub struct ListSandboxes {
    /// Only sandboxes with these labels, each `key=value` or `key` (all must match).
    #[serde(default)]
    labels: Vec<String>,
}

#[derive(Deserialize, JsonSchema)]
pub struct RunCode {
    microvm_id: String,
    /// The code; sent as {"code": ..., "timeout": ...}.
    code: String,
    /// Path of the executor in the sandbox (default /execute).
    path: Option<String>,
    /// App port (default 8080).
    port: Option<u16>,
    /// Seconds the code may run (default 60).
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
pub struct Sandbox {
    microvm_id: String,
}

#[derive(Deserialize, JsonSchema)]
pub struct ForkSandbox {
    microvm_id: String,
    /// How many copies (1 to 100; default 1).
    count: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
pub struct SaveSandbox {
    microvm_id: String,
    /// The new image's name (a-z, 0-9 and '-', up to 40).
    name: String,
}

#[derive(Deserialize, JsonSchema)]
pub struct ReadFile {
    microvm_id: String,
    /// Absolute path in the sandbox.
    path: String,
}

#[derive(Deserialize, JsonSchema)]
pub struct WriteFile {
    microvm_id: String,
    /// Absolute path in the sandbox (parent directories are made).
    path: String,
    /// Text content (at most 4 MiB).
    content: String,
}

#[derive(Deserialize, JsonSchema)]
pub struct ListFiles {
    microvm_id: String,
    /// Absolute path of a directory in the sandbox.
    path: String,
}

#[derive(Deserialize, JsonSchema)]
pub struct RunCommand {
    microvm_id: String,
    /// Program and arguments, e.g. ["sh", "-c", "ls /"].
    command: Vec<String>,
    /// Seconds before it is killed (default 60).
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
pub struct StartProcess {
    microvm_id: String,
    /// Program and arguments, e.g. ["python3", "server.py"]; or give `shell`.
    command: Option<Vec<String>>,
    /// A line for /bin/sh -c, e.g. "npm install && npm run dev".
    shell: Option<String>,
    /// Working directory (absolute; default /).
    cwd: Option<String>,
    /// Added environment variables.
    env: Option<std::collections::BTreeMap<String, String>>,
    /// Keep stdin open for send_stdin.
    #[serde(default)]
    stdin: bool,
    /// A label to find it by in list_processes.
    tag: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
pub struct ProcessOutput {
    microvm_id: String,
    pid: u32,
    /// Output offset to read from: 0 at first, then the `nextOffset` of the previous call.
    #[serde(default)]
    from: u64,
    /// Seconds to wait for the process to exit before answering with what it printed so
    /// far (default 5, at most 60).
    wait_seconds: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
pub struct SendStdin {
    microvm_id: String,
    pid: u32,
    /// Text for its stdin (add "\n" to end a line).
    text: String,
    /// Close stdin afterwards.
    #[serde(default)]
    eof: bool,
}

#[derive(Deserialize, JsonSchema)]
pub struct SignalProcess {
    microvm_id: String,
    pid: u32,
    /// TERM (default), INT, KILL, HUP, … or a number.
    signal: Option<String>,
}

/// Most output bytes one process_output call returns (its answer goes into a model's
/// context).
const MAX_OUTPUT_BYTES: u64 = 64 << 10;

/// `pid`'s output from `from`: what it printed by the time it exited or `wait` passed, at
/// most [`MAX_OUTPUT_BYTES`], with where to read on.
fn read_output(c: &Client, id: &str, pid: u32, from: u64, wait: u64) -> Result<Value, String> {
    let p = c
        .get_process(id, pid, Duration::from_secs(wait))
        .map_err(|e| e.to_string())?;
    let end = p
        .output_end
        .min(from.max(p.output_start) + MAX_OUTPUT_BYTES);
    let mut text = Vec::new();
    let mut next = from.max(p.output_start);
    if end > next {
        // Everything up to `end` is already kept by the guest: reading it never blocks.
        let mut stream = c.process_output(id, pid, from).map_err(|e| e.to_string())?;
        while stream.position() < end {
            match stream.next() {
                Some(Ok(kiln_client::OutputItem::Output { data, offset, .. })) => {
                    let take = (end - offset).min(data.len() as u64) as usize;
                    text.extend_from_slice(&data[..take]);
                    next = offset + take as u64;
                    if next >= end {
                        break;
                    }
                }
                Some(Ok(kiln_client::OutputItem::Exit(_))) | None => break,
                Some(Err(e)) => return Err(e.to_string()),
            }
        }
    }
    Ok(json!({
        "output": String::from_utf8_lossy(&text),
        "nextOffset": next,
        "skippedBytes": p.output_start.saturating_sub(from),
        "moreOutput": next < p.output_end,
        "running": p.running,
        "exitCode": p.exit_code,
        "signal": p.signal,
    }))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

impl KilnMcp {
    /// Runs a blocking client call off the async runtime; errors become tool errors.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || f(&client))
            .await
            .map_err(|e| format!("kiln: {e}"))?
    }

    async fn exec(
        &self,
        id: String,
        command: Vec<String>,
        timeout: u64,
    ) -> Result<ExecResponse, String> {
        self.call(move |c| {
            let req = ExecRequest {
                command,
                timeout_seconds: Some(timeout),
            };
            c.exec(&id, &req).map_err(|e| e.to_string())
        })
        .await
    }
}

#[tool_router(router = tool_router)]
impl KilnMcp {
    pub fn new(client: Client) -> KilnMcp {
        KilnMcp {
            client: Arc::new(client),
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Create an isolated microVM sandbox from an image and wait until it runs. Returns microvmId and endpoint."
    )]
    async fn create_sandbox(
        &self,
        Parameters(p): Parameters<CreateSandbox>,
    ) -> Result<String, String> {
        self.call(move |c| {
            let connectors = p
                .connectors
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| format!("connectors: {e}"))?;
            let req = RunMicrovmRequest {
                image_identifier: p.image,
                idle_policy: Some(IdlePolicy {
                    max_idle_duration_seconds: p.idle_seconds.unwrap_or(300),
                    ..IdlePolicy::default()
                }),
                run_hook_payload: p.run_hook_payload,
                connectors,
                labels: p.labels,
                ..Default::default()
            };
            let run = c.run_microvm(&req).map_err(|e| e.to_string())?;
            let id = run.microvm_id;
            let vm = c
                .wait_microvm(&id, MicrovmState::Running, Duration::from_secs(180))
                .map_err(|e| e.to_string())?;
            match vm.state {
                MicrovmState::Running => Ok(pretty(
                    &json!({"microvmId": id, "endpoint": vm.endpoint, "state": vm.state}),
                )),
                MicrovmState::Terminated => Err(format!(
                    "sandbox {id} terminated: {}",
                    vm.state_reason.as_deref().unwrap_or("?")
                )),
                other => Err(format!("sandbox {id} is still {other}")),
            }
        })
        .await
    }

    #[tool(
        description = "Run code in a sandbox: POST {\"code\", \"timeout\"} to its executor (default /execute on port 8080) through kiln's ingress with a short-lived token. State persists between calls. Returns the HTTP status and the executor's answer."
    )]
    async fn run_code(&self, Parameters(p): Parameters<RunCode>) -> Result<String, String> {
        self.call(move |c| {
            let timeout = p.timeout_seconds.unwrap_or(60);
            let path = p.path.unwrap_or_else(|| "/execute".into());
            let req = SandboxRequest {
                method: "POST",
                path: &path,
                port: p.port.unwrap_or(8080),
                body: Some(json!({"code": p.code, "timeout": timeout})),
                timeout: Duration::from_secs(timeout + 60),
            };
            let answer = c
                .sandbox_request(&p.microvm_id, &req)
                .map_err(|e| e.to_string())?;
            let body = serde_json::from_str(&answer.body).unwrap_or(Value::String(answer.body));
            let out = pretty(&json!({"status": answer.status, "response": body}));
            if (200..300).contains(&answer.status) {
                Ok(out)
            } else {
                Err(out)
            }
        })
        .await
    }

    #[tool(
        description = "Run a command in a sandbox (no shell unless you ask for one). Returns stdout, stderr and the exit code."
    )]
    async fn run_command(&self, Parameters(p): Parameters<RunCommand>) -> Result<String, String> {
        let out = self
            .exec(p.microvm_id, p.command, p.timeout_seconds.unwrap_or(60))
            .await?;
        Ok(serde_json::to_string_pretty(&out).unwrap_or_default())
    }

    #[tool(
        description = "Start a process in a sandbox that keeps running on its own (a server, a build, a long job), also across idle suspend and resume. Returns its pid at once; read what it prints with process_output."
    )]
    async fn start_process(
        &self,
        Parameters(p): Parameters<StartProcess>,
    ) -> Result<String, String> {
        self.call(move |c| {
            let req = kiln_client::api::StartProcessRequest {
                command: p.command,
                shell: p.shell,
                env: p.env.unwrap_or_default(),
                cwd: p.cwd,
                stdin: p.stdin,
                tag: p.tag,
                ..Default::default()
            };
            let proc = c
                .start_process(&p.microvm_id, &req)
                .map_err(|e| e.to_string())?;
            Ok(serde_json::to_string_pretty(&proc).unwrap_or_default())
        })
        .await
    }

    #[tool(
        description = "What a process printed (stdout and stderr as they came) from offset `from` on, after waiting up to wait_seconds for it to exit; with `running`, `exitCode` and the `nextOffset` to read on from. At most 64 KiB per call."
    )]
    async fn process_output(
        &self,
        Parameters(p): Parameters<ProcessOutput>,
    ) -> Result<String, String> {
        let wait = p.wait_seconds.unwrap_or(5).min(60);
        self.call(move |c| read_output(c, &p.microvm_id, p.pid, p.from, wait).map(|v| pretty(&v)))
            .await
    }

    #[tool(description = "Write text to a process's stdin (started with stdin: true).")]
    async fn send_stdin(&self, Parameters(p): Parameters<SendStdin>) -> Result<String, String> {
        self.call(move |c| {
            c.write_process_stdin(&p.microvm_id, p.pid, p.text.as_bytes(), p.eof)
                .map_err(|e| e.to_string())?;
            Ok(format!("sent {} bytes to process {}", p.text.len(), p.pid))
        })
        .await
    }

    #[tool(description = "Send a signal to a process and its children (default TERM).")]
    async fn signal_process(
        &self,
        Parameters(p): Parameters<SignalProcess>,
    ) -> Result<String, String> {
        self.call(move |c| {
            let signal = p.signal.unwrap_or_else(|| "TERM".into());
            c.signal_process(&p.microvm_id, p.pid, &signal)
                .map_err(|e| e.to_string())?;
            Ok(format!("sent {signal} to process {}", p.pid))
        })
        .await
    }

    #[tool(
        description = "The processes started in a sandbox: pid, command, running or exit code, tag."
    )]
    async fn list_processes(&self, Parameters(p): Parameters<Sandbox>) -> Result<String, String> {
        self.call(move |c| {
            let all = c
                .list_all_processes(&p.microvm_id, &Default::default())
                .map_err(|e| e.to_string())?;
            let rows: Vec<Value> = all
                .iter()
                .map(|p| json!({"pid": p.pid, "command": p.command, "running": p.running, "exitCode": p.exit_code, "signal": p.signal, "tag": p.tag}))
                .collect();
            Ok(pretty(&Value::Array(rows)))
        })
        .await
    }

    #[tool(description = "Read a text file from a sandbox (at most 1 MiB).")]
    async fn read_file(&self, Parameters(p): Parameters<ReadFile>) -> Result<String, String> {
        self.call(move |c| {
            let entry = c
                .stat_file(&p.microvm_id, &p.path, None)
                .map_err(|e| e.to_string())?;
            if entry.size > MAX_READ_BYTES {
                return Err(format!(
                    "{} is {} bytes, more than read_file returns ({MAX_READ_BYTES}): read parts with run_command (head, tail, sed -n)",
                    p.path, entry.size
                ));
            }
            let mut bytes = Vec::new();
            c.read_file(&p.microvm_id, &p.path, None)
                .map_err(|e| e.to_string())?
                .take(MAX_READ_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("reading {}: {e}", p.path))?;
            String::from_utf8(bytes).map_err(|_| {
                format!("{} is not UTF-8 text: use run_command (e.g. base64) for binary files", p.path)
            })
        })
        .await
    }

    #[tool(
        description = "Write a text file in a sandbox (replaces it atomically; makes parent directories)."
    )]
    async fn write_file(&self, Parameters(p): Parameters<WriteFile>) -> Result<String, String> {
        if p.content.len() > MAX_WRITE_BYTES {
            return Err(format!(
                "{} bytes is more than write_file sends ({MAX_WRITE_BYTES}): write it in parts and join them with run_command",
                p.content.len()
            ));
        }
        self.call(move |c| {
            let opts = kiln_client::WriteOptions {
                create_parents: true,
                ..Default::default()
            };
            let len = p.content.len() as u64;
            c.write_file(&p.microvm_id, &p.path, &opts, p.content.as_bytes(), len)
                .map_err(|e| e.to_string())?;
            Ok(format!("wrote {len} bytes to {}", p.path))
        })
        .await
    }

    #[tool(description = "List a directory in a sandbox: each entry's kind, size, mode and owner.")]
    async fn list_files(&self, Parameters(p): Parameters<ListFiles>) -> Result<String, String> {
        self.call(move |c| {
            let list = c
                .list_files(&p.microvm_id, &p.path, None, None)
                .map_err(|e| e.to_string())?;
            Ok(serde_json::to_string_pretty(&list).unwrap_or_default())
        })
        .await
    }

    #[tool(
        description = "A sandbox's newest metrics: CPU percent, host memory (PSS) and disk, the guest's own memory and disk, network bytes."
    )]
    async fn sandbox_metrics(&self, Parameters(p): Parameters<Sandbox>) -> Result<String, String> {
        self.call(move |c| {
            let h = c
                .microvm_metrics(&p.microvm_id)
                .map_err(|e| e.to_string())?;
            match h.samples.last() {
                Some(s) => Ok(serde_json::to_string_pretty(s).unwrap_or_default()),
                None => Err(format!(
                    "sandbox {} has no metrics: it is not running, or has just started",
                    p.microvm_id
                )),
            }
        })
        .await
    }

    #[tool(description = "Destroy a sandbox: its memory, disk and processes are gone.")]
    async fn destroy_sandbox(&self, Parameters(p): Parameters<Sandbox>) -> Result<String, String> {
        self.call(move |c| {
            let vm = c
                .terminate_microvm(&p.microvm_id)
                .map_err(|e| e.to_string())?;
            Ok(format!("sandbox {} is {}", p.microvm_id, vm.state))
        })
        .await
    }

    #[tool(
        description = "Fork a running sandbox: copies of it (memory, running processes, files) as they are now, each its own sandbox that runs on independently with fresh randomness. Waits until they run; returns their microvmIds. Use it to try several approaches from one state."
    )]
    async fn fork_sandbox(&self, Parameters(p): Parameters<ForkSandbox>) -> Result<String, String> {
        self.call(move |c| {
            let forked = c
                .fork_microvm(&p.microvm_id, p.count.unwrap_or(1))
                .map_err(|e| e.to_string())?;
            let mut clones = Vec::new();
            for m in &forked.microvms {
                let vm = c
                    .wait_microvm(
                        &m.microvm_id,
                        MicrovmState::Running,
                        Duration::from_secs(180),
                    )
                    .map_err(|e| e.to_string())?;
                if vm.state != MicrovmState::Running {
                    return Err(format!(
                        "clone {} is {}: {}",
                        vm.microvm_id,
                        vm.state,
                        vm.state_reason.as_deref().unwrap_or("?")
                    ));
                }
                clones.push(
                    json!({"microvmId": vm.microvm_id, "endpoint": vm.endpoint, "state": vm.state}),
                );
            }
            Ok(pretty(
                &json!({"parentMicrovmId": forked.parent_microvm_id, "clones": clones}),
            ))
        })
        .await
    }

    #[tool(
        description = "Save a running sandbox as a new image: its memory, running processes and files as they are now. The sandbox runs on. Waits until the image is ready; create_sandbox with that image name starts new sandboxes from this exact state."
    )]
    async fn save_sandbox_image(
        &self,
        Parameters(p): Parameters<SaveSandbox>,
    ) -> Result<String, String> {
        self.call(move |c| {
            let saved = c
                .save_microvm_image(&p.microvm_id, &p.name)
                .map_err(|e| e.to_string())?;
            let image = c
                .wait_image(&saved.image_identifier, Duration::from_secs(600))
                .map_err(|e| e.to_string())?;
            if image.status != kiln_client::api::ImageStatus::Successful {
                return Err(format!(
                    "image {} is {}: {}",
                    image.image_identifier,
                    image.status.as_str(),
                    image.status_reason.as_deref().unwrap_or("?")
                ));
            }
            Ok(pretty(
                &json!({"image": image.name, "imageIdentifier": image.image_identifier, "status": image.status}),
            ))
        })
        .await
    }

    #[tool(
        description = "List sandboxes that are not terminated, with their labels (filtered by labels if given)."
    )]
    async fn list_sandboxes(
        &self,
        Parameters(p): Parameters<ListSandboxes>,
    ) -> Result<String, String> {
        self.call(move |c| {
            let all = c
                .list_all_microvms(&ListMicrovmsQuery {
                    label: p.labels,
                    ..Default::default()
                })
                .map_err(|e| e.to_string())?;
            let live: Vec<Value> = all
                .iter()
                .filter(|v| v.state != MicrovmState::Terminated)
                .map(|v| json!({"microvmId": v.microvm_id, "state": v.state, "image": v.image_name, "endpoint": v.endpoint, "labels": v.labels}))
                .collect();
            Ok(pretty(&Value::Array(live)))
        })
        .await
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "kiln",
    instructions = "kiln runs code in isolated microVM sandboxes. create_sandbox from an image, run_code (or run_command, read_file, write_file, list_files) as often as needed — state persists — fork_sandbox to branch it, save_sandbox_image to keep it as an image, then destroy_sandbox."
)]
impl ServerHandler for KilnMcp {}

/// Serves MCP on stdin/stdout until the client closes it.
pub async fn serve(client: Client) -> anyhow::Result<i32> {
    let service = KilnMcp::new(client).serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(0)
}
