//! The end-to-end fixture: real guests under QEMU, in throw-away directories.
//!
//! ```ignore
//! let vm = TestVm::boot().await;
//! assert_eq!(vm.sh("echo hi").await.unwrap().stdout_text(), "hi\n");
//! vm.destroy().await;
//! ```
//! Guest assets come from `scripts/setup.sh` (the test command runs it first).

// A test fixture crate: a failed set-up step panics the test that asked for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_types::VmId;
use kiln_vmm::snapshot::LaunchConfig;
use kiln_vmm::{BootConfig, GuestAssets, MachineSpec, SuspendedVm, Template, Vm};
use tempfile::TempDir;

pub mod netns;

/// Generous under TCG, where a cold boot takes ~4.5 s on an idle core.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Logs to the test's output (shown on failure), once per process.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
}

/// QEMU processes whose command line names `home` (a test kilnd's guests).
pub fn guests_of(home: &Path) -> Vec<u32> {
    let home = home.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            // QEMU itself, not the jailer whose spec names it.
            let program = cmd.split('\0').next().unwrap_or_default();
            let name = Path::new(program).file_name().unwrap_or_default();
            name.to_string_lossy().starts_with("qemu-system") && cmd.contains(&home)
        })
        .collect()
}

/// Kills a test kilnd's guests once the kilnd is gone: they outlive it by design, and a
/// test's must not outlive the test. Their network backends end with their links.
pub fn kill_guests_of(home: &Path) {
    for pid in guests_of(home) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

pub fn assets() -> GuestAssets {
    GuestAssets::locate().unwrap_or_else(|e| panic!("{e}"))
}

pub fn machine() -> MachineSpec {
    let accel = kiln_vmm::accel::detect()
        .expect("KILN_ACCEL is valid")
        .accel;
    MachineSpec::new(accel)
}

/// A scratch directory for VM and template directories, removed at the end of the test.
pub fn scratch() -> TempDir {
    let base = std::env::var_os("KILN_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("test scratch base");
    tempfile::Builder::new()
        .prefix("kiln-test-")
        .tempdir_in(base)
        .expect("scratch dir")
}

pub fn id(name: &str) -> VmId {
    VmId::new(name).expect("valid test id")
}

/// A booted or launched VM that is destroyed (QEMU killed, files removed) when dropped.
pub struct TestVm {
    vm: Option<Vm>,
    _scratch: Option<TempDir>,
}

impl TestVm {
    /// Cold-boots the busybox base.
    pub async fn boot() -> TestVm {
        Self::boot_with(machine()).await
    }

    pub async fn boot_with(machine: MachineSpec) -> TestVm {
        Self::boot_inner(machine, kiln_vmm::NetworkAttachment::closed()).await
    }

    /// Boots with a NIC leading to `network`.
    pub async fn boot_with_network(
        mut machine: MachineSpec,
        network: kiln_vmm::NetworkAttachment,
    ) -> TestVm {
        machine.network = true;
        Self::boot_inner(machine, network).await
    }

    async fn boot_inner(machine: MachineSpec, network: kiln_vmm::NetworkAttachment) -> TestVm {
        init_logging();
        let scratch = scratch();
        let mut cfg = boot_config(scratch.path(), "boot", machine);
        cfg.network = network;
        let vm = Vm::boot(cfg).await.expect("cold boot");
        TestVm {
            vm: Some(vm),
            _scratch: Some(scratch),
        }
    }

    pub fn wrap(vm: Vm) -> TestVm {
        TestVm {
            vm: Some(vm),
            _scratch: None,
        }
    }

    pub fn into_inner(mut self) -> Vm {
        self.vm.take().expect("vm present")
    }

    pub async fn destroy(mut self) {
        if let Some(vm) = self.vm.take() {
            vm.destroy().await.expect("destroy");
        }
    }

    /// Runs `sh -c script`, asserting that it succeeds, and returns stdout.
    pub async fn ok(&self, script: &str) -> String {
        let out = self
            .sh(script)
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"));
        assert!(
            out.status.success(),
            "{script} failed: {:?}\nstderr: {}",
            out.status,
            out.stderr_text()
        );
        out.stdout_text()
    }
}

impl Deref for TestVm {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        self.vm.as_ref().expect("vm present")
    }
}

impl std::ops::DerefMut for TestVm {
    fn deref_mut(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("vm present")
    }
}

pub fn boot_config(dir: &Path, name: &str, machine: MachineSpec) -> BootConfig {
    let assets = assets();
    BootConfig {
        id: id(name),
        dir: dir.join(name),
        base_disk: assets
            .base_disk("busybox")
            .expect("busybox base (run scripts/setup.sh)"),
        base_format: kiln_vmm::disk::BackingFormat::Raw,
        top_disk: None,
        disk_size_mib: None,
        machine,
        assets,
        timeout: BOOT_TIMEOUT,
        die_with_parent: true,
        network: kiln_vmm::NetworkAttachment::closed(),
        confinement: kiln_vmm::Confinement::default(),
    }
}

/// A template taken from a freshly booted VM after `prepare` ran in it.
pub struct TestTemplate {
    pub template: Template,
    pub scratch: TempDir,
}

impl TestTemplate {
    pub async fn build(prepare: &str) -> TestTemplate {
        Self::build_on(machine(), prepare).await
    }

    /// [`TestTemplate::build`] on `machine` (e.g. with a NIC: its clones lead to a closed
    /// egress policy).
    pub async fn build_on(machine: MachineSpec, prepare: &str) -> TestTemplate {
        init_logging();
        let scratch = scratch();
        let vm = TestVm::wrap(
            Vm::boot(boot_config(scratch.path(), "builder", machine))
                .await
                .expect("cold boot"),
        );
        if !prepare.is_empty() {
            vm.ok(prepare).await;
        }
        let template = vm
            .into_inner()
            .snapshot_template(&scratch.path().join("template"))
            .await
            .expect("template");
        TestTemplate { template, scratch }
    }

    pub fn launch_config(&self, name: &str) -> LaunchConfig {
        LaunchConfig {
            id: id(name),
            dir: self.scratch.path().join(name),
            machine: None,
            assets: assets(),
            timeout: BOOT_TIMEOUT,
            die_with_parent: true,
            network: kiln_vmm::NetworkAttachment::closed(),
            confinement: kiln_vmm::Confinement::default(),
        }
    }

    pub async fn launch(&self, name: &str) -> TestVm {
        TestVm::wrap(
            self.template
                .launch(self.launch_config(name))
                .await
                .expect("launch from template"),
        )
    }
}

/// Launches a clone of `template` into `dir/name`.
pub async fn launch_from(template: &Template, dir: &Path, name: &str) -> TestVm {
    let cfg = LaunchConfig {
        id: id(name),
        dir: dir.join(name),
        machine: None,
        assets: assets(),
        timeout: BOOT_TIMEOUT,
        die_with_parent: true,
        network: kiln_vmm::NetworkAttachment::closed(),
        confinement: kiln_vmm::Confinement::default(),
    };
    TestVm::wrap(template.launch(cfg).await.expect("launch from template"))
}

/// Suspends and resumes, asserting both succeed.
pub async fn suspend_resume(vm: TestVm) -> TestVm {
    let suspended: SuspendedVm = vm.into_inner().suspend().await.expect("suspend");
    assert!(suspended.dir().join("suspended").is_dir());
    TestVm::wrap(suspended.resume(BOOT_TIMEOUT).await.expect("resume"))
}

/// An image builder working in a throw-away directory.
pub struct TestBuilder {
    pub builder: kiln_image::Builder,
    pub scratch: TempDir,
}

impl TestBuilder {
    pub fn new() -> TestBuilder {
        init_logging();
        let scratch = scratch();
        let builder = kiln_image::Builder {
            images_dir: scratch.path().join("images"),
            layers_dir: scratch.path().join("layers"),
            assets: assets(),
            accel: machine().accel,
            confinement: kiln_vmm::Confinement::default(),
        };
        TestBuilder { builder, scratch }
    }

    /// Writes a build context directory from (path, contents) pairs.
    pub fn context(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.scratch.path().join("contexts").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        for (path, contents) in files {
            let full = dir.join(path);
            std::fs::create_dir_all(full.parent().expect("parent")).expect("context dir");
            std::fs::write(&full, contents).expect("context file");
            if path.ends_with(".sh") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod");
            }
        }
        dir
    }

    /// Layer files on disk that no cache entry points to (there should be none).
    pub fn stray_layers(&self) -> Vec<String> {
        let dir = self.builder.layers_dir.join("index");
        let referenced: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect();
        std::fs::read_dir(&self.builder.layers_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.ends_with(".qcow2") && !referenced.contains(n))
            .collect()
    }
}

impl Default for TestBuilder {
    fn default() -> Self {
        Self::new()
    }
}
