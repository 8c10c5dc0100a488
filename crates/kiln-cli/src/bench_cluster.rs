//! `kiln bench --part cluster --database-url-file F`: two kilnd nodes sharing one PostgreSQL
//! database (temporary homes, loopback ports; the database should be a scratch one: the
//! bench's nodes, images and microVMs stay in it, TERMINATED), measured side by side in one
//! run: RunMicrovm answered by the node holding the image against the same call passed on by
//! the other node (placement latency), and a GET of the app through its owner's ingress
//! against the same GET through the other node's ingress (the node-to-node tunnel).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_client::api::{AllowedPort, CreateImageRequest, CreateTokenRequest, RunMicrovmRequest};
use kiln_client::Client;
use kiln_types::MicrovmState;

use crate::bench_report::Report;

/// Sequential GETs per ingress.
const GETS: usize = 200;

const HOOK: &str = "#!/bin/sh\nwhile IFS= read -r l; do l=$(printf '%s' \"$l\" | tr -d '\\r'); \
    [ -z \"$l\" ] && break; done\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok'\n";
const START: &str = "#!/bin/sh\nmkdir -p /www\necho bench > /www/index.html\n\
    httpd -p 8080 -h /www\nexec nc -ll -p 9000 -e /srv/hook.sh\n";
const DOCKERFILE: &str =
    "FROM busybox\nCOPY start.sh hook.sh /srv/\nEXPOSE 8080\nCMD [\"/srv/start.sh\"]\n";

/// A kilnd node the bench started.
struct Node {
    child: Child,
    client: Client,
    ingress: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn kilnd_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the kiln binary")?;
    let path = exe.with_file_name("kilnd");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build kilnd next to kiln",
        path.display()
    );
    Ok(path)
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Starts kilnd as node `name` on `home` (given `key` as its API key, if any).
fn start(
    name: &str,
    home: &Path,
    url_file: &Path,
    objects: Option<&str>,
    key: Option<&str>,
) -> anyhow::Result<Node> {
    std::fs::create_dir_all(home)?;
    if let Some(key) = key {
        write_secret(&home.join("api-key"), key)?;
    }
    let log = std::fs::File::create(home.join("kilnd.log"))?;
    let child = Command::new(kilnd_binary()?)
        .arg("--home")
        .arg(home)
        .args(["--listen", "127.0.0.1:0", "--ingress-listen", "127.0.0.1:0"])
        .args(["--node-name", name, "--on-shutdown", "terminate"])
        .arg("--database-url-file")
        .arg(url_file)
        .args(objects.map(|o| ["--object-store", o]).into_iter().flatten())
        .args(["--node-lease-seconds", "3"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting kilnd")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !home.join("kilnd.addr").exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "kilnd {name} did not start: {}",
            std::fs::read_to_string(home.join("kilnd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let read = |f: &str| std::fs::read_to_string(home.join(f)).map(|s| s.trim().to_string());
    let client = Client::from_env(
        Some(format!("http://{}", read("kilnd.addr")?)),
        Some(read("api-key")?),
    )?;
    Ok(Node {
        child,
        client,
        ingress: read("kilnd.ingress")?,
    })
}

fn context() -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, text) in [
        ("Dockerfile", DOCKERFILE),
        ("start.sh", START),
        ("hook.sh", HOOK),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        tar.append_data(&mut h, name, text.as_bytes())?;
    }
    Ok(tar.into_inner()?)
}

/// One GET / through an ingress (path style, a fresh connection): its time in ms.
fn get(ingress: &str, id: &str, token: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(ingress)?;
    write!(
        s,
        "GET /m/{id}/ HTTP/1.1\r\nHost: {ingress}\r\nX-Kiln-Auth: {token}\r\nX-Kiln-Port: 8080\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    anyhow::ensure!(
        reply.starts_with("HTTP/1.1 200"),
        "the ingress answered {reply:.200}"
    );
    Ok(crate::bench::ms(start.elapsed()))
}

pub fn measure(
    rounds: usize,
    url_file: &Path,
    objects: Option<&str>,
    scratch: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let tag = std::process::id();
    let a = start(
        &format!("bench-a-{tag}"),
        &scratch.join("a"),
        url_file,
        objects,
        None,
    )?;
    let key = std::fs::read_to_string(scratch.join("a").join("api-key"))?;
    let b = start(
        &format!("bench-b-{tag}"),
        &scratch.join("b"),
        url_file,
        objects,
        Some(key.trim()),
    )?;
    let name = format!("bc-{tag}");
    let built = a
        .client
        .build_image(&name, &context()?, CreateImageRequest::default())?;
    let image = a
        .client
        .wait_image(&built.image_identifier, Duration::from_secs(600))?;
    anyhow::ensure!(
        image.status == kiln_client::api::ImageStatus::Successful,
        "the bench image failed: {:?}",
        image.status_reason
    );

    let run = |via: &Node| -> anyhow::Result<(f64, String)> {
        let req = RunMicrovmRequest {
            image_identifier: name.clone(),
            ..Default::default()
        };
        let start = Instant::now();
        let r = via.client.run_microvm(&req)?;
        Ok((crate::bench::ms(start.elapsed()), r.microvm_id))
    };
    let (mut direct, mut passed) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        for (via, samples) in [(&a, &mut direct), (&b, &mut passed)] {
            let (t, id) = run(via)?;
            samples.push(t);
            a.client
                .wait_microvm(&id, MicrovmState::Running, Duration::from_secs(120))?;
            a.client.terminate_microvm(&id)?;
        }
    }
    report.section("cluster: two nodes on one PostgreSQL");
    let d = report.samples("RunMicrovm answered by the image's node", "ms", &direct);
    let p = report.samples("RunMicrovm passed on by the other node", "ms", &passed);
    report.ratio("ratio passed on / direct", &p, &d);

    let (_, id) = run(&a)?;
    a.client
        .wait_microvm(&id, MicrovmState::Running, Duration::from_secs(120))?;
    let token = a.client.create_token(&CreateTokenRequest {
        microvm_identifier: id.clone(),
        expiration_in_minutes: 10,
        allowed_ports: vec![AllowedPort { port: 8080 }],
        kind: None,
    })?;
    let token = token.auth_token.kiln_auth;
    // Warm both paths (the guest's httpd, the tunnel's first connection), then alternate.
    get(&a.ingress, &id, &token)?;
    get(&b.ingress, &id, &token)?;
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for _ in 0..GETS {
        same.push(get(&a.ingress, &id, &token)?);
        cross.push(get(&b.ingress, &id, &token)?);
    }
    let s = report.samples("GET through the owner's ingress", "ms", &same);
    let c = report.samples("GET through the other node's ingress", "ms", &cross);
    report.ratio("ratio cross-node / same-node", &c, &s);
    a.client.terminate_microvm(&id)?;
    if objects.is_some() {
        resumes(rounds, &a, &b, scratch, &run, report)?;
    }
    Ok(())
}

/// Times `f` in ms.
fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(f64, T)> {
    let start = Instant::now();
    let out = f()?;
    Ok((crate::bench::ms(start.elapsed()), out))
}

/// Waits (up to 2 min) until `ok`.
fn wait_until(what: &str, mut ok: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ok()? {
        anyhow::ensure!(Instant::now() < deadline, "{what} took over 2 min");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Resume on the node that suspended a microVM against resume on the node it was handed
/// to (A drained: the snapshot fetched from object storage and assembled on B), and the
/// hand-off itself.
fn resumes(
    rounds: usize,
    a: &Node,
    b: &Node,
    scratch: &Path,
    run: &dyn Fn(&Node) -> anyhow::Result<(f64, String)>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let a_name = a.client.list_nodes()?.this_node;
    let b_name = b.client.list_nodes()?.this_node;
    let uploads = |n: usize| -> anyhow::Result<bool> {
        let log = std::fs::read_to_string(scratch.join("a").join("kilnd.log"))?;
        Ok(log.matches("snapshot uploaded").count() >= n)
    };
    let (mut same, mut other, mut hand) = (Vec::new(), Vec::new(), Vec::new());
    let mut uploaded = 0;
    for _ in 0..rounds.max(1) {
        let (_, id) = run(a)?;
        a.client
            .wait_microvm(&id, MicrovmState::Running, Duration::from_secs(120))?;
        for round in 0..2 {
            a.client.suspend_microvm(&id)?;
            a.client
                .wait_microvm(&id, MicrovmState::Suspended, Duration::from_secs(120))?;
            uploaded += 1;
            wait_until("the snapshot upload", || uploads(uploaded))?;
            if round == 0 {
                let (t, _) = timed(|| Ok(a.client.resume_microvm(&id)?))?;
                same.push(t);
            }
        }
        let (t, _) = timed(|| {
            a.client.drain_node(&a_name)?;
            // A call in flight while the microVM moves may be answered 503 (retry): that
            // counts as not yet.
            wait_until("the hand-off", || {
                let owner = b
                    .client
                    .get_microvm(&id)
                    .map(|v| v.node)
                    .unwrap_or_default();
                Ok(owner == b_name && scratch.join("b").join("microvms").join(&id).exists())
            })
        })?;
        hand.push(t);
        a.client.undrain_node(&a_name)?;
        let (t, _) = timed(|| Ok(b.client.resume_microvm(&id)?))?;
        other.push(t);
        b.client.terminate_microvm(&id)?;
    }
    let s = report.samples("ResumeMicrovm on the node that suspended it", "ms", &same);
    let o = report.samples("ResumeMicrovm on the node it was handed to", "ms", &other);
    report.ratio("ratio resume other node / same node", &o, &s);
    report.samples(
        "hand-off of a SUSPENDED microVM (drain → assembled on the other node)",
        "ms",
        &hand,
    );
    Ok(())
}
