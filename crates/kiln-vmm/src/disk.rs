//! Copy-on-write root disks: every VM writes only to its own qcow2 overlay.

use std::path::{Path, PathBuf};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("Running qemu-img failed (is qemu-utils installed? scripts/setup.sh installs it)")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-img could not create overlay {overlay} over {backing}: {stderr}")]
    Create {
        overlay: PathBuf,
        backing: PathBuf,
        stderr: String,
    },
    #[error("qemu-img could not copy disk {disk}: {stderr}")]
    Flatten { disk: PathBuf, stderr: String },
}

/// The format of a backing file, as qemu-img names it.
#[derive(Debug, Clone, Copy)]
pub enum BackingFormat {
    Raw,
    Qcow2,
}

/// Creates `overlay` as a qcow2 whose reads fall through to `backing` (never written).
/// With `size_mib`, the overlay is that large (the guest agent grows its filesystem).
pub async fn create_overlay(
    overlay: &Path,
    backing: &Path,
    format: BackingFormat,
    size_mib: Option<u32>,
) -> Result<(), DiskError> {
    let fmt = match format {
        BackingFormat::Raw => "raw",
        BackingFormat::Qcow2 => "qcow2",
    };
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
        .arg(backing)
        .arg(overlay)
        .args(size_mib.map(|m| format!("{m}M")))
        .output()
        .await
        .map_err(DiskError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DiskError::Create {
            overlay: overlay.to_path_buf(),
            backing: backing.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Writes the qcow2 overlay `top` over the trusted chain at `base` as one standalone qcow2
/// at `out`: a copy that needs nothing of kiln's to open. `top` is a file a VM's QEMU wrote,
/// so nothing in its header is followed: the chain under it is `base`, whatever the header
/// names, and a header that asks for an external data file is refused.
pub async fn flatten(top: &Path, base: &Path, out: &Path) -> Result<(), DiskError> {
    let refuse = |stderr: String| DiskError::Flatten {
        disk: top.to_path_buf(),
        stderr,
    };
    match external_data_file(top) {
        Ok(false) => {}
        Ok(true) => return Err(refuse("its header names an external data file".into())),
        Err(e) => return Err(refuse(e.to_string())),
    }
    let (top_opt, base_opt) = (
        image_opt(top).map_err(refuse)?,
        image_opt(base).map_err(refuse)?,
    );
    // The chain's bottom is the image's raw base when the Dockerfile added no layer.
    let base_driver = if is_qcow2(base) { "qcow2" } else { "raw" };
    let opts = format!(
        "driver=qcow2,file.driver=file,file.filename={top_opt},\
         backing.driver={base_driver},backing.file.driver=file,backing.file.filename={base_opt}"
    );
    let result = Command::new("qemu-img")
        .args(["convert", "-q", "--image-opts", &opts, "-O", "qcow2"])
        .arg(out)
        .output()
        .await
        .map_err(DiskError::Spawn)?;
    if result.status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_file(out);
        Err(refuse(
            String::from_utf8_lossy(&result.stderr).trim().to_string(),
        ))
    }
}

/// A path as one value of qemu-img's `--image-opts` (commas doubled).
fn image_opt(path: &Path) -> Result<String, String> {
    path.to_str()
        .map(|s| s.replace(',', ",,"))
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))
}

/// Whether `path` starts with qcow2's magic (else kiln's chains hold raw files).
fn is_qcow2(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"QFI\xfb")
}

/// Whether a qcow2 header sets the external-data-file feature (incompatible feature bit 2
/// of a version 3 header).
fn external_data_file(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut header = [0u8; 80];
    std::fs::File::open(path)?.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a qcow2 file", path.display()),
        ));
    }
    let version = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let features = u64::from_be_bytes(header[72..80].try_into().unwrap_or_default());
    Ok(version >= 3 && features & (1 << 2) != 0)
}

/// Most files a disk chain may have (a Dockerfile's steps each add one layer).
pub const MAX_CHAIN: usize = 512;

/// The backing file named in a qcow2 header, if any (`None` for raw files). Only headers
/// kiln trusts are read this way: files owned by root that no VM can write.
pub fn backing_file(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut header = [0u8; 20];
    if f.read_exact(&mut header).is_err() || &header[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(header[16..20].try_into().unwrap_or_default());
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > 1023 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: backing file name of {len} bytes", path.display()),
        ));
    }
    let mut name = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    use std::os::unix::ffi::OsStringExt;
    let name = PathBuf::from(std::ffi::OsString::from_vec(name));
    Ok(Some(match path.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    }))
}

/// `base` and every file under it in its backing chain. Each must be a root-owned file that
/// neither group nor others can write: the chain a jail may read is never one a VM made.
pub fn trusted_chain(base: &Path) -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let mut chain = Vec::new();
    let mut next = Some(base.to_path_buf());
    while let Some(file) = next {
        if chain.len() >= MAX_CHAIN {
            return Err(std::io::Error::other(format!(
                "disk chain under {} has over {MAX_CHAIN} files",
                base.display()
            )));
        }
        let meta = std::fs::metadata(&file)?;
        if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "disk layer {} must be a root-owned file no one else can write",
                    file.display()
                ),
            ));
        }
        next = backing_file(&file)?;
        chain.push(file);
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chains_are_read_from_qcow2_headers() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join("top.qcow2");
        create_overlay(&mid, &base, BackingFormat::Raw, None)
            .await
            .unwrap();
        create_overlay(&top, &mid, BackingFormat::Qcow2, None)
            .await
            .unwrap();
        assert_eq!(backing_file(&top).unwrap(), Some(mid.clone()));
        assert_eq!(backing_file(&base).unwrap(), None);
        assert_eq!(trusted_chain(&top).unwrap(), vec![top.clone(), mid, base]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = trusted_chain(&top).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    }

    /// What a guest reads from the qcow2 `disk`.
    fn guest_bytes(disk: &Path) -> Vec<u8> {
        let raw = disk.with_extension("raw");
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(disk)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read(&raw).unwrap()
    }

    #[tokio::test]
    async fn flatten_reads_a_raw_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.ext4");
        std::fs::write(&base, vec![0x17u8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        create_overlay(&top, &base, BackingFormat::Raw, None)
            .await
            .unwrap();
        let out = dir.path().join("out.qcow2");
        flatten(&top, &base, &out).await.unwrap();
        assert_eq!(backing_file(&out).unwrap(), None, "standalone");
        assert!(guest_bytes(&out).iter().all(|&b| b == 0x17));
    }

    #[tokio::test]
    async fn flatten_follows_the_chain_kiln_names_not_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0xabu8; 1 << 20]).unwrap();
        let base_q = dir.path().join("base.qcow2");
        create_overlay(&base_q, &base, BackingFormat::Raw, None)
            .await
            .unwrap();
        // A hostile QEMU's overlay: its header names a host file as its backing.
        let secret = dir.path().join("secret");
        std::fs::write(&secret, vec![0x5au8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        create_overlay(&top, &secret, BackingFormat::Raw, None)
            .await
            .unwrap();
        let out = dir.path().join("out.qcow2");
        flatten(&top, &base_q, &out).await.unwrap();
        assert_eq!(backing_file(&out).unwrap(), None, "standalone");
        let bytes = guest_bytes(&out);
        assert!(
            bytes.iter().all(|&b| b == 0xab),
            "the data is base's, never the header's file"
        );

        // An overlay that asks for an external data file is refused.
        let mut header = std::fs::read(&top).unwrap();
        header[79] |= 1 << 2;
        std::fs::write(&top, &header).unwrap();
        let err = flatten(&top, &base_q, &dir.path().join("x.qcow2"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("external data file"), "{err}");
    }
}
