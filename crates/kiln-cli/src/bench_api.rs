//! `kiln bench --part api`: the control plane and the ingress, measured by `kiln-bench-api`
//! (an in-process kilnd on a temporary home, built with kiln-daemon) and reported here with
//! the other figures: RunMicrovm → first proxied HTTP 200 against a cold boot → the app's
//! first 200 of the same image (and, with `--seed-image`, of the seed's demo image against a
//! cold boot → its `/ready`), and a GET through the ingress against the same GET without
//! the proxy, 16 at once.

use std::process::Command;

use anyhow::Context;
use serde_json::Value;

use crate::bench_report::Report;

/// Where `kiln-bench-api` is: beside this binary (cargo builds both into one directory).
fn bench_api_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("finding the kiln binary")?;
    let path = exe.with_file_name("kiln-bench-api");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build it with `cargo build --release -p kiln-daemon --bins` (it is \
         kiln-daemon's) next to {}",
        path.display(),
        exe.display()
    );
    Ok(path)
}

/// Runs `kiln-bench-api --json` and reports its figures, with the ratios they make.
/// With `seed_image`, the seed's demo image baked from that directory is measured too.
pub fn measure(
    rounds: usize,
    seed_image: Option<&std::path::Path>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let binary = bench_api_binary()?;
    let mut cmd = Command::new(&binary);
    cmd.args(["--json", "--rounds", &rounds.to_string()]);
    if let Some(dir) = seed_image {
        cmd.arg("--seed-image").arg(dir);
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed ({})",
        binary.display(),
        out.status
    );
    let doc: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} printed no JSON document", binary.display()))?;
    report.section("api: RunMicrovm, ingress:");
    let mut stats = std::collections::HashMap::new();
    for f in doc["figures"].as_array().context("no figures")? {
        let name = f["name"].as_str().unwrap_or("?");
        let samples: Vec<f64> = f["samples"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let stat = report.samples(name, f["unit"].as_str().unwrap_or(""), &samples);
        stats.insert(name.to_string(), stat);
    }
    let mut ratio = |name: &str, a: &str, b: &str| {
        if let (Some(a), Some(b)) = (stats.get(a).copied(), stats.get(b).copied()) {
            report.ratio(name, &a, &b);
        }
    };
    ratio(
        "ratio cold boot -> 200 / RunMicrovm -> 200",
        "cold boot -> the app's first HTTP 200",
        "RunMicrovm -> first proxied HTTP 200",
    );
    ratio(
        "seed demo image: ratio cold boot -> /ready / RunMicrovm -> 200",
        "seed demo image: cold boot -> /ready 200",
        "seed demo image: RunMicrovm -> first proxied HTTP 200",
    );
    ratio(
        "ratio proxied / unproxied throughput, 16 at once",
        "GET through the ingress, 16 at once: throughput",
        "GET without the proxy (agent channel), 16 at once: throughput",
    );
    ratio(
        "ratio proxied / unproxied p99, 16 at once",
        "GET through the ingress, 16 at once: p99",
        "GET without the proxy (agent channel), 16 at once: p99",
    );
    Ok(())
}
