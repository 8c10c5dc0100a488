//! QEMU's own floor for a launch, measured for `kiln bench` beside kiln's launch: the bare
//! process start (unjailed, no network backend, overlay made beforehand) and the load of the
//! template's device state, which every launch of that template pays whatever kiln does.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_types::VmId;

use crate::assets::GuestAssets;
use crate::disk::{self, BackingFormat};
use crate::machine::{qemu_args, MemoryBacking, VmPaths};
use crate::manifest::Manifest;
use crate::migration::load_state;
use crate::process::QemuProcess;
use crate::snapshot::{template_incoming, Template, DISK_FILE, MEMORY_FILE, STATE_FILE};
use crate::vm::{connect_qmp, create_vm_dir, remove_dir, VmError};

/// One measurement of the floor.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// Spawn → QMP answers.
    pub start: Duration,
    /// Spawn → device state loaded (the guest could run).
    pub loaded: Duration,
}

impl Template {
    /// Starts a bare QEMU on this template in `dir` (which must not exist; removed after),
    /// loads its state, and says how long each took. `assets`: the host's, for a template
    /// that keeps no boot files.
    pub async fn measure_floor(&self, dir: &Path, assets: &GuestAssets) -> Result<Floor, VmError> {
        let manifest = Manifest::read(self.dir())?;
        let assets = GuestAssets::open(&self.dir().join(crate::snapshot::BOOT_DIR))
            .unwrap_or_else(|_| assets.clone());
        let id = VmId::new("floor").map_err(|e| VmError::Dir {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        create_vm_dir(dir)?;
        let result = async {
            let paths = VmPaths::new(dir);
            let template_disk = self.dir().join(DISK_FILE);
            disk::create_overlay(&paths.disk(), &template_disk, BackingFormat::Qcow2, None).await?;
            let memory = MemoryBacking::PrivateFile(self.dir().join(MEMORY_FILE));
            let incoming = template_incoming(&manifest, self.dir().join(STATE_FILE));
            let link = crate::NetworkAttachment::closed().link()?;
            let netdev = manifest.machine.network.then_some(link.netdev.as_os_str());
            let args = qemu_args(
                &manifest.machine,
                &assets,
                &paths,
                &memory,
                &paths.disk(),
                &manifest.kernel_cmdline,
                Some(incoming.format),
                netdev,
            );
            let fds = if manifest.machine.network {
                link.qemu_fd.into_iter().collect()
            } else {
                Vec::new()
            };
            let timeout = Duration::from_secs(60);
            let started = Instant::now();
            let process = QemuProcess::spawn(
                &args,
                &paths.console_socket(),
                &paths.console_log(),
                true,
                None,
                fds,
            )
            .await?;
            let measured = async {
                let qmp = connect_qmp(&id, &paths, timeout).await?;
                let start = started.elapsed();
                load_state(&id, &qmp, &incoming, timeout).await?;
                Ok::<_, VmError>(Floor {
                    start,
                    loaded: started.elapsed(),
                })
            }
            .await;
            process.kill().await;
            measured
        }
        .await;
        let _ = remove_dir(dir);
        result
    }
}
