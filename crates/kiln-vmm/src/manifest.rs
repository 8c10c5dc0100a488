//! Snapshot manifests: what a snapshot was taken with, checked before every restore.

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assets::GuestAssets;
use crate::machine::{restore_signature, MachineSpec, KERNEL_CMDLINE, MACHINE_LAYOUT_VERSION};

/// 2: QEMU's upstream version (not Debian's build), the machine's restore signature.
pub const MANIFEST_FORMAT: u32 = 2;
pub const MANIFEST_FILE: &str = "manifest.json";
/// Manifests are small; a larger file is refused unread.
const MANIFEST_MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Device state only; RAM is the shared file clones map copy-on-write.
    Template,
    /// Full RAM + device state of one suspended VM.
    Suspended,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub kind: SnapshotKind,
    pub vm_id: String,
    pub created_unix: u64,
    pub machine: MachineSpec,
    pub machine_layout: u32,
    pub kernel_cmdline: String,
    pub kernel_version: String,
    pub initramfs_key: String,
    /// QEMU's upstream version (`10.0.2`): what a restore depends on. Format 1 held the
    /// whole `--version` line; its upstream part is compared.
    pub qemu_version: String,
    /// The whole `--version` line (Debian's package revision included), for people.
    #[serde(default)]
    pub qemu_build: String,
    /// [`restore_signature`] of the machine when the snapshot was taken.
    #[serde(default)]
    pub machine_args: Vec<String>,
    pub state_sha256: String,
    pub state_bytes: u64,
    /// Size of the RAM file (templates only).
    pub memory_bytes: Option<u64>,
    /// The first file under the snapshot's own disk overlay, as kiln recorded it (a jail
    /// reads that chain; the overlay's own header is the guest's QEMU's to write).
    #[serde(default)]
    pub disk_backing: Option<String>,
    /// A suspend of a template-launched guest: its RAM is the template's file plus this diff
    /// (`memory.diff` beside the manifest), and the state file holds devices only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_diff: Option<crate::memdiff::DiffSummary>,
    /// The state file holds device state only (QEMU's `xen-save-devices-state`), no
    /// migration stream: set with `memory_diff`, and for templates saved from a running guest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub devices_only_state: bool,
}

/// What this host offers, compared against a manifest.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// Upstream version, e.g. `10.0.2`.
    pub qemu_version: String,
    pub kernel_version: String,
    pub initramfs_key: String,
}

impl HostFacts {
    pub fn new(assets: &GuestAssets) -> HostFacts {
        HostFacts {
            qemu_version: upstream_version(qemu_version()).to_string(),
            kernel_version: assets.kernel_version.clone(),
            initramfs_key: assets.initramfs_key.clone(),
        }
    }
}

/// The upstream version in a `--version` line: `QEMU emulator version 10.0.2 (Debian
/// 1:10.0.2+ds-2+deb13u1~bpo12+1)` → `10.0.2`. A backports security update changes only the
/// part in parentheses, which never decides whether a snapshot restores. Text without a
/// version comes back as it is.
pub fn upstream_version(line: &str) -> &str {
    let after = line
        .split_once("version ")
        .map_or(line, |(_, rest)| rest)
        .trim_start();
    let end = after
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(after.len());
    if end == 0 {
        line
    } else {
        &after[..end]
    }
}

/// `qemu-system-x86_64 --version`'s first line, read once.
pub fn qemu_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".to_string())
    })
}

/// Everything in a manifest that a restore cannot honour, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Snapshot cannot be restored here: {}", .differences.join("; "))]
pub struct ManifestMismatch {
    pub differences: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("Reading manifest {path} failed")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Manifest {path} is over {MANIFEST_MAX_BYTES} bytes")]
    TooLarge { path: String },
    #[error("Manifest {path} is not valid")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Mismatch(#[from] ManifestMismatch),
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let shown = path.display().to_string();
        let meta = std::fs::metadata(&path).map_err(|source| ManifestError::Read {
            path: shown.clone(),
            source,
        })?;
        if meta.len() > MANIFEST_MAX_BYTES {
            return Err(ManifestError::TooLarge { path: shown });
        }
        let text = std::fs::read(&path).map_err(|source| ManifestError::Read {
            path: shown.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| ManifestError::Parse {
            path: shown,
            source,
        })
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        // The directory may have been a jailed QEMU's: whatever it left at the temporary
        // name (a symlink, say) is removed, and the file is created anew, never followed.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(tmp, dir.join(MANIFEST_FILE))
    }

    /// Compares with this host and, when given, the machine the caller asks for.
    pub fn check(
        &self,
        host: &HostFacts,
        requested: Option<&MachineSpec>,
    ) -> Result<(), ManifestMismatch> {
        let mut differences = Vec::new();
        let mut differ =
            |what: &str, snapshot: &dyn std::fmt::Display, here: &dyn std::fmt::Display| {
                differences.push(format!(
                    "{what}: snapshot has {snapshot}, this restore has {here}"
                ));
            };
        if self.format_version != MANIFEST_FORMAT {
            differ("manifest format", &self.format_version, &MANIFEST_FORMAT);
        }
        if self.machine_layout != MACHINE_LAYOUT_VERSION {
            differ(
                "machine layout",
                &self.machine_layout,
                &MACHINE_LAYOUT_VERSION,
            );
        }
        if !self.kernel_cmdline.starts_with(KERNEL_CMDLINE) {
            differ("kernel command line", &self.kernel_cmdline, &KERNEL_CMDLINE);
        }
        let qemu = upstream_version(&self.qemu_version);
        if qemu != host.qemu_version {
            differ("QEMU version", &qemu, &host.qemu_version);
        }
        if self.kernel_version != host.kernel_version {
            differ("guest kernel", &self.kernel_version, &host.kernel_version);
        }
        if self.initramfs_key != host.initramfs_key {
            differ(
                "initramfs/agent build",
                &self.initramfs_key,
                &host.initramfs_key,
            );
        }
        let signature = restore_signature(requested.unwrap_or(&self.machine));
        if self.machine_args != signature {
            let old: Vec<&String> = self
                .machine_args
                .iter()
                .filter(|a| !signature.contains(a))
                .collect();
            let new: Vec<&String> = signature
                .iter()
                .filter(|a| !self.machine_args.contains(a))
                .collect();
            differ(
                "machine arguments",
                &format!("{old:?}"),
                &format!("{new:?}"),
            );
        }
        if let Some(req) = requested {
            let m = &self.machine;
            if m.cpu_model != req.cpu_model {
                differ("CPU model", &m.cpu_model, &req.cpu_model);
            }
            if m.memory_mib != req.memory_mib {
                differ("RAM size (MiB)", &m.memory_mib, &req.memory_mib);
            }
            if m.vcpus != req.vcpus {
                differ("vCPUs", &m.vcpus, &req.vcpus);
            }
            if m.accel != req.accel {
                differ("accelerator", &m.accel, &req.accel);
            }
            if m.network != req.network {
                differ("network device", &m.network, &req.network);
            }
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(ManifestMismatch { differences })
        }
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::Accel;

    fn sample() -> (Manifest, HostFacts) {
        let host = HostFacts {
            qemu_version: "10.0.2".into(),
            kernel_version: "6.1".into(),
            initramfs_key: "k".into(),
        };
        let m = Manifest {
            format_version: MANIFEST_FORMAT,
            kind: SnapshotKind::Template,
            vm_id: "t".into(),
            created_unix: 0,
            machine: MachineSpec::new(Accel::Tcg),
            machine_layout: MACHINE_LAYOUT_VERSION,
            kernel_cmdline: KERNEL_CMDLINE.into(),
            kernel_version: "6.1".into(),
            initramfs_key: "k".into(),
            qemu_version: "10.0.2".into(),
            qemu_build: "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
                .into(),
            machine_args: restore_signature(&MachineSpec::new(Accel::Tcg)),
            state_sha256: "00".into(),
            state_bytes: 1,
            memory_bytes: Some(512 << 20),
            disk_backing: None,
            memory_diff: None,
            devices_only_state: false,
        };
        (m, host)
    }

    #[test]
    fn matching_manifest_passes() {
        let (m, host) = sample();
        m.check(&host, Some(&MachineSpec::new(Accel::Tcg))).unwrap();
    }

    #[test]
    fn every_difference_is_named() {
        let (m, mut host) = sample();
        host.qemu_version = "10.1.0".into();
        let mut req = MachineSpec::new(Accel::Kvm);
        req.cpu_model = "Skylake-Client".into();
        req.memory_mib = 1024;
        let err = m.check(&host, Some(&req)).unwrap_err();
        let text = err.to_string();
        for needle in [
            "QEMU version",
            "CPU model",
            "Skylake-Client",
            "RAM size",
            "1024",
            "accelerator",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        // QEMU, the machine arguments (CPU model, RAM), CPU model, RAM, accelerator.
        assert_eq!(err.differences.len(), 5, "{text}");
        assert!(text.contains("machine arguments"), "{text}");
    }

    #[test]
    fn upstream_version_ignores_the_debian_revision() {
        for (line, want) in [
            (
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)",
                "10.0.2",
            ),
            (
                "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)",
                "7.2.15",
            ),
            ("10.0.2", "10.0.2"),
            ("unknown", "unknown"),
        ] {
            assert_eq!(upstream_version(line), want);
        }
    }

    #[test]
    fn a_backports_security_update_keeps_snapshots_restorable() {
        let (mut m, host) = sample();
        // Taken before the update: another Debian revision of the same upstream QEMU.
        m.qemu_version =
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u2~bpo12+1)".into();
        m.check(&host, Some(&MachineSpec::new(Accel::Tcg))).unwrap();
    }

    #[test]
    fn a_format_1_manifest_from_qemu_7_names_what_differs() {
        let (m, host) = sample();
        let mut old = serde_json::to_value(&m).unwrap();
        let obj = old.as_object_mut().unwrap();
        obj.remove("qemu_build");
        obj.remove("machine_args");
        obj.insert("format_version".into(), 1.into());
        obj.insert("machine_layout".into(), 1.into());
        obj.insert(
            "qemu_version".into(),
            "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)".into(),
        );
        let old: Manifest = serde_json::from_value(old).unwrap();
        let text = old.check(&host, None).unwrap_err().to_string();
        assert!(
            text.contains("QEMU version: snapshot has 7.2.15, this restore has 10.0.2"),
            "{text}"
        );
        assert!(text.contains("machine arguments"), "{text}");
    }

    #[test]
    fn manifests_round_trip_and_reject_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = sample();
        m.write(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            br#"{"format_version":1,"surprise":true}"#,
        )
        .unwrap();
        assert!(matches!(
            Manifest::read(dir.path()),
            Err(ManifestError::Parse { .. })
        ));
    }
}
