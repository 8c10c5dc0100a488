//! How a VM's QEMU is confined: in its own kiln jail (the default, see `kiln-jail`), or, for
//! development and side-by-side benchmarks only, as the calling user in the host's
//! namespaces (`--no-jail`). This module turns a VM's files into the jail's spec; nothing
//! else in kiln-vmm knows what a jail holds.

use std::path::{Path, PathBuf};

use kiln_jail::{JailSpec, Limits};

use crate::assets::GuestAssets;
use crate::machine::{firmware_path, MachineSpec, MemoryBacking, VmPaths};

/// QEMU's own memory beyond guest RAM that a jail allows by default: its code, device
/// state, I/O buffers and (under TCG) the translation cache, bounded by `tb-size`.
pub const QEMU_OVERHEAD_MIB: u64 = 384;
/// Threads QEMU may have (vCPUs, I/O workers, RCU) plus the jailer waiting on it.
pub const PIDS_LIMIT: u64 = 256;

/// Where a VM's QEMU runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Confinement {
    /// Its own jail (uid, namespaces, root, cgroups).
    Jailed(JailLimits),
    /// The calling user's privileges in the host's namespaces: development only.
    Unjailed,
}

impl Default for Confinement {
    fn default() -> Self {
        Confinement::Jailed(JailLimits::default())
    }
}

impl Confinement {
    /// Jailed unless `no_jail` (a binary's `--no-jail`).
    pub fn from_no_jail(no_jail: bool) -> Confinement {
        if no_jail {
            tracing::warn!(
                "--no-jail: QEMU runs with this process's privileges in the host's namespaces; \
                 a guest that escapes QEMU owns this host. Development only."
            );
            Confinement::Unjailed
        } else {
            Confinement::default()
        }
    }

    pub fn is_jailed(&self) -> bool {
        matches!(self, Confinement::Jailed(_))
    }
}

/// Limits beyond the defaults a jail derives from the machine.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JailLimits {
    /// The whole memory limit (guest RAM + QEMU), instead of RAM + [`QEMU_OVERHEAD_MIB`].
    pub memory_mib: Option<u64>,
    /// QEMU's allowance beyond guest RAM, instead of [`QEMU_OVERHEAD_MIB`].
    pub overhead_mib: Option<u64>,
    /// CPUs the quota allows, instead of the machine's vCPUs.
    pub cpus: Option<f64>,
    /// The uids and cgroup root of this kilnd's jails.
    pub partition: kiln_jail::Partition,
}

impl Confinement {
    /// The partition jails use (the whole range and `kiln` when unjailed: nothing uses it).
    pub fn partition(&self) -> kiln_jail::Partition {
        match self {
            Confinement::Jailed(l) => l.partition.clone(),
            Confinement::Unjailed => kiln_jail::Partition::default(),
        }
    }
}

/// Every file one start of QEMU reads or writes.
pub(crate) struct VmFiles<'a> {
    pub paths: &'a VmPaths,
    pub machine: &'a MachineSpec,
    pub assets: &'a GuestAssets,
    pub memory: &'a MemoryBacking,
    /// The writable top of the disk chain.
    pub disk: &'a Path,
    /// The first file under `disk`, as kiln (not the overlay's header) knows it.
    pub disk_base: Option<&'a Path>,
    /// A state file to load, if any.
    pub incoming: Option<&'a Path>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("qemu-system-x86_64 is not on PATH (scripts/setup.sh installs it)")]
    NoQemu,
    #[error("the disk chain of this VM cannot be put in its jail")]
    Chain(#[source] std::io::Error),
}

/// The jail for one start of QEMU (its arguments are filled in by `QemuProcess::spawn`).
pub(crate) fn jail_spec(
    files: &VmFiles<'_>,
    limits: &JailLimits,
    die_with_parent: bool,
) -> Result<JailSpec, ConfineError> {
    let mut owned_dirs = vec![files.paths.dir.clone()];
    // An image build's top lives in its own staging directory outside the VM's.
    if let Some(parent) = files.disk.parent() {
        if !files.disk.starts_with(&files.paths.dir) {
            owned_dirs.push(parent.to_path_buf());
        }
    }
    let mut read_only = vec![
        files.assets.kernel.clone(),
        files.assets.initramfs.clone(),
        firmware_path(),
    ];
    if let MemoryBacking::PrivateFile(ram) = files.memory {
        read_only.push(ram.clone());
    }
    if let Some(state) = files.incoming {
        if !state.starts_with(&files.paths.dir) {
            read_only.push(state.to_path_buf());
        }
    }
    if let Some(base) = files.disk_base {
        let chain = crate::disk::trusted_chain(base).map_err(ConfineError::Chain)?;
        read_only.extend(
            chain
                .into_iter()
                .filter(|f| !owned_dirs.iter().any(|d| f.starts_with(d))),
        );
    }
    read_only.dedup();
    let devices = match files.machine.accel {
        kiln_types::Accel::Kvm => vec![PathBuf::from("/dev/kvm")],
        kiln_types::Accel::Tcg => Vec::new(),
    };
    let ram = u64::from(files.machine.memory_mib);
    let overhead = limits.overhead_mib.unwrap_or(QEMU_OVERHEAD_MIB);
    let memory_mib = limits.memory_mib.unwrap_or(ram + overhead);
    let cpus = limits.cpus.unwrap_or(f64::from(files.machine.vcpus));
    Ok(JailSpec {
        program: qemu_binary()?,
        args: Vec::new(),
        owned_dirs,
        read_only,
        devices,
        limits: Limits::new(memory_mib << 20, PIDS_LIMIT, cpus),
        die_with_parent,
        host_network: false,
        // Set from the descriptors QEMU is given (its network link).
        keep_fds: 0,
        partition: limits.partition.clone(),
    })
}

/// `qemu-system-x86_64` as found on PATH (the jail execs it by absolute path).
pub fn qemu_binary() -> Result<PathBuf, ConfineError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
        .ok_or(ConfineError::NoQemu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::Accel;

    #[test]
    fn a_clone_jail_holds_its_dir_rw_and_the_template_files_ro() {
        let paths = VmPaths::new(Path::new("/k/run/a"));
        let machine = MachineSpec::new(Accel::Tcg);
        let assets = GuestAssets {
            dir: "/k/run/a/boot".into(),
            kernel: "/k/run/a/boot/kernel/vmlinux".into(),
            initramfs: "/k/run/a/boot/initramfs.cpio".into(),
            kernel_version: "6.1".into(),
            initramfs_key: "k".into(),
        };
        let memory = MemoryBacking::PrivateFile("/k/templates/t/memory.ram".into());
        let files = VmFiles {
            paths: &paths,
            machine: &machine,
            assets: &assets,
            memory: &memory,
            disk: &paths.disk(),
            disk_base: None,
            incoming: Some(Path::new("/k/templates/t/device.state")),
        };
        let Ok(spec) = jail_spec(&files, &JailLimits::default(), true) else {
            return; // no QEMU on this host: nothing to say about its jail
        };
        assert_eq!(spec.owned_dirs, vec![PathBuf::from("/k/run/a")]);
        for f in ["/k/templates/t/memory.ram", "/k/templates/t/device.state"] {
            assert!(spec.read_only.contains(&PathBuf::from(f)), "{f}");
        }
        assert_eq!(spec.limits.memory_bytes, (512 + QEMU_OVERHEAD_MIB) << 20);
        assert!(spec.devices.is_empty(), "TCG needs no /dev/kvm");
        spec.validate().unwrap();
    }
}
