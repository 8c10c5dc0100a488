//! Templates of bare base images, cached under a directory and keyed by everything that
//! went into them (base disk, kernel, agent build, machine, QEMU), so a stale one is never
//! used and an unchanged one is built only once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::assets::GuestAssets;
use crate::confine::Confinement;
use crate::machine::{restore_signature, MachineSpec};
use crate::manifest::{qemu_version, upstream_version, HostFacts};
use crate::network::NetworkAttachment;
use crate::snapshot::Template;
use crate::vm::{remove_dir, BootConfig, Vm, VmError};

/// Returns the cached template of `base` for `machine`, building it when missing or stale.
pub async fn ensure(
    cache_dir: &Path,
    base: &str,
    machine: &MachineSpec,
    assets: &GuestAssets,
    boot_timeout: Duration,
    confinement: Confinement,
) -> Result<Template, VmError> {
    let base_disk = assets.base_disk(base)?;
    let dir = cache_dir.join(format!("{base}-{}", cache_key(&base_disk, machine, assets)));
    if let Ok(template) = Template::open(&dir) {
        if template
            .manifest()
            .check(&HostFacts::new(assets), Some(machine))
            .is_ok()
        {
            return Ok(template);
        }
        remove_dir(&dir)?;
    }
    std::fs::create_dir_all(cache_dir).map_err(|source| VmError::Dir {
        path: cache_dir.to_path_buf(),
        source,
    })?;
    let work = cache_dir.join(format!(".build-{}-{}", base, std::process::id()));
    let _ = remove_dir(&work);
    let vm = Vm::boot(BootConfig {
        id: kiln_types::VmId::new(format!("template-{base}")).map_err(|e| VmError::Dir {
            path: dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?,
        dir: work.join("vm"),
        machine: machine.clone(),
        assets: assets.clone(),
        base_disk,
        base_format: crate::disk::BackingFormat::Raw,
        top_disk: None,
        disk_size_mib: None,
        timeout: boot_timeout,
        die_with_parent: true,
        network: NetworkAttachment::closed(),
        confinement,
    })
    .await;
    let result = match vm {
        Ok(vm) => vm.snapshot_template(&work.join("template")).await,
        Err(e) => Err(e),
    };
    let outcome = result.and_then(|_| {
        match std::fs::rename(work.join("template"), &dir) {
            Ok(()) => {}
            // Another process built it meanwhile: use theirs.
            Err(_) if dir.join("manifest.json").is_file() => {}
            Err(source) => {
                return Err(VmError::Dir {
                    path: dir.clone(),
                    source,
                })
            }
        }
        Template::open(&dir)
    });
    let _ = remove_dir(&work);
    outcome
}

fn cache_key(base_disk: &Path, machine: &MachineSpec, assets: &GuestAssets) -> String {
    let mut h = Sha256::new();
    let base_key: PathBuf = base_disk.with_extension("key");
    h.update(std::fs::read(&base_key).unwrap_or_default());
    h.update(
        std::fs::metadata(base_disk)
            .map(|m| m.len().to_le_bytes())
            .unwrap_or_default(),
    );
    h.update(serde_json::to_vec(machine).unwrap_or_default());
    h.update(assets.kernel_version.as_bytes());
    h.update(assets.initramfs_key.as_bytes());
    h.update(upstream_version(qemu_version()).as_bytes());
    h.update(restore_signature(machine).join("\n").as_bytes());
    hex::encode(&h.finalize()[..8])
}
