//! `kiln mcp` with a real MCP client: rmcp's client spawns `kiln mcp` and talks to it over
//! the child's stdin/stdout (initialize, tools/list, tools/call) against a real kilnd whose
//! ingress speaks TLS with its own CA, and a busybox image with an executor on 8080
//! (examples/busybox-executor).

// Integration tests: a failed step fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};

type Client = RunningService<RoleClient, ()>;

async fn call(client: &Client, tool: &'static str, args: Value) -> (bool, String) {
    let Value::Object(args) = args else {
        panic!("arguments are an object")
    };
    let result: CallToolResult = client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(args))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    let text = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    (result.is_error != Some(true), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_creates_uses_and_destroys_a_sandbox() {
    let d = common::kilnd_with(&[
        "--ingress-tls-self-signed",
        "--ingress-domain",
        "kiln.localhost",
    ]);
    let home = d.home.path().to_path_buf();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/busybox-executor"
    );
    let built = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["image", "create", "executor", example, "--quiet"])
        .env("KILN_HOME", &home)
        .env_remove("KILN_ENDPOINT")
        .env_remove("KILN_API_KEY")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );

    let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln")).configure(|c| {
        c.arg("mcp")
            .env("KILN_HOME", &home)
            .env_remove("KILN_ENDPOINT")
            .env_remove("KILN_API_KEY");
    });
    let client: Client = ().serve(TokioChildProcess::new(command).unwrap()).await.unwrap();
    let server = client.peer_info().expect("initialized");
    assert_eq!(server.server_info.as_ref().unwrap().name, "kiln");
    assert!(server.capabilities.tools.is_some());
    let mut tools: Vec<String> = client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    tools.sort();
    assert_eq!(
        tools,
        [
            "create_sandbox",
            "destroy_sandbox",
            "fork_sandbox",
            "list_files",
            "list_processes",
            "list_sandboxes",
            "process_output",
            "read_file",
            "run_code",
            "run_command",
            "sandbox_metrics",
            "save_sandbox_image",
            "send_stdin",
            "signal_process",
            "start_process",
            "write_file"
        ]
    );

    let (ok, created) = call(
        &client,
        "create_sandbox",
        json!({"image": "executor", "labels": {"task": "mcp"}}),
    )
    .await;
    assert!(ok, "{created}");
    let created: Value = serde_json::from_str(&created).unwrap();
    let id = created["microvmId"].as_str().unwrap().to_string();
    assert_eq!(created["state"], "RUNNING");

    // Code through the ingress (HTTPS, a fresh token), state kept between calls.
    let (ok, ran) = call(
        &client,
        "run_code",
        json!({"microvm_id": id, "code": "uname -s; echo $((6*7)) > /workspace/answer; cat /workspace/answer"}),
    )
    .await;
    assert!(ok, "{ran}");
    let ran: Value = serde_json::from_str(&ran).unwrap();
    assert_eq!(ran["status"], 200, "{ran}");
    assert_eq!(ran["response"]["stdout"], "Linux\n42\n", "{ran}");
    assert_eq!(ran["response"]["exit_code"], 0);

    // Files: written and read through the files API; the executor sees them too.
    let (ok, wrote) = call(
        &client,
        "write_file",
        json!({"microvm_id": id, "path": "/workspace/notes/a.txt", "content": "hello\n'quoted' $HOME\n"}),
    )
    .await;
    assert!(ok, "{wrote}");
    let (ok, read) = call(
        &client,
        "read_file",
        json!({"microvm_id": id, "path": "/workspace/notes/a.txt"}),
    )
    .await;
    assert!(ok, "{read}");
    assert_eq!(read, "hello\n'quoted' $HOME\n", "written verbatim");
    let (_, ran) = call(
        &client,
        "run_code",
        json!({"microvm_id": id, "code": "wc -l < /workspace/notes/a.txt"}),
    )
    .await;
    assert!(ran.contains(r#""stdout": "2\n""#), "{ran}");
    // Larger than an exec argument could carry (the old 48 KiB limit), listed with its size.
    let big = "x".repeat(300_000);
    let (ok, wrote) = call(
        &client,
        "write_file",
        json!({"microvm_id": id, "path": "/workspace/notes/big.txt", "content": big}),
    )
    .await;
    assert!(ok, "{wrote}");
    let (ok, listed) = call(
        &client,
        "list_files",
        json!({"microvm_id": id, "path": "/workspace/notes"}),
    )
    .await;
    assert!(ok, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let sizes: Vec<(&str, u64)> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(sizes, [("a.txt", 21), ("big.txt", 300_000)], "{listed}");
    let (ok, missing) = call(
        &client,
        "read_file",
        json!({"microvm_id": id, "path": "/nope"}),
    )
    .await;
    assert!(!ok && missing.contains("/nope"), "a tool error: {missing}");
    let (ok, out) = call(
        &client,
        "run_command",
        json!({"microvm_id": id, "command": ["sh", "-c", "exit 3"]}),
    )
    .await;
    assert!(ok && out.contains(r#""exitCode": 3"#), "{out}");
    // A process that runs on: started, fed, read in parts by offset, signalled.
    let (ok, started) = call(
        &client,
        "start_process",
        json!({"microvm_id": id, "shell": "echo up; read a; echo got:$a; sleep 600", "stdin": true, "tag": "srv"}),
    )
    .await;
    assert!(ok, "{started}");
    let pid = serde_json::from_str::<Value>(&started).unwrap()["pid"]
        .as_u64()
        .unwrap();
    let (ok, out) = call(
        &client,
        "process_output",
        json!({"microvm_id": id, "pid": pid, "wait_seconds": 1}),
    )
    .await;
    assert!(ok, "{out}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (out["output"].as_str(), out["running"].as_bool()),
        (Some("up\n"), Some(true)),
        "{out}"
    );
    let (ok, sent) = call(
        &client,
        "send_stdin",
        json!({"microvm_id": id, "pid": pid, "text": "yes\n"}),
    )
    .await;
    assert!(ok, "{sent}");
    let (ok, out) = call(
        &client,
        "process_output",
        json!({"microvm_id": id, "pid": pid, "from": out["nextOffset"], "wait_seconds": 2}),
    )
    .await;
    assert!(ok && out.contains(r#""output": "got:yes\n""#), "{out}");
    let (ok, listed) = call(&client, "list_processes", json!({"microvm_id": id})).await;
    assert!(ok && listed.contains(r#""tag": "srv""#), "{listed}");
    let (ok, _) = call(
        &client,
        "signal_process",
        json!({"microvm_id": id, "pid": pid, "signal": "KILL"}),
    )
    .await;
    assert!(ok);
    let (_, out) = call(
        &client,
        "process_output",
        json!({"microvm_id": id, "pid": pid, "from": 0, "wait_seconds": 30}),
    )
    .await;
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (out["signal"].as_i64(), out["output"].as_str()),
        (Some(9), Some("up\ngot:yes\n")),
        "{out}"
    );

    let (_, listed) = call(&client, "list_sandboxes", json!({})).await;
    assert!(listed.contains(&id), "{listed}");
    let (_, listed) = call(&client, "list_sandboxes", json!({"labels": ["task=mcp"]})).await;
    assert!(
        listed.contains(&id) && listed.contains(r#""task": "mcp""#),
        "{listed}"
    );
    let (_, none) = call(&client, "list_sandboxes", json!({"labels": ["task=other"]})).await;
    assert_eq!(none.trim(), "[]", "{none}");
    // Metrics: the newest sample, once the first tick has taken one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let metrics = loop {
        let (ok, m) = call(&client, "sandbox_metrics", json!({"microvm_id": id})).await;
        if ok {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let metrics: Value = serde_json::from_str(&metrics).unwrap();
    assert!(
        metrics["hostMemoryBytes"].as_u64().unwrap() > 0,
        "{metrics}"
    );

    // A fork runs on from the sandbox's files; what it writes stays its own.
    let (ok, forked) = call(&client, "fork_sandbox", json!({"microvm_id": id})).await;
    assert!(ok, "{forked}");
    let forked: Value = serde_json::from_str(&forked).unwrap();
    assert_eq!(forked["parentMicrovmId"], id.as_str());
    let clone = forked["clones"][0]["microvmId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(forked["clones"][0]["state"], "RUNNING", "{forked}");
    let (ok, read) = call(
        &client,
        "run_code",
        json!({"microvm_id": clone, "code": "cat /workspace/answer; echo clone > /workspace/who"}),
    )
    .await;
    assert!(ok && read.contains(r#""stdout": "42\n""#), "{read}");
    let (_, parent) = call(
        &client,
        "run_command",
        json!({"microvm_id": id, "command": ["sh", "-c", "cat /workspace/who || echo none"]}),
    )
    .await;
    assert!(parent.contains(r#""stdout": "none\n""#), "{parent}");
    let (ok, gone) = call(&client, "destroy_sandbox", json!({"microvm_id": clone})).await;
    assert!(ok && gone.contains("TERMINATED"), "{gone}");

    // Saved as an image: a sandbox created from it starts with the files as they were.
    let (ok, saved) = call(
        &client,
        "save_sandbox_image",
        json!({"microvm_id": id, "name": "executor-saved"}),
    )
    .await;
    assert!(ok && saved.contains("SUCCESSFUL"), "{saved}");
    let (ok, created) = call(
        &client,
        "create_sandbox",
        json!({"image": "executor-saved"}),
    )
    .await;
    assert!(ok, "{created}");
    let created: Value = serde_json::from_str(&created).unwrap();
    let warm = created["microvmId"].as_str().unwrap().to_string();
    let (ok, read) = call(
        &client,
        "run_code",
        json!({"microvm_id": warm, "code": "cat /workspace/answer"}),
    )
    .await;
    assert!(ok && read.contains(r#""stdout": "42\n""#), "{read}");
    let (ok, gone) = call(&client, "destroy_sandbox", json!({"microvm_id": warm})).await;
    assert!(ok && gone.contains("TERMINATED"), "{gone}");

    let (ok, gone) = call(&client, "destroy_sandbox", json!({"microvm_id": id})).await;
    assert!(ok && gone.contains("TERMINATED"), "{gone}");
    assert!(!home.join("microvms").join(&id).exists());
    let (ok, after) = call(
        &client,
        "run_code",
        json!({"microvm_id": id, "code": "true"}),
    )
    .await;
    assert!(!ok && after.contains("TERMINATED"), "{after}");
    let (_, listed) = call(&client, "list_sandboxes", json!({})).await;
    assert!(!listed.contains(&id), "{listed}");
    client.cancel().await.unwrap();
}
