//! Baking an image: plan, resolve the base, reuse cached layers, run the remaining steps in
//! a build microVM (committing a layer after each disk step), start the app, wait for
//! `/ready`, take the template snapshot, and record the result. A failed build leaves a
//! FAILED record with the reason and log tail, and no VM, template or unfinished layer.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use kiln_proto::{ErrorKind, ExecRequest, HttpRequest, ProcessSpec, PutArchiveRequest};
use kiln_types::{Accel, VmId};
use kiln_vmm::agent::ExecEvent;
use kiln_vmm::disk::BackingFormat;
use kiln_vmm::{BootConfig, GuestAssets, MachineSpec, NetworkAttachment, Vm, VmError};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::Digest;
use tracing::{info, info_span, Instrument};

use crate::base::{self, BaseError};
use crate::context::{BuildContext, ContextError, ContextLimits, Entry};
use crate::dockerfile::{Dockerfile, MAX_DOCKERFILE_BYTES};
use crate::layers::LayerStore;
use crate::log::{BuildLog, LogSink};
use crate::plan::{plan, Action, PlanError, PlannedStep, RuntimeConfig};

pub const DEFAULT_HOOK_PORT: u16 = 9000;
/// In a build directory while building: the path of the VM's writable top layer.
const ACTIVE_TOP_FILE: &str = "active-top";
const MIN_MEMORY_MIB: u32 = 512;
const MAX_MEMORY_MIB: u32 = 8192;

/// What to build and how the image will run.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub name: String,
    /// Build id to use (the control plane picks it up front); generated when `None`.
    pub id: Option<String>,
    /// A directory, `.zip` or `.tar`.
    pub context: PathBuf,
    pub dockerfile: String,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// CPUs a microVM of this image is held to once its burst credit is spent.
    pub cpu_baseline: f64,
    /// Root disk size; the base's size when `None`.
    pub disk_mib: Option<u32>,
    pub build_args: BTreeMap<String, String>,
    pub hook_port: u16,
    /// Wait for `GET /ready` to answer 200 before the snapshot (when the image has an app).
    pub wait_ready: bool,
    pub ready_timeout: Duration,
    /// Also require `GET /validate` to answer 200.
    pub validate: bool,
    pub limits: ContextLimits,
    /// Where RUN steps (and the app until the snapshot) may connect: `internet` by default.
    pub network: NetworkAttachment,
    /// The request that asked for this build, kept in the record as it is (the control
    /// plane's CreateMicrovmImage body) so the same build can be asked for again.
    pub request: Option<serde_json::Value>,
}

impl BuildSpec {
    pub fn new(name: &str, context: &Path) -> BuildSpec {
        BuildSpec {
            name: name.to_string(),
            id: None,
            context: context.to_path_buf(),
            dockerfile: "Dockerfile".into(),
            memory_mib: 512,
            vcpus: 1,
            cpu_baseline: 0.25,
            disk_mib: None,
            build_args: BTreeMap::new(),
            hook_port: DEFAULT_HOOK_PORT,
            wait_ready: true,
            ready_timeout: Duration::from_secs(60),
            validate: false,
            limits: ContextLimits::default(),
            network: NetworkAttachment::internet(),
            request: None,
        }
    }
}

pub use kiln_types::ImageStatus;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub number: usize,
    pub line: usize,
    pub text: String,
    pub key: String,
    pub cached: bool,
    pub millis: u64,
}

/// What is known about an image; written as `image.json` in its build directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: String,
    pub name: String,
    pub status: ImageStatus,
    pub reason: Option<String>,
    pub log_tail: Option<String>,
    pub base: Option<String>,
    pub steps: Vec<StepRecord>,
    pub runtime: RuntimeConfig,
    pub hook_port: u16,
    pub memory_mib: u32,
    pub vcpus: u8,
    /// CPUs a microVM is held to without burst credit (older records: none, a quarter of
    /// the vCPUs).
    #[serde(default)]
    pub cpu_baseline: Option<f64>,
    pub created_unix: u64,
    pub finished_unix: Option<u64>,
    /// The template snapshot directory, once SUCCESSFUL.
    pub template: Option<PathBuf>,
    /// Hash of the last step's key and everything else the snapshot depends on; an equal
    /// key means an identical image, whose template is reused without booting.
    #[serde(default)]
    pub image_key: Option<String>,
    /// The app answers lifecycle hooks (/run, /suspend, /resume, /terminate) on `hook_port`:
    /// true when it has an app and the build waited for its /ready.
    #[serde(default)]
    pub hooks_enabled: bool,
    /// [`BuildSpec::request`], as it was.
    #[serde(default)]
    pub request: Option<serde_json::Value>,
    /// Saved from this running microVM ([`crate::saved`]), not built from a Dockerfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_from: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Invalid build request: {0}")]
    Invalid(String),
    /// The image name belongs to something a save may not replace.
    #[error("{0}")]
    NameTaken(String),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("Step {step} ({text}) failed with exit code {code}{hint}")]
    StepFailed {
        step: usize,
        text: String,
        code: i32,
        hint: String,
    },
    #[error("Step {step} ({text}) could not run: {message}")]
    StepError {
        step: usize,
        text: String,
        message: String,
    },
    #[error("The app exited before /ready answered ({status})")]
    AppExited { status: String },
    #[error("GET /ready on port {port} did not answer 200 within {timeout:?}{last}")]
    ReadyTimeout {
        port: u16,
        timeout: Duration,
        last: String,
    },
    #[error("GET /validate on port {port} answered {status}, expected 200")]
    ValidateFailed { port: u16, status: String },
    #[error("Writing {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where images and layers live, and what guests run on.
pub struct Builder {
    pub images_dir: PathBuf,
    pub layers_dir: PathBuf,
    pub assets: GuestAssets,
    pub accel: Accel,
    /// The build VM's jail (or `--no-jail`).
    pub confinement: kiln_vmm::Confinement,
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The build VM's id, named after this process.
// INVARIANT: "build-" and a decimal process id is lowercase, digits and '-', at most 16
// characters, so VmId accepts it.
#[allow(clippy::expect_used)]
fn build_vm_id() -> VmId {
    VmId::new(format!("build-{}", std::process::id())).expect("valid id")
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ImageRecord {
    pub fn write(&self, dir: &Path) -> Result<(), BuildError> {
        let tmp = dir.join("image.json.tmp");
        // Fails only for a template path that is not UTF-8.
        let json = serde_json::to_vec_pretty(self).map_err(|e| BuildError::Io {
            path: tmp.clone(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&tmp, json).map_err(io(&tmp))?;
        std::fs::rename(&tmp, dir.join("image.json")).map_err(io(dir))
    }

    pub fn read(dir: &Path) -> Result<ImageRecord, BuildError> {
        let path = dir.join("image.json");
        let text = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&text).map_err(|e| BuildError::Io {
            path,
            source: std::io::Error::other(e),
        })
    }
}

pub(crate) fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

impl Builder {
    /// The directory of one build of an image.
    pub fn build_dir(&self, name: &str, id: &str) -> PathBuf {
        self.images_dir.join(name).join(id)
    }

    /// Builds an image. Always returns the final record (SUCCESSFUL or FAILED); the log is
    /// in the build directory and streams through `log` while the build runs.
    pub async fn build(&self, spec: BuildSpec) -> Result<ImageRecord, BuildError> {
        self.build_with_progress(spec, None).await
    }

    /// Like [`build`](Self::build), calling `progress` with every log line as it happens.
    pub async fn build_with_progress(
        &self,
        spec: BuildSpec,
        progress: Option<LogSink>,
    ) -> Result<ImageRecord, BuildError> {
        if !valid_image_name(&spec.name) {
            return Err(BuildError::Invalid(format!(
                "image name {:?}: use 1-40 characters of a-z, 0-9 and '-', not starting with '-'",
                spec.name
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
            return Err(BuildError::Invalid(format!(
                "memory {} MiB: choose {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}",
                spec.memory_mib
            )));
        }
        if spec.vcpus == 0 || spec.vcpus > 8 {
            return Err(BuildError::Invalid(format!(
                "vcpus {}: choose 1 to 8",
                spec.vcpus
            )));
        }
        let id = match &spec.id {
            Some(id)
                if id.len() <= 64
                    && id.starts_with(&format!("{}-", spec.name))
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
            {
                id.clone()
            }
            Some(id) => return Err(BuildError::Invalid(format!("build id {id:?} is not valid"))),
            None => format!(
                "{}-{:x}",
                spec.name,
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            ),
        };
        let dir = self.build_dir(&spec.name, &id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let log = BuildLog::create(&dir.join("build.log"), progress).map_err(io(&dir))?;
        // Held for the whole build: recovery skips builds whose lock is held.
        let lock_path = dir.join(".lock");
        let lock_file = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| BuildError::Io {
                path: lock_path.clone(),
                source: e.into(),
            })?;
        let mut record = ImageRecord {
            id: id.clone(),
            name: spec.name.clone(),
            status: ImageStatus::Creating,
            reason: None,
            log_tail: None,
            base: None,
            steps: Vec::new(),
            runtime: RuntimeConfig::default(),
            hook_port: spec.hook_port,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            cpu_baseline: Some(spec.cpu_baseline),
            created_unix: now(),
            finished_unix: None,
            template: None,
            image_key: None,
            hooks_enabled: false,
            request: spec.request.clone(),
            saved_from: None,
        };
        record.write(&dir)?;
        kiln_vmm::fault::point("bake.started");
        let span = info_span!("build", image = %spec.name, id = %id);
        let outcome = self
            .run(&spec, &dir, &log, &mut record)
            .instrument(span)
            .await;
        record.finished_unix = Some(now());
        let succeeded = outcome.is_ok();
        match outcome {
            Ok(template) => {
                kiln_vmm::fault::point("bake.baked");
                record.status = ImageStatus::Successful;
                record.template = Some(template);
                log.line(&format!("Image {id} is ready"));
            }
            Err(e) => {
                log.line(&format!("Build failed: {e}"));
                record.status = ImageStatus::Failed;
                record.reason = Some(e.to_string());
                record.log_tail = Some(log.tail());
                let _ = std::fs::remove_dir_all(dir.join("template"));
            }
        }
        log.finish();
        record.write(&dir)?;
        if succeeded {
            // Named current only once its record says SUCCESSFUL: a crash between the two
            // leaves the previous build current, never a name pointing at a failed one.
            kiln_vmm::fault::point("bake.recorded");
            std::fs::write(self.images_dir.join(&spec.name).join("current"), &id)
                .map_err(io(&dir))?;
        }
        self.settle_layers(&dir);
        let _ = std::fs::remove_file(&lock_path);
        Ok(record)
    }

    /// Settles the staging directory of the build in `dir` (see
    /// [`LayerStore::settle_staging`]): finished layers kept, root's and read-only.
    fn settle_layers(&self, dir: &Path) {
        if let Ok(staging) = std::fs::read_to_string(dir.join(ACTIVE_TOP_FILE)) {
            if let Ok(layers) = LayerStore::open(&self.layers_dir) {
                if let Err(e) = layers.settle_staging(Path::new(staging.trim())) {
                    tracing::warn!("settling the build's layers in {}: {e}", staging.trim());
                }
            }
        }
        let _ = std::fs::remove_file(dir.join(ACTIVE_TOP_FILE));
    }

    /// Finishes builds that were interrupted (the process was killed): marks them FAILED
    /// with reason "interrupted" and removes their VM directory, partial template and
    /// unfinished layer. Builds still running (their lock is held) are left alone.
    /// Returns the ids of the builds it recovered.
    pub fn recover_interrupted(&self) -> Result<Vec<String>, BuildError> {
        let mut recovered = Vec::new();
        let Ok(names) = std::fs::read_dir(&self.images_dir) else {
            return Ok(recovered);
        };
        for build_dir in names
            .flatten()
            .filter_map(|n| std::fs::read_dir(n.path()).ok())
            .flatten()
            .flatten()
        {
            let dir = build_dir.path();
            let Ok(mut record) = ImageRecord::read(&dir) else {
                continue;
            };
            if record.status != ImageStatus::Creating {
                continue;
            }
            if let Ok(f) = std::fs::File::open(dir.join(".lock")) {
                if nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
                {
                    continue; // still building
                }
            }
            self.settle_layers(&dir);
            let _ = std::fs::remove_dir_all(dir.join("vm"));
            let _ = std::fs::remove_dir_all(dir.join("template"));
            let _ = std::fs::remove_file(dir.join(".lock"));
            record.status = ImageStatus::Failed;
            record.reason = Some("interrupted".into());
            record.finished_unix = Some(now());
            record.write(&dir)?;
            recovered.push(record.id);
        }
        Ok(recovered)
    }

    /// The current (last successful) build of `name`, or its latest build.
    pub fn find(&self, name: &str) -> Option<ImageRecord> {
        let dir = self.images_dir.join(name);
        if let Ok(id) = std::fs::read_to_string(dir.join("current")) {
            if let Ok(r) = ImageRecord::read(&dir.join(id.trim())) {
                return Some(r);
            }
        }
        self.builds(name).pop()
    }

    /// Every build of `name`, oldest first.
    pub fn builds(&self, name: &str) -> Vec<ImageRecord> {
        let mut records: Vec<ImageRecord> = std::fs::read_dir(self.images_dir.join(name))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| ImageRecord::read(&e.path()).ok())
            .collect();
        records.sort_by_key(|r| (r.created_unix, r.id.clone()));
        records
    }

    /// Names of all images.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.images_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    async fn run(
        &self,
        spec: &BuildSpec,
        dir: &Path,
        log: &BuildLog,
        record: &mut ImageRecord,
    ) -> Result<PathBuf, BuildError> {
        let ctx = BuildContext::load(&spec.context, spec.limits)?;
        let text = ctx
            .read_text(&spec.dockerfile, MAX_DOCKERFILE_BYTES as u64)
            .map_err(|_| {
                BuildError::Invalid(format!(
                    "the build context has no {} (or it is over {MAX_DOCKERFILE_BYTES} bytes)",
                    spec.dockerfile
                ))
            })?;
        let df = Dockerfile::parse(&text).map_err(PlanError::from)?;
        // Resolve FROM before planning: the base's key starts every step key.
        let from_preview = crate::plan::plan(&df, &ctx, &spec.build_args, "")?.from;
        let base = base::resolve(&from_preview, &self.assets).await?;
        record.base = Some(base.name.clone());
        let plan = plan(&df, &ctx, &spec.build_args, &base.key)?;
        record.runtime = plan.runtime.clone();
        record.hooks_enabled = spec.wait_ready && !plan.runtime.app_argv().is_empty();
        let total = plan.steps.len();
        let image_key = {
            let last = plan
                .steps
                .last()
                .map(|s| s.key.clone())
                .unwrap_or_else(|| base.key.clone());
            let shape = format!(
                "{last}|{:?}|{}|{}|{:?}|{}|{}|{}|{}",
                plan.runtime,
                spec.memory_mib,
                spec.vcpus,
                spec.disk_mib,
                spec.hook_port,
                spec.wait_ready,
                spec.validate,
                self.assets.initramfs_key
            );
            hex::encode(sha2::Sha256::digest(shape.as_bytes()))
        };
        record.image_key = Some(image_key.clone());
        if let Some((same_id, template)) = self.builds(&spec.name).into_iter().rev().find_map(|r| {
            if r.status != ImageStatus::Successful || r.image_key.as_deref() != Some(&image_key) {
                return None;
            }
            // Only a template this host can still launch (same QEMU, machine, …).
            let template = r.template.filter(|t| {
                kiln_vmm::Template::open(t).is_ok_and(|t| t.compatibility(&self.assets).is_ok())
            })?;
            Some((r.id, template))
        }) {
            record_cached(&plan.steps, total, log, record);
            log.line(&format!(
                "Identical to build {same_id}: reusing its template snapshot"
            ));
            return Ok(template);
        }
        log.line(&format!(
            "Building {} from {} ({} steps)",
            spec.name, base.name, total
        ));

        let layers = LayerStore::open(&self.layers_dir).map_err(io(&self.layers_dir))?;
        let (mut parent, mut format) = (base.disk.clone(), BackingFormat::Raw);
        // Reuse layers up to the first disk step that misses; config steps count as
        // cached only when they come before the last reused layer (or nothing misses).
        let mut last_hit: Option<usize> = None;
        let mut missed = false;
        for (i, step) in plan.steps.iter().enumerate() {
            if !step.action.changes_disk() {
                continue;
            }
            match layers.lookup(&step.key) {
                Some(layer) => {
                    parent = layer;
                    format = BackingFormat::Qcow2;
                    last_hit = Some(i);
                }
                None => {
                    missed = true;
                    break;
                }
            }
        }
        let first_to_run = if missed {
            last_hit.map_or(0, |i| i + 1)
        } else {
            total
        };
        // Steps before the first miss are cached (config steps included).
        record_cached(&plan.steps[..first_to_run], total, log, record);
        record.write(dir)?;

        let mut machine = MachineSpec::new(self.accel);
        machine.memory_mib = spec.memory_mib;
        machine.vcpus = spec.vcpus;
        machine.network = true;
        let staging = layers.staging_dir().map_err(io(&self.layers_dir))?;
        let top = layers.new_top(&staging);
        // Recovery keeps the finished layers there and deletes the unfinished one.
        std::fs::write(
            dir.join(ACTIVE_TOP_FILE),
            staging.to_string_lossy().as_bytes(),
        )
        .map_err(io(dir))?;
        let vm = Vm::boot(BootConfig {
            id: build_vm_id(),
            dir: dir.join("vm"),
            machine,
            assets: self.assets.clone(),
            base_disk: parent,
            base_format: format,
            top_disk: Some(top.clone()),
            disk_size_mib: spec.disk_mib,
            timeout: Duration::from_secs(180),
            die_with_parent: true,
            network: spec.network.clone(),
            confinement: self.confinement.clone(),
        })
        .await;
        let mut vm = match vm {
            Ok(vm) => vm,
            Err(e) => return Err(e.into()),
        };
        let result = self
            .execute(
                &mut vm,
                &plan.steps[first_to_run..],
                total,
                &ctx,
                &layers,
                spec,
                log,
                record,
                dir,
            )
            .await;
        match result {
            Ok(()) => {
                let template_dir = dir.join("template");
                let finished = vm.snapshot_template(&template_dir).await?;
                log.line(&format!(
                    "Template snapshot taken ({} MiB RAM)",
                    finished.manifest().machine.memory_mib
                ));
                Ok(template_dir)
            }
            Err(e) => {
                let unfinished = vm.active_disk().to_path_buf();
                let _ = vm.destroy().await;
                let _ = std::fs::remove_file(unfinished);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        vm: &mut Vm,
        steps: &[PlannedStep],
        total: usize,
        ctx: &BuildContext,
        layers: &LayerStore,
        spec: &BuildSpec,
        log: &BuildLog,
        record: &mut ImageRecord,
        dir: &Path,
    ) -> Result<(), BuildError> {
        for step in steps {
            let started = Instant::now();
            log.line(&format!("Step {}/{total} : {}", step.number, step.text));
            match &step.action {
                Action::Run {
                    argv,
                    env,
                    cwd,
                    user,
                } => run_step(vm, step, argv, env, cwd, user, log).await?,
                Action::Copy {
                    files,
                    chown,
                    chmod,
                    extract_archives,
                } => {
                    copy_step(
                        vm,
                        step,
                        ctx,
                        files,
                        chown,
                        *chmod,
                        *extract_archives,
                        spec.limits.max_total_bytes,
                    )
                    .await?
                }
                Action::Mkdir { path, .. } => {
                    let req = PutArchiveRequest {
                        dest: path.clone(),
                        chown: None,
                        chmod: None,
                        max_bytes: 1 << 20,
                    };
                    vm.agent()
                        .put_archive(req, &empty_tar())
                        .await
                        .map_err(|e| step_error(step, e))?;
                }
                Action::Config => {}
            }
            if step.action.changes_disk() {
                // Next to the current top: the build's own staging directory.
                let staging = vm
                    .active_disk()
                    .parent()
                    .unwrap_or(Path::new("/"))
                    .to_path_buf();
                let next = layers.new_top(&staging);
                let finished = vm.commit_layer(&next).await?;
                layers
                    .record(&step.key, &finished)
                    .map_err(io(&self.layers_dir))?;
            }
            record.steps.push(StepRecord {
                number: step.number,
                line: step.line,
                text: step.text.clone(),
                key: step.key.clone(),
                cached: false,
                millis: started.elapsed().as_millis() as u64,
            });
            record.write(dir)?;
        }
        start_app_and_wait(vm, spec, &record.runtime, log).await
    }
}

/// Logs and records steps reused from the cache.
fn record_cached(steps: &[PlannedStep], total: usize, log: &BuildLog, record: &mut ImageRecord) {
    for step in steps {
        log.line(&format!(
            "Step {}/{total} : {} (cached)",
            step.number, step.text
        ));
        record.steps.push(StepRecord {
            number: step.number,
            line: step.line,
            text: step.text.clone(),
            key: step.key.clone(),
            cached: true,
            millis: 0,
        });
    }
}

fn step_error(step: &PlannedStep, e: impl std::fmt::Display) -> BuildError {
    BuildError::StepError {
        step: step.number,
        text: step.text.clone(),
        message: e.to_string(),
    }
}

async fn run_step(
    vm: &Vm,
    step: &PlannedStep,
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    user: &Option<String>,
    log: &BuildLog,
) -> Result<(), BuildError> {
    let mut env = env.to_vec();
    if !env.iter().any(|(k, _)| k == "DEBIAN_FRONTEND") {
        env.push(("DEBIAN_FRONTEND".into(), "noninteractive".into()));
    }
    let req = ExecRequest {
        process: ProcessSpec {
            argv: argv.to_vec(),
            env,
            cwd: Some(cwd.to_string()),
            user: user.clone(),
        },
        stdin: false,
        timeout_ms: Some(3_600_000),
    };
    let mut exec = vm
        .agent()
        .exec_stream(req)
        .await
        .map_err(|e| step_error(step, e))?;
    let status = loop {
        match exec.next().await.map_err(|e| step_error(step, e))? {
            ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => log.output(step.number, &d),
            ExecEvent::Exited(status) => break status,
        }
    };
    log.end_output(step.number);
    if status.success() {
        return Ok(());
    }
    let tail = log.tail();
    let hint = if tail.contains("No space left on device") {
        ": the disk filled up; build a smaller image or give it a larger disk".to_string()
    } else if status.timed_out {
        ": the step ran for over an hour and was killed".to_string()
    } else {
        String::new()
    };
    Err(BuildError::StepFailed {
        step: step.number,
        text: step.text.clone(),
        code: status.code.unwrap_or(128 + status.signal.unwrap_or(0)),
        hint,
    })
}

fn empty_tar() -> Vec<u8> {
    tar::Builder::new(Vec::new())
        .into_inner()
        .unwrap_or_default()
}

fn is_archive(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.ends_with(".tar") || n.ends_with(".tar.gz") || n.ends_with(".tgz")
}

#[allow(clippy::too_many_arguments)]
async fn copy_step(
    vm: &Vm,
    step: &PlannedStep,
    ctx: &BuildContext,
    files: &[(String, String)],
    chown: &Option<String>,
    chmod: Option<u32>,
    extract_archives: bool,
    max_bytes: u64,
) -> Result<(), BuildError> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut archives = Vec::new();
    for (path, guest) in files {
        let name = guest.trim_start_matches('/');
        let entry = &ctx.entries()[path];
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let result = match entry {
            Entry::File { mode, .. } if extract_archives && is_archive(path) => {
                let file_name = path.rsplit('/').next().unwrap_or(path);
                let dest = guest
                    .strip_suffix(file_name)
                    .map(|d| d.trim_end_matches('/').to_string())
                    .filter(|d| !d.is_empty());
                archives.push((path.clone(), dest.unwrap_or_else(|| guest.clone())));
                let _ = mode;
                continue;
            }
            Entry::File { mode, size } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(*size);
                let file =
                    std::fs::File::open(ctx.root().join(path)).map_err(|e| step_error(step, e))?;
                builder.append_data(&mut header, name, file)
            }
            Entry::Dir { mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, name, std::io::empty())
            }
            Entry::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder.append_link(&mut header, name, target)
            }
        };
        result.map_err(|e| step_error(step, e))?;
    }
    let tar = builder.into_inner().map_err(|e| step_error(step, e))?;
    let req = PutArchiveRequest {
        dest: "/".into(),
        chown: chown.clone(),
        chmod,
        max_bytes,
    };
    vm.agent()
        .put_archive(req, &tar)
        .await
        .map_err(|e| step_error(step, e))?;
    for (path, dest) in archives {
        let raw = std::fs::read(ctx.root().join(&path)).map_err(|e| step_error(step, e))?;
        let tar = if path.ends_with(".tar") {
            raw
        } else {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .take(max_bytes + 1)
                .read_to_end(&mut out)
                .map_err(|e| step_error(step, format!("{path} is not a gzip archive: {e}")))?;
            out
        };
        let req = PutArchiveRequest {
            dest,
            chown: chown.clone(),
            chmod: None,
            max_bytes,
        };
        vm.agent()
            .put_archive(req, &tar)
            .await
            .map_err(|e| step_error(step, e))?;
    }
    Ok(())
}

async fn start_app_and_wait(
    vm: &Vm,
    spec: &BuildSpec,
    rt: &RuntimeConfig,
    log: &BuildLog,
) -> Result<(), BuildError> {
    let argv = rt.app_argv();
    if argv.is_empty() {
        log.line("No CMD or ENTRYPOINT: the image has no app to start");
        return Ok(());
    }
    log.line(&format!("Starting the app: {argv:?}"));
    let app = ProcessSpec {
        argv,
        env: rt.env.clone(),
        cwd: Some(rt.workdir.clone()),
        user: rt.user.clone(),
    };
    vm.agent()
        .start_app(app)
        .await
        .map_err(|e| BuildError::AppExited {
            status: e.to_string(),
        })?;
    if !spec.wait_ready {
        return Ok(());
    }
    log.line(&format!(
        "Waiting for GET /ready on port {} (timeout {:?})",
        spec.hook_port, spec.ready_timeout
    ));
    let deadline = Instant::now() + spec.ready_timeout;
    let mut last;
    loop {
        let state = vm
            .agent()
            .app_status()
            .await
            .map_err(|e| BuildError::AppExited {
                status: e.to_string(),
            })?;
        if !state.running {
            let logs = vm.agent().app_logs(4096).await.unwrap_or_default();
            for line in String::from_utf8_lossy(&logs).lines() {
                log.line(&format!("[app] {line}"));
            }
            let status = match state.exit {
                Some(e) if e.code.is_some() => format!("exit code {}", e.code.unwrap_or_default()),
                Some(e) => format!("killed by signal {}", e.signal.unwrap_or_default()),
                None => "unknown status".into(),
            };
            return Err(BuildError::AppExited { status });
        }
        match vm.agent().http(hook_get(spec.hook_port, "/ready")).await {
            Ok(r) if r.status == 200 => break,
            Ok(r) => last = format!(" (last answer: HTTP {})", r.status),
            Err(kiln_vmm::AgentError::Guest(e)) if e.kind != ErrorKind::InvalidRequest => {
                last = format!(" (last error: {})", e.message)
            }
            Err(e) => {
                return Err(BuildError::AppExited {
                    status: e.to_string(),
                })
            }
        }
        if Instant::now() > deadline {
            return Err(BuildError::ReadyTimeout {
                port: spec.hook_port,
                timeout: spec.ready_timeout,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    log.line("/ready answered 200");
    if spec.validate {
        let r = vm.agent().http(hook_get(spec.hook_port, "/validate")).await;
        match r {
            Ok(r) if r.status == 200 => log.line("/validate answered 200"),
            Ok(r) => {
                return Err(BuildError::ValidateFailed {
                    port: spec.hook_port,
                    status: format!("HTTP {}", r.status),
                })
            }
            Err(e) => {
                return Err(BuildError::ValidateFailed {
                    port: spec.hook_port,
                    status: e.to_string(),
                })
            }
        }
    }
    info!("app ready");
    Ok(())
}

pub fn hook_get(port: u16, path: &str) -> HttpRequest {
    HttpRequest {
        port,
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        body: ByteBuf::new(),
        timeout_ms: 5000,
        max_response_bytes: 64 * 1024,
    }
}
