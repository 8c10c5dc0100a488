//! Per-microVM cgroups: memory, pids and CPU, each on cgroup v2 where the host mounts that
//! controller there and on its v1 hierarchy otherwise (Debian 12 hosts booted with the
//! legacy layout mount memory, cpu, cpuacct and pids under v1). A jail's cgroups live under
//! the jailer's own cgroup (kilnd's), in `<root>/vm-<uid>-<jailer>` (`root` is `kiln` unless
//! `--jail-cgroup` names another), so the host's placement of kilnd
//! (a systemd unit's limits, say) still bounds every microVM.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::Limits;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("the host has no cgroup hierarchy with the {0} controller (mount it under v1 or v2)")]
    Missing(&'static str),
    #[error("cgroup file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {0} still has processes: its uid slot is in use")]
    Busy(PathBuf),
}

/// One controller's directory for one jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Controller {
    pub dir: PathBuf,
    pub v2: bool,
}

/// The cgroups of one jail (on v2 all four are the same directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Cgroups {
    pub memory: Controller,
    pub pids: Controller,
    pub cpu: Controller,
    /// CPU usage: `cpuacct` on v1, the `cpu` directory itself on v2.
    pub cpuacct: Controller,
}

/// Where a controller is mounted, and this process's place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub controller: &'static str,
    pub mount: PathBuf,
    pub own: String,
    pub v2: bool,
}

impl Hierarchy {
    /// The directory under which a kilnd with cgroup root `root` puts its jails' cgroups
    /// for this controller.
    pub fn jails_dir(&self, root: &str) -> PathBuf {
        join(&self.mount, &self.own).join(root)
    }
}

fn join(mount: &Path, cgroup: &str) -> PathBuf {
    mount.join(cgroup.trim_start_matches('/'))
}

const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

/// Finds each controller kiln needs: v1 when a v1 hierarchy carries it, else v2 when the
/// unified hierarchy lists it.
pub fn hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let mountinfo = read("/proc/self/mountinfo")?;
    let own = read("/proc/self/cgroup")?;
    let mounts = parse_mounts(&mountinfo);
    CONTROLLERS
        .iter()
        .map(|&c| locate(c, &mounts, &own).ok_or(CgroupError::Missing(c)))
        .collect()
}

/// (mount point, v2, v1 controllers) of every cgroup mount.
fn parse_mounts(mountinfo: &str) -> Vec<(PathBuf, bool, Vec<String>)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount = left.split(' ').nth(4).unwrap_or_default();
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or_default();
        let options = right.nth(1).unwrap_or_default();
        match fstype {
            "cgroup" => out.push((
                PathBuf::from(mount),
                false,
                options.split(',').map(str::to_string).collect(),
            )),
            "cgroup2" => out.push((PathBuf::from(mount), true, Vec::new())),
            _ => {}
        }
    }
    out
}

fn locate(
    controller: &'static str,
    mounts: &[(PathBuf, bool, Vec<String>)],
    own: &str,
) -> Option<Hierarchy> {
    if let Some((mount, _, _)) = mounts
        .iter()
        .find(|(_, v2, opts)| !v2 && opts.iter().any(|o| o == controller))
    {
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',').any(|c| c == controller).then_some(path)
        })?;
        return Some(Hierarchy {
            controller,
            mount: mount.clone(),
            own: path.to_string(),
            v2: false,
        });
    }
    let (mount, _, _) = mounts.iter().find(|(_, v2, _)| *v2)?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    // cpuacct has no v2 controller: usage is in cpu.stat, always there.
    let wanted = if controller == "cpuacct" {
        "cpu"
    } else {
        controller
    };
    let listed = std::fs::read_to_string(join(mount, path).join("cgroup.controllers")).ok()?;
    listed
        .split_whitespace()
        .any(|c| c == wanted)
        .then(|| Hierarchy {
            controller,
            mount: mount.clone(),
            own: path.to_string(),
            v2: true,
        })
}

fn read(path: impl AsRef<Path>) -> Result<String, CgroupError> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A jail's cgroup is named by its uid and its jailer's pid: the next jail on the same uid
/// never meets the previous one's cgroup (which its kilnd may still be removing).
fn jail_name(uid: u32, jailer: u32) -> String {
    format!("vm-{uid}-{jailer}")
}

/// (uid, jailer pid) from a jail cgroup's name.
fn parse_name(name: &str) -> Option<(u32, u32)> {
    let (uid, pid) = name.strip_prefix("vm-")?.split_once('-')?;
    Some((uid.parse().ok()?, pid.parse().ok()?))
}

impl Cgroups {
    /// Creates the cgroups of the jail with `uid` started by `jailer` and applies `limits`.
    pub fn create(
        uid: u32,
        jailer: u32,
        limits: &Limits,
        root: &str,
    ) -> Result<Cgroups, CgroupError> {
        let hs = hierarchies()?;
        let dir_of = |c: &str| -> Result<Controller, CgroupError> {
            let h = hs
                .iter()
                .find(|h| h.controller == c)
                .ok_or(CgroupError::Missing("memory"))?;
            if h.v2 {
                enable_v2_controllers(&join(&h.mount, &h.own))?;
            }
            let dir = h.jails_dir(root).join(jail_name(uid, jailer));
            std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Io {
                path: dir.clone(),
                source,
            })?;
            Ok(Controller { dir, v2: h.v2 })
        };
        let cgroups = Cgroups {
            memory: dir_of("memory")?,
            pids: dir_of("pids")?,
            cpu: dir_of("cpu")?,
            cpuacct: dir_of("cpuacct")?,
        };
        cgroups.apply(limits)?;
        Ok(cgroups)
    }

    fn apply(&self, l: &Limits) -> Result<(), CgroupError> {
        let m = &self.memory;
        if m.v2 {
            write(&m.dir.join("memory.max"), &l.memory_bytes.to_string())?;
            // No swap: the limit is what the microVM may really use.
            let _ = write(&m.dir.join("memory.swap.max"), "0");
        } else {
            write(
                &m.dir.join("memory.limit_in_bytes"),
                &l.memory_bytes.to_string(),
            )?;
        }
        write(&self.pids.dir.join("pids.max"), &l.pids.to_string())?;
        self.set_cpu_quota(l.cpu_quota_us, l.cpu_period_us)
    }

    /// Sets the CPU time the jail may use per period (kilnd's burst credits call this).
    pub fn set_cpu_quota(&self, quota_us: u64, period_us: u64) -> Result<(), CgroupError> {
        let c = &self.cpu;
        if c.v2 {
            write(&c.dir.join("cpu.max"), &format!("{quota_us} {period_us}"))
        } else {
            write(&c.dir.join("cpu.cfs_period_us"), &period_us.to_string())?;
            write(&c.dir.join("cpu.cfs_quota_us"), &quota_us.to_string())
        }
    }

    /// The CPU quota now in force, in microseconds per period.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        let c = &self.cpu;
        if c.v2 {
            let text = std::fs::read_to_string(c.dir.join("cpu.max")).ok()?;
            text.split_whitespace().next()?.parse().ok()
        } else {
            let text = std::fs::read_to_string(c.dir.join("cpu.cfs_quota_us")).ok()?;
            text.trim().parse().ok()
        }
    }

    /// Every distinct directory (v1 controllers may share one hierarchy; v2 always does).
    fn dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = Vec::new();
        for c in [&self.memory, &self.pids, &self.cpu, &self.cpuacct] {
            if !dirs.contains(&c.dir.as_path()) {
                dirs.push(&c.dir);
            }
        }
        dirs
    }

    /// Moves `pid` into every cgroup of the jail.
    pub fn join(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the jail's cgroups (once its processes are gone).
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.dirs().into_iter().try_for_each(remove_dir)
    }

    /// CPU time used by the jail so far, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let c = &self.cpuacct;
        if c.v2 {
            let stat = std::fs::read_to_string(c.dir.join("cpu.stat")).ok()?;
            let usec: u64 = field(&stat, "usage_usec")?;
            Some(usec as f64 / 1e6)
        } else {
            let ns: u64 = std::fs::read_to_string(c.dir.join("cpuacct.usage"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(ns as f64 / 1e9)
        }
    }

    /// How many CFS periods the kernel held the jail to its CPU quota so far.
    pub fn nr_throttled(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(self.cpu.dir.join("cpu.stat")).ok()?;
        field(&stat, "nr_throttled")
    }

    /// How many times the kernel's OOM killer ended a process of this jail.
    pub fn oom_kills(&self) -> u64 {
        let m = &self.memory;
        let file = if m.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(m.dir.join(file))
            .ok()
            .and_then(|t| field(&t, "oom_kill"))
            .unwrap_or(0)
    }

    /// The memory limit in force, in bytes.
    pub fn memory_limit(&self) -> Option<u64> {
        let m = &self.memory;
        let file = if m.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::read_to_string(m.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The pids limit in force.
    pub fn pids_limit(&self) -> Option<u64> {
        std::fs::read_to_string(self.pids.dir.join("pids.max"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// `name value` lines (cpu.stat, memory.events, memory.oom_control).
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// On v2 a controller reaches a child only when every ancestor's subtree_control enables it.
fn enable_v2_controllers(own: &Path) -> Result<(), CgroupError> {
    let kiln = own.join("kiln");
    std::fs::create_dir_all(&kiln).map_err(|source| CgroupError::Io {
        path: kiln.clone(),
        source,
    })?;
    for dir in [own, kiln.as_path()] {
        write(&dir.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(CgroupError::Busy(dir.into())),
        Err(source) => Err(CgroupError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Removes the cgroups of jails that ended without their kilnd removing them (a kill -9):
/// those whose uid slot `is_free` says nobody holds, or whose jailer is gone. A jail being
/// set up holds its slot and its jailer lives, so it is never touched. Returns how many
/// were removed.
pub fn sweep(root: &str, is_free: impl Fn(u32) -> bool) -> usize {
    let Ok(hs) = hierarchies() else {
        return 0;
    };
    let mut removed = 0;
    for h in hs {
        let Ok(entries) = std::fs::read_dir(h.jails_dir(root)) else {
            continue;
        };
        for e in entries.flatten() {
            let Some((uid, jailer)) = e.file_name().to_str().and_then(parse_name) else {
                continue;
            };
            let gone = is_free(uid) || !Path::new(&format!("/proc/{jailer}")).exists();
            if gone && std::fs::remove_dir(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// The cgroup directories of jails with `uid` under `root` that exist now (leak checks).
pub fn existing(root: &str, uid: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in hierarchies().unwrap_or_default() {
        let Ok(entries) = std::fs::read_dir(h.jails_dir(root)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if name
                .to_str()
                .and_then(parse_name)
                .is_some_and(|(u, _)| u == uid)
            {
                out.push(e.path());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
35 25 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
37 35 0:32 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
38 35 0:33 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 35 0:34 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 35 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const OWN: &str = "8:pids:/\n4:memory:/svc/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn v1_controllers_are_found_with_this_process_place() {
        let mounts = parse_mounts(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        let mem = locate("memory", &mounts, OWN).unwrap();
        assert_eq!(mem.mount, Path::new("/sys/fs/cgroup/memory"));
        assert!(!mem.v2);
        assert_eq!(
            mem.jails_dir("kiln"),
            Path::new("/sys/fs/cgroup/memory/svc/abc/kiln")
        );
        let cpu = locate("cpu", &mounts, OWN).unwrap();
        assert_eq!(cpu.jails_dir("kiln"), Path::new("/sys/fs/cgroup/cpu/kiln"));
    }

    #[test]
    fn a_controller_on_neither_hierarchy_is_missing() {
        let mounts = parse_mounts(MOUNTINFO);
        // The unified mount here lists nothing (no cgroup.controllers file to read).
        assert!(locate("io", &mounts, OWN).is_none());
    }

    #[test]
    fn jail_names_carry_uid_and_jailer() {
        assert_eq!(
            parse_name(&jail_name(1_900_000_007, 4242)),
            Some((1_900_000_007, 4242))
        );
        assert_eq!(parse_name("vm-12"), None);
        assert_eq!(parse_name("other"), None);
    }

    #[test]
    fn fields_are_read_by_name() {
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(field(oom, "oom_kill"), Some(3));
        assert_eq!(
            field("usage_usec 1500\nuser_usec 1\n", "usage_usec"),
            Some(1500)
        );
        assert_eq!(field(oom, "missing"), None);
    }
}
