//! `--seed-image DIR`: the seed's demo image (`examples/agent-sandbox`: Debian 12, python3,
//! flask, pandas) measured the way the busybox image is, in the same run: RunMicrovm → the
//! first `GET /health` through the ingress that answers 200, against a cold boot of the same
//! image's disk → the app (its CMD, WORKDIR, ENV and USER from the image's record) answering
//! `GET /ready` on the hook port with 200, the moment the seed bakes its snapshot at. Opt-in:
//! the bake takes minutes under emulation.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use kiln_vmm::Template;

use crate::{bake, cold_rounds, figure, median, run_rounds, tar_of, Client, Rounds};

/// The name the image gets in the bench's kilnd.
const NAME: &str = "seed";
/// A bake under TCG takes minutes (apt and pip in the build microVM).
const BAKE_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// A cold boot's app imports pandas before `/ready` answers 200.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// The build context: the directory's regular files (the seed's context has no
/// subdirectories; one with them is refused rather than baked without them).
fn context_tar(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        anyhow::ensure!(
            entry.file_type()?.is_file(),
            "{}: only a flat directory of files is supported as --seed-image's context",
            entry.path().display()
        );
        anyhow::ensure!(
            name.len() < 100,
            "{name}: file name too long for the context tar"
        );
        files.push((name, std::fs::read(entry.path())?));
    }
    anyhow::ensure!(
        files.iter().any(|(n, _)| n == "Dockerfile"),
        "{} has no Dockerfile",
        dir.display()
    );
    files.sort();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    Ok(tar_of(&refs))
}

pub async fn measure(
    addr: String,
    ingress: String,
    key: String,
    home: &Path,
    context: &Path,
) -> anyhow::Result<()> {
    let tar = context_tar(context)?;
    say!(
        "seed demo image: baking {} (minutes under emulation)",
        context.display()
    );
    let rounds = tokio::task::spawn_blocking(move || -> anyhow::Result<(String, Rounds)> {
        let mut c = Client::connect(&addr, &key)?;
        let image = bake(&mut c, NAME, &tar, BAKE_TIMEOUT)?;
        let rounds = run_rounds(&mut c, &ingress, NAME, "/health", |b| {
            b.windows(7).any(|w| w == b"\"ready\"")
        })?;
        c.json(
            "POST",
            &format!("/v1/microvms/{}/terminate", rounds.last),
            serde_json::json!({}),
        )?;
        Ok((image, rounds))
    });
    let (image, rounds) = rounds.await??;
    let dir = home.join("images").join(NAME).join(&image);
    let record = kiln_image::build::ImageRecord::read(&dir)?;
    let rt = &record.runtime;
    let app = kiln_proto::ProcessSpec {
        argv: rt.app_argv(),
        env: rt.env.clone(),
        cwd: Some(rt.workdir.clone()),
        user: rt.user.clone(),
    };
    anyhow::ensure!(!app.argv.is_empty(), "image {NAME} has no CMD to start");
    let template = Template::open(&dir.join("template"))?;
    let (cold_agent, cold_ready) = cold_rounds(
        home,
        "seed-cold",
        &template,
        app,
        (record.hook_port, "/ready"),
        READY_TIMEOUT,
    )
    .await?;
    figure(
        "seed demo image: RunMicrovm -> RUNNING (/run done)",
        "ms",
        rounds.running,
    );
    figure(
        "seed demo image: RunMicrovm -> first proxied HTTP 200",
        "ms",
        rounds.first_200.clone(),
    );
    figure(
        "seed demo image: cold boot -> agent ready",
        "ms",
        cold_agent,
    );
    figure(
        "seed demo image: cold boot -> /ready 200",
        "ms",
        cold_ready.clone(),
    );
    let (run, cold) = (median(&rounds.first_200), median(&cold_ready));
    say!("seed demo image: RunMicrovm -> first proxied HTTP 200 {run:>9.1} ms");
    say!("seed demo image: cold boot -> /ready 200             {cold:>9.1} ms");
    say!(
        "  ratio cold boot / RunMicrovm                       {:>9.1}x",
        cold / run
    );
    Ok(())
}
