//! Planning: walks the Dockerfile once before any VM starts, resolving variables and COPY
//! sources (so a missing source fails before any work) and computing each step's cache
//! key: hash(parent key, resolved instruction, content of the files it copies).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::context::{BuildContext, ContextError};
use crate::dockerfile::{
    parse_port, substitute, CommandForm, Dockerfile, Instruction, ParseError, Transfer,
};

/// What the image runs and how, once the build is done.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuntimeConfig {
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub exposed_ports: Vec<u16>,
    pub labels: BTreeMap<String, String>,
}

impl RuntimeConfig {
    /// The app's argv following Docker's ENTRYPOINT/CMD rules; empty when neither is set.
    pub fn app_argv(&self) -> Vec<String> {
        self.entrypoint
            .iter()
            .chain(self.cmd.iter())
            .cloned()
            .collect()
    }
}

/// The work a step does in the build VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: String,
        user: Option<String>,
    },
    /// Files to put into the guest: (context path, guest path) pairs, unpacked under `/`.
    Copy {
        files: Vec<(String, String)>,
        chown: Option<String>,
        chmod: Option<u32>,
        extract_archives: bool,
    },
    Mkdir {
        path: String,
        user: Option<String>,
    },
    /// Changes only the image configuration.
    Config,
}

impl Action {
    pub fn changes_disk(&self) -> bool {
        !matches!(self, Action::Config)
    }
}

#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub number: usize,
    pub line: usize,
    pub text: String,
    pub action: Action,
    pub key: String,
}

#[derive(Debug)]
pub struct Plan {
    pub from: String,
    pub steps: Vec<PlannedStep>,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("Dockerfile line {line}: {source}")]
    Context {
        line: usize,
        #[source]
        source: ContextError,
    },
}

const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// Most bytes the build's environment (ENV and ARG names and values) may hold.
pub const MAX_ENV_BYTES: usize = 1024 * 1024;

/// Refuses an environment grown past [`MAX_ENV_BYTES`], naming the line that did it.
fn check_env_size(
    env: &[(String, String)],
    args: &BTreeMap<String, String>,
    line: usize,
) -> Result<(), PlanError> {
    let size: usize = env
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .chain(args.iter().map(|(k, v)| k.len() + v.len()))
        .sum();
    if size > MAX_ENV_BYTES {
        return Err(PlanError::Parse(ParseError::new(
            line,
            format!(
                "the build's ENV and ARG values reach {size} bytes, over the limit of \
                 {MAX_ENV_BYTES}; keep large data in files"
            ),
        )));
    }
    Ok(())
}

fn join_guest(base: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        normalize(rel)
    } else {
        normalize(&format!("{}/{rel}", base.trim_end_matches('/')))
    }
}

fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

pub fn plan(
    df: &Dockerfile,
    ctx: &BuildContext,
    build_args: &BTreeMap<String, String>,
    base_key: &str,
) -> Result<Plan, PlanError> {
    let perr = |line: usize, m: String| PlanError::Parse(ParseError::new(line, m));
    // ARGs before FROM apply to FROM only.
    let mut global: BTreeMap<String, String> = BTreeMap::new();
    for a in &df.global_args {
        let v = build_args
            .get(&a.name)
            .cloned()
            .or_else(|| a.default.clone())
            .unwrap_or_default();
        global.insert(a.name.clone(), v);
    }
    let from = substitute(&df.from.image, &|n| global.get(n).cloned())
        .map_err(|m| perr(df.from_line, m))?;

    let mut env: Vec<(String, String)> = Vec::new();
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut rt = RuntimeConfig {
        workdir: "/".into(),
        ..Default::default()
    };
    let mut shell: Vec<String> = DEFAULT_SHELL.iter().map(|s| s.to_string()).collect();
    let mut key = hex::encode(Sha256::digest(format!("base:{base_key}")));
    let mut steps = Vec::new();

    for (i, step) in df.steps.iter().enumerate() {
        let line = step.line;
        let vars = (env.clone(), args.clone());
        let lookup = move |n: &str| {
            vars.0
                .iter()
                .rev()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .or_else(|| vars.1.get(n).cloned())
        };
        let sub = |text: &str| substitute(text, &lookup).map_err(|m| perr(line, m));
        let mut content_digest = String::new();
        let action = match &step.instruction {
            Instruction::Run(run) => {
                let mut run_env: Vec<(String, String)> =
                    args.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                run_env.extend(env.iter().cloned());
                Action::Run {
                    argv: run.command.argv(&shell),
                    env: run_env,
                    cwd: rt.workdir.clone(),
                    user: rt.user.clone(),
                }
            }
            Instruction::Copy(c) => transfer_action(
                &c.transfer,
                false,
                ctx,
                &rt.workdir,
                &sub,
                line,
                &mut content_digest,
            )?,
            Instruction::Add(a) => transfer_action(
                &a.transfer,
                true,
                ctx,
                &rt.workdir,
                &sub,
                line,
                &mut content_digest,
            )?,
            Instruction::Workdir(w) => {
                rt.workdir = join_guest(&rt.workdir, &sub(&w.path)?);
                Action::Mkdir {
                    path: rt.workdir.clone(),
                    user: rt.user.clone(),
                }
            }
            Instruction::Env(e) => {
                for (k, v) in &e.vars {
                    let v = sub(v)?;
                    env.retain(|(key, _)| key != k);
                    env.push((k.clone(), v));
                }
                check_env_size(&env, &args, line)?;
                Action::Config
            }
            Instruction::Arg(a) => {
                let v = build_args
                    .get(&a.name)
                    .cloned()
                    .or_else(|| {
                        a.default
                            .as_ref()
                            .map(|d| sub(d))
                            .transpose()
                            .ok()
                            .flatten()
                    })
                    .unwrap_or_default();
                args.insert(a.name.clone(), v);
                check_env_size(&env, &args, line)?;
                Action::Config
            }
            Instruction::User(u) => {
                rt.user = Some(sub(&u.user)?);
                Action::Config
            }
            Instruction::Expose(e) => {
                for p in &e.ports {
                    let port =
                        parse_port(&sub(p)?).map_err(|m| perr(line, format!("EXPOSE: {m}")))?;
                    if !rt.exposed_ports.contains(&port) {
                        rt.exposed_ports.push(port);
                    }
                }
                Action::Config
            }
            Instruction::Cmd(c) => {
                rt.cmd = c.command.argv(&shell);
                Action::Config
            }
            Instruction::Entrypoint(e) => {
                rt.entrypoint = e.command.argv(&shell);
                if matches!(e.command, CommandForm::Shell(_)) {
                    rt.cmd.clear(); // shell-form ENTRYPOINT ignores CMD, as in Docker
                }
                Action::Config
            }
            Instruction::Label(l) => {
                for (k, v) in &l.labels {
                    rt.labels.insert(sub(k)?, sub(v)?);
                }
                Action::Config
            }
            Instruction::Shell(s) => {
                shell = s.argv.clone();
                Action::Config
            }
            Instruction::From(_) => unreachable!("FROM is not a step"),
        };
        let mut h = Sha256::new();
        h.update(key.as_bytes());
        h.update(format!("{action:?}").as_bytes());
        h.update(content_digest.as_bytes());
        key = hex::encode(h.finalize());
        steps.push(PlannedStep {
            number: i + 1,
            line,
            text: step.text.clone(),
            action,
            key: key.clone(),
        });
    }
    rt.env = env;
    Ok(Plan {
        from,
        steps,
        runtime: rt,
    })
}

fn transfer_action(
    t: &Transfer,
    extract_archives: bool,
    ctx: &BuildContext,
    workdir: &str,
    sub: &dyn Fn(&str) -> Result<String, PlanError>,
    line: usize,
    digest: &mut String,
) -> Result<Action, PlanError> {
    let what = if extract_archives {
        "ADD source"
    } else {
        "COPY source"
    };
    let dest_raw = sub(&t.dest)?;
    let dest_is_dir = dest_raw.ends_with('/') || t.sources.len() > 1 || dest_raw == ".";
    let dest = join_guest(workdir, &dest_raw);
    let mut files = Vec::new();
    let mut selected_all = Vec::new();
    for source in &t.sources {
        let source = sub(source)?;
        let selected = ctx
            .select(&source, what)
            .map_err(|e| PlanError::Context { line, source: e })?;
        let single_file = selected.len() == 1
            && !source.contains(['*', '?', '['])
            && selected[0].0.ends_with(&selected[0].1)
            && !matches!(
                ctx.entries().get(&selected[0].0),
                Some(crate::context::Entry::Dir { .. })
            );
        for (path, rel) in &selected {
            let guest = if single_file && !dest_is_dir {
                dest.clone()
            } else {
                join_guest(&dest, rel)
            };
            files.push((path.clone(), guest));
        }
        selected_all.extend(selected);
    }
    *digest = ctx
        .digest(&selected_all)
        .map_err(|e| PlanError::Context { line, source: e })?;
    Ok(Action::Copy {
        files,
        chown: t.chown.clone(),
        chmod: t.chmod,
        extract_archives,
    })
}

#[cfg(test)]
mod bound_tests {
    use super::*;
    use crate::context::{BuildContext, ContextLimits};
    use crate::dockerfile::Dockerfile;

    fn plan_of(text: &str) -> Result<Plan, PlanError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), text).unwrap();
        let ctx = BuildContext::from_dir(dir.path(), ContextLimits::default()).unwrap();
        plan(
            &Dockerfile::parse(text).unwrap(),
            &ctx,
            &BTreeMap::new(),
            "",
        )
    }

    #[test]
    fn a_doubling_variable_stops_at_the_limit_naming_its_line() {
        let mut text = String::from("FROM busybox\nENV A=aaaaaaaaaaaaaaaa\n");
        for _ in 0..30 {
            text.push_str("ENV A=$A$A\n");
        }
        let err = plan_of(&text).unwrap_err().to_string();
        // 16 bytes doubled 12 times is 64 KiB; the 13th doubling (line 15) is refused.
        assert!(err.contains("line 15"), "{err}");
        assert!(err.contains("65536 bytes"), "{err}");
    }

    #[test]
    fn the_whole_environment_is_bounded_too() {
        let mut text = String::from("FROM busybox\nENV A=aaaaaaaaaaaaaaaa\n");
        for _ in 0..12 {
            text.push_str("ENV A=$A$A\n");
        }
        for n in 0..20 {
            text.push_str(&format!("ENV B{n}=$A\n"));
        }
        let err = plan_of(&text).unwrap_err().to_string();
        assert!(err.contains("over the limit of 1048576"), "{err}");
    }
}
