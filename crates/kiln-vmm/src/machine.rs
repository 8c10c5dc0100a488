//! The machine shape and the QEMU command line. Nothing else in kiln builds QEMU arguments.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use kiln_types::Accel;
use serde::{Deserialize, Serialize};

use crate::assets::GuestAssets;

/// A named, fixed CPU model so a snapshot restores on another host. Nehalem offers
/// x86-64-v2 (SSE4.2, POPCNT), which current Python wheels need; `-v1` avoids the
/// spec-ctrl feature TCG lacks.
pub const DEFAULT_CPU_MODEL: &str = "Nehalem-v1";

/// The kernel command line every guest boots with (see [`kernel_cmdline`] for additions).
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 pci=off quiet";

/// The command line for a cold boot with `accel`.
///
/// Under TCG the guest's early TSC calibration against the emulated PIT fails now and then
/// (the timing of emulation is uneven), and the kernel then hangs waiting for its first
/// tick. Measured here: about one boot in four hung without a preset TSC rate, none of 24
/// with it. Under TCG the guest TSC runs at the host TSC rate, so kiln passes that rate.
/// Restores reuse the command line recorded in the snapshot manifest.
pub fn kernel_cmdline(accel: Accel) -> String {
    match accel {
        Accel::Tcg => format!("{KERNEL_CMDLINE} tsc_early_khz={}", host_tsc_khz()),
        Accel::Kvm => KERNEL_CMDLINE.to_string(),
    }
}

/// The host TSC frequency in kHz, measured once against the monotonic clock.
pub fn host_tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        // SAFETY: RDTSC only reads the time-stamp counter; it has no memory effects.
        let read = || unsafe { core::arch::x86_64::_rdtsc() };
        let (t0, c0) = (std::time::Instant::now(), read());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (c1, elapsed) = (read(), t0.elapsed());
        let khz = (c1.wrapping_sub(c0) as f64 / elapsed.as_secs_f64() / 1000.0) as u64;
        // Round to the MHz: the measurement jitters in the last digits.
        (khz + 500) / 1000 * 1000
    })
}

/// The TCG translation cache in MiB (`-accel tcg,tb-size=`); QEMU's default is 1024.
pub const TCG_TB_SIZE_MIB: u32 = 128;

/// Bump when the argument layout below changes in a way that breaks restoring older snapshots.
/// 2: QEMU 10, qboot firmware, `file:` migration.
pub const MACHINE_LAYOUT_VERSION: u32 = 2;

/// QEMU's own qboot firmware (package qemu-system-data). QEMU 10's default microvm firmware,
/// SeaBIOS' `bios-microvm.bin`, prints nothing and hangs with Debian's kernel (measured);
/// qboot reaches `/init` in about 8 s under TCG. `KILN_QEMU_FIRMWARE` overrides it.
pub const DEFAULT_FIRMWARE: &str = "/usr/share/qemu/qboot.rom";

/// The firmware file QEMU boots (`-bios`).
pub fn firmware_path() -> PathBuf {
    std::env::var_os("KILN_QEMU_FIRMWARE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_FIRMWARE))
}

/// The arguments a restore depends on: the machine, accelerator, CPU model, vCPUs, RAM and
/// every device in order, and the firmware (its file name and size: its ROM is part of the
/// migrated state). Paths, sockets and backends are left out: they differ from VM to VM and
/// a restore does not care. A snapshot records this list; a restore compares it with the
/// list it would use now, so any change to the command line that matters is caught.
pub fn restore_signature(spec: &MachineSpec) -> Vec<String> {
    let paths = VmPaths::new(Path::new("/"));
    let assets = GuestAssets {
        dir: PathBuf::new(),
        kernel: PathBuf::new(),
        initramfs: PathBuf::new(),
        kernel_version: String::new(),
        initramfs_key: String::new(),
    };
    let args = qemu_args(
        spec,
        &assets,
        &paths,
        &MemoryBacking::Anonymous,
        Path::new("/"),
        "",
        None,
        None,
    );
    let mut out = Vec::new();
    for pair in args.windows(2) {
        let (flag, value) = (pair[0].to_string_lossy(), pair[1].to_string_lossy());
        match flag.as_ref() {
            "-machine" | "-cpu" | "-smp" | "-m" | "-device" => out.push(format!("{flag} {value}")),
            // Accelerator options (the translation cache size) are not migrated state.
            "-accel" => out.push(format!("-accel {}", value.split(',').next().unwrap_or(""))),
            "-bios" => {
                let path = Path::new(value.as_ref());
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                out.push(format!("-bios {name} ({size} bytes)"));
            }
            _ => {}
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub memory_mib: u32,
    pub vcpus: u8,
    pub cpu_model: String,
    pub accel: Accel,
    /// A virtio-net device; its backend is chosen at each start (see `network`).
    pub network: bool,
}

impl MachineSpec {
    pub fn new(accel: Accel) -> Self {
        MachineSpec {
            memory_mib: 512,
            vcpus: 1,
            cpu_model: DEFAULT_CPU_MODEL.to_string(),
            accel,
            network: false,
        }
    }
}

/// Where a VM's RAM lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MemoryBacking {
    /// A file mapped shared: what a template snapshot needs (`x-ignore-shared`).
    SharedFile(PathBuf),
    /// A template's RAM file mapped private: copy-on-write clones.
    PrivateFile(PathBuf),
    /// Anonymous memory (resumed VMs, whose RAM comes from the migration stream).
    Anonymous,
}

/// The files of one running VM, all inside its directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(dir: &Path) -> Self {
        VmPaths {
            dir: dir.to_path_buf(),
        }
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory.ram")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// QEMU serves the serial console here; kiln copies it into [`VmPaths::console_log`]
    /// and connects again after a restart.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// The network backend's host pid (for operators, tests and start-up recovery).
    pub fn net_pid_file(&self) -> PathBuf {
        self.dir.join("net.pid")
    }
}

/// Builds the full argument list. `incoming` starts QEMU paused, waiting for a migration
/// stream (launch and resume); `netdev` is the NIC's backend when the machine has one.
// Each argument is one independent part of the command line; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn qemu_args(
    spec: &MachineSpec,
    assets: &GuestAssets,
    paths: &VmPaths,
    memory: &MemoryBacking,
    disk: &Path,
    kernel_cmdline: &str,
    incoming: Option<StateFormat>,
    netdev: Option<&OsStr>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
    let mem = format!("{}M", spec.memory_mib);
    push(&[
        "-name",
        "kiln-guest",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&[
        "-machine",
        "microvm,x-option-roms=off,rtc=on,isa-serial=on,memory-backend=mem",
    ]);
    match spec.accel {
        // The translation cache is QEMU's largest allocation under TCG (1 GiB by default):
        // bounded so a jail's memory limit can be RAM plus a fixed overhead.
        Accel::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_TB_SIZE_MIB}")]),
        Accel::Kvm => push(&["-accel", spec.accel.as_str()]),
    }
    push(&[
        "-cpu",
        &spec.cpu_model,
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &mem,
    ]);
    let backend = match memory {
        MemoryBacking::SharedFile(p) => format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
            p.display()
        ),
        // Opened read-only (no VM may write a template), mapped private and writable.
        MemoryBacking::PrivateFile(p) => format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},share=off,readonly=on,rom=off",
            p.display()
        ),
        MemoryBacking::Anonymous => format!("memory-backend-ram,id=mem,size={mem}"),
    };
    push(&["-object", &backend]);
    push(&["-bios", &firmware_path().display().to_string()]);
    push(&["-kernel", &assets.kernel.display().to_string()]);
    push(&["-initrd", &assets.initramfs.display().to_string()]);
    push(&["-append", kernel_cmdline]);
    // A socket, not QEMU's standard output: the guest must outlive the process that reads
    // its console. QEMU waits for that reader before it starts, so no byte is lost at boot.
    let console = format!(
        "socket,id=console,path={},server=on,wait=on",
        paths.console_socket().display()
    );
    push(&["-chardev", &console, "-serial", "chardev:console"]);
    let drive = format!(
        "file={},if=none,id=root,format=qcow2,cache=writeback,discard=unmap",
        disk.display()
    );
    push(&["-drive", &drive, "-device", "virtio-blk-device,drive=root"]);
    push(&["-device", "virtio-serial-device"]);
    let agent = format!(
        "socket,id=agent,path={},server=on,wait=off",
        paths.agent_socket().display()
    );
    push(&["-chardev", &agent]);
    push(&[
        "-device",
        &format!(
            "virtserialport,chardev=agent,name={}",
            kiln_proto::AGENT_PORT_NAME
        ),
    ]);
    if spec.network {
        // Without a backend the NIC gets QEMU's user networking restricted to nothing.
        let netdev = netdev.unwrap_or(OsStr::new("user,id=net0,restrict=on"));
        push(&[
            "-netdev",
            &netdev.to_string_lossy(),
            "-device",
            "virtio-net-device,netdev=net0",
        ]);
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", paths.qmp_socket().display()),
    ]);
    // Deny what QEMU never needs, spawning included: snapshots use `file:` migration.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    match incoming {
        Some(StateFormat::Migration) => push(&["-incoming", "defer", "-S"]),
        // kiln's own device-state files carry no configuration section (see `memdiff`).
        Some(StateFormat::DevicesOnly) => push(&[
            "-global",
            "migration.send-configuration=off",
            "-incoming",
            "defer",
            "-S",
        ]),
        None => {}
    }
    args
}

/// What a state file to load at start holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFormat {
    /// A migration stream (QEMU's `migrate`): devices, and RAM unless it was shared.
    Migration,
    /// Device state only (QEMU's `xen-save-devices-state`); the RAM is put in place first.
    DevicesOnly,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assets() -> GuestAssets {
        GuestAssets {
            dir: "/a".into(),
            kernel: "/a/kernel/vmlinuz".into(),
            initramfs: "/a/initramfs.cpio".into(),
            kernel_version: "6.1".into(),
            initramfs_key: "k".into(),
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn clone_maps_the_template_ram_privately_and_waits_for_state() {
        let spec = MachineSpec::new(Accel::Tcg);
        let args = joined(&qemu_args(
            &spec,
            &assets(),
            &VmPaths::new(Path::new("/vm")),
            &MemoryBacking::PrivateFile("/t/memory.ram".into()),
            Path::new("/vm/disk.qcow2"),
            "console=ttyS0 tsc_early_khz=1000",
            Some(StateFormat::Migration),
            None,
        ));
        assert!(
            args.contains("mem-path=/t/memory.ram,share=off,readonly=on,rom=off"),
            "{args}"
        );
        assert!(args.contains("-incoming defer -S"));
        assert!(args.contains("-cpu Nehalem-v1"));
        assert!(args.contains("-accel tcg"));
        assert!(args.contains("-append console=ttyS0 tsc_early_khz=1000"));
        assert!(!args.contains("virtio-net"), "network is off by default");
    }

    #[test]
    fn tcg_boots_with_the_host_tsc_rate() {
        let tcg = kernel_cmdline(Accel::Tcg);
        assert!(tcg.starts_with(KERNEL_CMDLINE));
        let khz: u64 = tcg
            .rsplit("tsc_early_khz=")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(khz >= 100_000, "implausible TSC rate {khz} kHz");
        assert_eq!(kernel_cmdline(Accel::Kvm), KERNEL_CMDLINE);
    }

    #[test]
    fn network_and_shared_memory_when_asked() {
        let mut spec = MachineSpec::new(Accel::Kvm);
        spec.network = true;
        let args = joined(&qemu_args(
            &spec,
            &assets(),
            &VmPaths::new(Path::new("/vm")),
            &MemoryBacking::SharedFile("/vm/memory.ram".into()),
            Path::new("/vm/disk.qcow2"),
            KERNEL_CMDLINE,
            None,
            Some(OsStr::new(
                "stream,id=net0,server=off,addr.type=fd,addr.str=3",
            )),
        ));
        assert!(args.contains("share=on") && args.contains("virtio-net-device,netdev=net0"));
        assert!(args.contains("-netdev stream,id=net0,server=off,addr.type=fd,addr.str=3"));
        assert!(!args.contains("-incoming"));
    }
}
