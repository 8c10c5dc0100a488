//! The machine shape and the QEMU command line. Nothing else in kiln builds QEMU arguments.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use kiln_types::Accel;
use serde::{Deserialize, Serialize};

use crate::assets::GuestAssets;

/// A named, fixed CPU model so a snapshot restores on another host. Nehalem offers
/// x86-64-v2 (SSE4.2, POPCNT), which current Python wheels need; `-v1` avoids the
/// spec-ctrl feature TCG lacks.
pub const DEFAULT_CPU_MODEL: &str = "Nehalem-v1";

/// The kernel command line every guest boots with.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 pci=off quiet";

/// Bump when the argument layout below changes in a way that breaks restoring older snapshots.
pub const MACHINE_LAYOUT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub memory_mib: u32,
    pub vcpus: u8,
    pub cpu_model: String,
    pub accel: Accel,
    /// A virtio-net device with QEMU user-mode networking.
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
}

/// Builds the full argument list. `incoming` starts QEMU paused, waiting for a migration
/// stream (launch and resume).
pub fn qemu_args(
    spec: &MachineSpec,
    assets: &GuestAssets,
    paths: &VmPaths,
    memory: &MemoryBacking,
    incoming: bool,
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
    push(&["-accel", spec.accel.as_str()]);
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
        MemoryBacking::PrivateFile(p) => format!(
            "memory-backend-file,id=mem,size={mem},mem-path={},share=off",
            p.display()
        ),
        MemoryBacking::Anonymous => format!("memory-backend-ram,id=mem,size={mem}"),
    };
    push(&["-object", &backend]);
    push(&["-kernel", &assets.kernel.display().to_string()]);
    push(&["-initrd", &assets.initramfs.display().to_string()]);
    push(&["-append", KERNEL_CMDLINE]);
    push(&[
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
    ]);
    let drive = format!(
        "file={},if=none,id=root,format=qcow2,cache=writeback,discard=unmap",
        paths.disk().display()
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
        push(&[
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-device,netdev=net0",
        ]);
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", paths.qmp_socket().display()),
    ]);
    push(&["-pidfile", &paths.pid_file().display().to_string()]);
    // Deny what QEMU never needs; `spawn` stays allowed for `exec:` migration.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny",
    ]);
    if incoming {
        push(&["-incoming", "defer", "-S"]);
    }
    args
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
            true,
        ));
        assert!(args.contains("mem-path=/t/memory.ram,share=off"), "{args}");
        assert!(args.contains("-incoming defer -S"));
        assert!(args.contains("-cpu Nehalem-v1"));
        assert!(args.contains("-accel tcg"));
        assert!(!args.contains("virtio-net"), "network is off by default");
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
            false,
        ));
        assert!(args.contains("share=on") && args.contains("virtio-net-device"));
        assert!(!args.contains("-incoming"));
    }
}
