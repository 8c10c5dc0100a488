//! Base images that `FROM` can name: the busybox base and a Debian 12 minimal root built
//! with mmdebstrap from the host's apt sources (both cached by content), plus root
//! filesystem tarballs the user imported under a name.

use std::path::{Path, PathBuf};

use kiln_vmm::GuestAssets;
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tracing::info;

/// Size of the Debian base filesystem (sparse: only used blocks take disk space).
const DEBIAN_FS_SIZE: &str = "4G";
/// Size of an imported root filesystem, on top of its contents.
const IMPORT_HEADROOM_MIB: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("FROM {0}: kiln cannot pull images from a registry. Export the image's root filesystem as a tar (for example `docker export $(docker create {0}) > rootfs.tar`), import it with `kiln image import <name> rootfs.tar`, then use FROM <name>. Built-in bases: busybox, debian")]
    Remote(String),
    #[error(
        "FROM {name}: no such base image. Built-in bases: busybox, debian; imported: {imported:?}"
    )]
    Unknown { name: String, imported: Vec<String> },
    #[error("FROM scratch is not supported: start from busybox or debian")]
    Scratch,
    #[error("Building the {base} base image failed: {detail}")]
    Build { base: String, detail: String },
    #[error("Base image file {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Import name {0:?} is invalid: use letters, digits, '-' and '_'")]
    BadName(String),
}

/// A resolved base: its root disk (raw ext4, read-only) and a content key for caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub name: String,
    pub disk: PathBuf,
    pub key: String,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Maps what `FROM` names to a local base, building Debian's on first use.
pub async fn resolve(from: &str, assets: &GuestAssets) -> Result<Base, BaseError> {
    let lower = from.to_ascii_lowercase();
    let name = lower.strip_prefix("kiln/").unwrap_or(&lower);
    let (name, tag) = name.split_once(':').unwrap_or((name, "latest"));
    match (name, tag) {
        ("scratch", _) => Err(BaseError::Scratch),
        ("busybox", "latest") => existing(assets, "busybox"),
        ("debian", "latest" | "12" | "bookworm" | "bookworm-slim" | "12-slim") => {
            ensure_debian(assets).await
        }
        _ if from.contains('/') || from.contains(':') || from.contains('.') => {
            Err(BaseError::Remote(from.to_string()))
        }
        (other, _)
            if valid_name(other)
                && assets
                    .dir
                    .join("bases")
                    .join(format!("{other}.ext4"))
                    .is_file() =>
        {
            existing(assets, other)
        }
        (other, _) => Err(BaseError::Unknown {
            name: other.to_string(),
            imported: assets.bases(),
        }),
    }
}

fn existing(assets: &GuestAssets, name: &str) -> Result<Base, BaseError> {
    let disk = assets.base_disk(name).map_err(|_| BaseError::Unknown {
        name: name.into(),
        imported: assets.bases(),
    })?;
    let key_path = disk.with_extension("key");
    let key = std::fs::read_to_string(&key_path).map_err(|source| BaseError::Io {
        path: key_path,
        source,
    })?;
    Ok(Base {
        name: name.to_string(),
        disk,
        key: key.trim().to_string(),
    })
}

async fn run(base: &str, cmd: &mut Command) -> Result<(), BaseError> {
    let out = cmd.output().await.map_err(|e| BaseError::Build {
        base: base.into(),
        detail: format!("cannot run {cmd:?}: {e}"),
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Err(BaseError::Build {
        base: base.into(),
        detail: format!("{cmd:?} failed ({}):\n{tail}", out.status),
    })
}

/// The host's apt source files, so the base uses the same package mirrors as the host
/// (no mirror is named in kiln).
fn host_apt_sources() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if Path::new("/etc/apt/sources.list").is_file() {
        let text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
        if text.lines().any(|l| l.trim_start().starts_with("deb ")) {
            files.push(PathBuf::from("/etc/apt/sources.list"));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sources" || x == "list"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
}

/// Builds (once) the Debian 12 minimal base: minbase + ca-certificates, with the host's CA
/// bundle so TLS through an intercepting proxy works in RUN steps.
pub async fn ensure_debian(assets: &GuestAssets) -> Result<Base, BaseError> {
    let bases = assets.dir.join("bases");
    let disk = bases.join("debian.ext4");
    let sources = host_apt_sources();
    let mut h = Sha256::new();
    h.update(b"debian-bookworm-minbase-v1");
    for s in &sources {
        h.update(std::fs::read(s).unwrap_or_default());
    }
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    h.update(std::fs::read(ca).unwrap_or_default());
    let key = hex::encode(&h.finalize()[..8]);
    if disk.is_file()
        && std::fs::read_to_string(bases.join("debian.key"))
            .map(|k| k.trim() == key)
            .unwrap_or(false)
    {
        return Ok(Base {
            name: "debian".into(),
            disk,
            key,
        });
    }
    if sources.is_empty() {
        return Err(BaseError::Build {
            base: "debian".into(),
            detail: "the host has no apt sources to build from".into(),
        });
    }
    info!("building the Debian base image with mmdebstrap (once)");
    let work = tempfile::Builder::new()
        .prefix("kiln-debian-")
        .tempdir_in(&bases)
        .map_err(|source| BaseError::Io {
            path: bases.clone(),
            source,
        })?;
    let root = work.path().join("root");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--variant=minbase",
        "--include=ca-certificates",
        "--quiet",
        "bookworm",
    ])
    .arg(&root);
    cmd.args(&sources);
    run("debian", &mut cmd).await?;
    if ca.is_file() {
        let target = root.join("etc/ssl/certs/ca-certificates.crt");
        std::fs::copy(ca, &target).map_err(|source| BaseError::Io {
            path: target,
            source,
        })?;
    }
    // apt in the guest must not try to drop privileges to _apt inside a minimal root.
    let _ = std::fs::write(
        root.join("etc/apt/apt.conf.d/99kiln"),
        "APT::Sandbox::User \"root\";\n",
    );
    let _ = std::fs::write(
        root.join("etc/pip.conf"),
        "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n",
    );
    std::fs::create_dir_all(root.join(".kiln")).map_err(|source| BaseError::Io {
        path: root.clone(),
        source,
    })?;
    let tmp = work.path().join("debian.ext4");
    run(
        "debian",
        Command::new("mke2fs")
            .args([
                "-q",
                "-t",
                "ext4",
                "-E",
                "root_owner=0:0",
                "-L",
                "kiln-debian",
                "-d",
            ])
            .arg(&root)
            .arg(&tmp)
            .arg(DEBIAN_FS_SIZE),
    )
    .await?;
    std::fs::rename(&tmp, &disk).map_err(|source| BaseError::Io {
        path: disk.clone(),
        source,
    })?;
    std::fs::write(bases.join("debian.key"), &key).map_err(|source| BaseError::Io {
        path: bases.clone(),
        source,
    })?;
    Ok(Base {
        name: "debian".into(),
        disk,
        key,
    })
}

/// Imports a root filesystem tarball as base `name` (then usable as `FROM name`).
pub async fn import(assets: &GuestAssets, name: &str, tarball: &Path) -> Result<Base, BaseError> {
    if !valid_name(name) || matches!(name, "busybox" | "debian" | "scratch") {
        return Err(BaseError::BadName(name.to_string()));
    }
    let bases = assets.dir.join("bases");
    let work = tempfile::Builder::new()
        .prefix("kiln-import-")
        .tempdir_in(&bases)
        .map_err(|source| BaseError::Io {
            path: bases.clone(),
            source,
        })?;
    let root = work.path().join("root");
    std::fs::create_dir_all(&root).map_err(|source| BaseError::Io {
        path: root.clone(),
        source,
    })?;
    // GNU tar refuses members with `..` or absolute names by default.
    run(
        name,
        Command::new("tar")
            .arg("-xpf")
            .arg(tarball)
            .arg("-C")
            .arg(&root)
            .arg("--no-same-owner"),
    )
    .await?;
    std::fs::create_dir_all(root.join(".kiln")).map_err(|source| BaseError::Io {
        path: root.clone(),
        source,
    })?;
    let used = std::fs::metadata(tarball)
        .map(|m| m.len() >> 20)
        .unwrap_or(0);
    let tmp = work.path().join("base.ext4");
    let size = format!("{}M", used * 2 + IMPORT_HEADROOM_MIB);
    run(
        name,
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
            .arg(&root)
            .arg(&tmp)
            .arg(&size),
    )
    .await?;
    let disk = bases.join(format!("{name}.ext4"));
    std::fs::rename(&tmp, &disk).map_err(|source| BaseError::Io {
        path: disk.clone(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(tarball).map_err(|source| BaseError::Io {
        path: tarball.to_path_buf(),
        source,
    })?;
    std::io::copy(&mut f, &mut h).map_err(|source| BaseError::Io {
        path: tarball.to_path_buf(),
        source,
    })?;
    let key = hex::encode(&h.finalize()[..8]);
    std::fs::write(disk.with_extension("key"), &key).map_err(|source| BaseError::Io {
        path: disk.clone(),
        source,
    })?;
    Ok(Base {
        name: name.to_string(),
        disk,
        key,
    })
}
