//! The jailer's own flow (the `kiln-jailer` binary runs this as root, single-threaded):
//!
//! 1. take a free uid slot (held until this process ends);
//! 2. create the slot's cgroups with the spec's limits and join them;
//! 3. give the owned directories to the uid;
//! 4. unshare mount, IPC, UTS, network (unless the spec keeps the host's), cgroup and PID
//!    namespaces, and fork: the child is PID 1 of the new PID namespace;
//! 5. child: build a tmpfs root holding only the spec's paths, pivot into it, drop to the
//!    uid (no groups, no capabilities, `no_new_privs`), die with the parent, close every
//!    descriptor from 3 up but those the spec keeps, and exec the program once the parent
//!    says go;
//! 6. parent: report the uid and the child's host pid on stderr, say go, drop to the uid
//!    too, and wait: it ends the way the child ended.

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::cgroup::Cgroups;
use crate::spec::{JailReport, JailSpec, ERROR_PREFIX, READY_PREFIX};
use crate::sys::{self, Forked};
use crate::uids;

/// The stage a jail failed at, with what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum JailerError {
    #[error("spec: {0}")]
    Spec(String),
    #[error("uid slot: {0}")]
    Uid(std::io::Error),
    #[error("cgroups: {0}")]
    Cgroups(#[from] crate::cgroup::CgroupError),
    #[error("owning {path}: {source}")]
    Ownership {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("namespaces: {0}")]
    Namespaces(std::io::Error),
    #[error("filesystem view: {0}")]
    Mounts(std::io::Error),
    #[error("dropping privileges: {0}")]
    Privileges(std::io::Error),
    #[error("starting the jailed program: {0}")]
    Start(std::io::Error),
}

/// Where the jail's root is mounted (inside the jail's own mount namespace only; on the
/// host this stays an empty directory).
fn root_mount_point() -> PathBuf {
    uids::lock_path()
        .parent()
        .map(|d| d.join("root"))
        .unwrap_or_else(|| PathBuf::from("/run/kiln/jail/root"))
}

/// Runs the jail; returns only on failure before the program started.
pub fn run(spec: &JailSpec) -> JailerError {
    match jail(spec) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn jail(spec: &JailSpec) -> Result<Never, JailerError> {
    spec.validate()
        .map_err(|e| JailerError::Spec(e.to_string()))?;
    let slot = uids::take(&spec.partition).map_err(JailerError::Uid)?;
    let (uid, gid) = (slot.uid(), slot.uid());
    let cgroups = Cgroups::create(
        uid,
        sys::getpid(),
        &spec.limits,
        &spec.partition.cgroup_root,
    )?;
    cgroups.join(sys::getpid())?;
    for dir in &spec.owned_dirs {
        chown_tree(dir, uid, gid, true)?;
    }
    let root = root_mount_point();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&root)
        .map_err(JailerError::Mounts)?;
    sys::unshare_namespaces(spec.host_network).map_err(JailerError::Namespaces)?;
    let (ready_r, ready_w) = sys::pipe().map_err(JailerError::Namespaces)?;
    let (go_r, go_w) = sys::pipe().map_err(JailerError::Namespaces)?;
    match sys::fork().map_err(JailerError::Namespaces)? {
        Forked::Child => {
            drop((ready_r, go_w));
            child(spec, &root, uid, gid, ready_w, go_r)
        }
        Forked::Parent { child } => {
            drop((ready_w, go_r));
            // The kept descriptors are the program's alone: a link stays open only as long as
            // the program that serves it.
            sys::close_range(3, spec.keep_fds).map_err(JailerError::Namespaces)?;
            parent(spec, child, uid, gid, cgroups, ready_r, go_w, slot)
        }
    }
}

fn child(
    spec: &JailSpec,
    root: &Path,
    uid: u32,
    gid: u32,
    ready: std::os::fd::OwnedFd,
    go: std::os::fd::OwnedFd,
) -> ! {
    let mut ready = std::fs::File::from(ready);
    let setup = || -> Result<(), JailerError> {
        build_root(spec, root).map_err(JailerError::Mounts)?;
        sys::set_hostname("kiln").map_err(JailerError::Namespaces)?;
        sys::drop_privileges(uid, gid).map_err(JailerError::Privileges)?;
        sys::die_with_parent().map_err(JailerError::Privileges)?;
        Ok(())
    };
    if let Err(e) = setup() {
        let _ = ready.write_all(e.to_string().as_bytes());
        std::process::exit(125);
    }
    let _ = ready.write_all(b"k");
    drop(ready);
    // Wait for the parent's report to be out, so the program's output always follows it.
    let mut byte = [0u8; 1];
    let mut go = std::fs::File::from(go);
    if !matches!(go.read(&mut byte), Ok(1)) {
        std::process::exit(125);
    }
    drop(go);
    sys::set_umask(0o077);
    if let Err(e) = sys::close_from(3 + spec.keep_fds) {
        eprintln!("{ERROR_PREFIX}{}", JailerError::Start(e));
        std::process::exit(125);
    }
    let e = sys::exec(&spec.program, &spec.args);
    eprintln!("{ERROR_PREFIX}starting {}: {e}", spec.program.display());
    std::process::exit(127)
}

#[allow(clippy::too_many_arguments)]
fn parent(
    spec: &JailSpec,
    child: libc::pid_t,
    uid: u32,
    gid: u32,
    cgroups: Cgroups,
    ready: std::os::fd::OwnedFd,
    go: std::os::fd::OwnedFd,
    slot: uids::Slot,
) -> Result<Never, JailerError> {
    let mut answer = Vec::new();
    let _ = std::fs::File::from(ready).read_to_end(&mut answer);
    if answer != b"k" {
        let _ = sys::wait_for(child);
        let _ = cgroups.remove();
        let text = String::from_utf8_lossy(&answer).into_owned();
        return Err(JailerError::Start(std::io::Error::other(
            if text.is_empty() {
                "the jail's set-up ended without a word".to_string()
            } else {
                text
            },
        )));
    }
    let report = JailReport {
        uid,
        gid,
        pid: child as u32,
        cgroups,
    };
    let json =
        serde_json::to_string(&report).map_err(|e| JailerError::Start(std::io::Error::other(e)))?;
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{READY_PREFIX}{json}");
    let _ = stderr.flush();
    drop(stderr);
    let _ = std::fs::File::from(go).write_all(b"g");
    // The waiter needs nothing of root's from here on.
    let _ = std::env::set_current_dir("/");
    sys::drop_privileges(uid, gid).map_err(JailerError::Privileges)?;
    if spec.die_with_parent {
        sys::die_with_parent().map_err(JailerError::Privileges)?;
    }
    let ended = sys::wait_for(child).map_err(JailerError::Start)?;
    drop(slot);
    sys::exit_like(ended)
}

/// The jail's filesystem: a 1 MiB tmpfs, the system's programs and libraries read-only, the
/// owned directories read-write, the listed files read-only, a few devices, its own /proc.
fn build_root(spec: &JailSpec, root: &Path) -> std::io::Result<()> {
    sys::make_mounts_private()?;
    sys::mount_tmpfs(root)?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    for sys_dir in ["/usr", "/lib", "/lib64", "/bin", "/sbin"] {
        let path = Path::new(sys_dir);
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => continue,
        };
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(path)?, inside(path))?;
        } else if meta.is_dir() {
            mount_point(&inside(path), true)?;
            sys::bind(path, &inside(path), true, true, false)?;
        }
    }
    let cache = Path::new("/etc/ld.so.cache");
    if cache.is_file() {
        mount_point(&inside(cache), false)?;
        sys::bind(cache, &inside(cache), true, false, false)?;
    }
    let devices = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];
    for dev in devices
        .iter()
        .map(Path::new)
        .chain(spec.devices.iter().map(PathBuf::as_path))
    {
        mount_point(&inside(dev), false)?;
        sys::bind(dev, &inside(dev), false, false, true)?;
    }
    for dir in &spec.owned_dirs {
        mount_point(&inside(dir), true)?;
        sys::bind(dir, &inside(dir), false, false, false)?;
    }
    for file in &spec.read_only {
        mount_point(&inside(file), file.is_dir())?;
        sys::bind(file, &inside(file), true, false, false)?;
    }
    if !is_under_system_dir(&spec.program) {
        mount_point(&inside(&spec.program), false)?;
        sys::bind(&spec.program, &inside(&spec.program), true, true, false)?;
    }
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir)?;
    sys::mount_proc(&proc_dir)?;
    sys::pivot_into(root)?;
    sys::remount_root_read_only()
}

fn is_under_system_dir(p: &Path) -> bool {
    ["/usr", "/lib", "/lib64", "/bin", "/sbin"]
        .iter()
        .any(|d| p.starts_with(d))
}

/// Creates what a bind mount needs at `target` (a directory or an empty file), unless it is
/// there already (a file inside an owned directory).
fn mount_point(target: &Path, dir: bool) -> std::io::Result<()> {
    if std::fs::symlink_metadata(target).is_ok() {
        return Ok(());
    }
    if dir {
        return std::fs::create_dir_all(target);
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::File::create(target).map(drop)
}

/// Gives `dir` and everything under it to `uid`, never following symlinks. With
/// `skip_boot`, a `boot/` directly inside is left alone: its files are hard links of the
/// shared kernel and initramfs, which stay root's.
pub fn chown_tree(dir: &Path, uid: u32, gid: u32, skip_boot: bool) -> Result<(), JailerError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JailerError::Ownership { path, source }
    };
    sys::lchown(dir, uid, gid).map_err(err(dir))?;
    for entry in std::fs::read_dir(dir).map_err(err(dir))? {
        let entry = entry.map_err(err(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(err(&path))?;
        if kind.is_dir() {
            if skip_boot && entry.file_name() == "boot" {
                continue;
            }
            chown_tree(&path, uid, gid, false)?;
        } else {
            sys::lchown(&path, uid, gid).map_err(err(&path))?;
        }
    }
    Ok(())
}
