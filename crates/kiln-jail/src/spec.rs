//! What a jail holds (the spec kilnd hands the jailer) and what the jailer reports back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// First uid (and gid) of the range kiln reserves for microVMs: one per running microVM,
/// far above the ranges Debian hands to people (1000–59999), system users (100–999) and
/// systemd's container ranges (up to 1879048191).
pub const UID_BASE: u32 = 1_900_000_000;
/// How many microVMs can run jailed on one machine at once (all kiln homes together).
pub const UID_SLOTS: u32 = 65_536;
/// The last uid of kiln's range.
pub const UID_LAST: u32 = UID_BASE + (UID_SLOTS - 1);

/// One jailed program: who it runs as is chosen by the jailer (a free uid slot); everything
/// else is said here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JailSpec {
    /// Absolute path of the program (QEMU).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Directories the program owns: chowned to its uid (except any `boot/` inside, whose
    /// files are hard links of shared assets) and visible read-write at the same path.
    pub owned_dirs: Vec<PathBuf>,
    /// Files visible read-only at the same path (kernel, initramfs, firmware, template RAM
    /// and state, the disk chain under the VM's own overlay).
    pub read_only: Vec<PathBuf>,
    /// Device nodes visible inside (beyond null, zero, random and urandom): `/dev/kvm`.
    pub devices: Vec<PathBuf>,
    pub limits: Limits,
    /// Kill the program when the process that started the jailer goes away.
    pub die_with_parent: bool,
    /// Stay in the host's network namespace (the network backend, which makes the guest's
    /// outbound connections); every other namespace is still new.
    #[serde(default)]
    pub host_network: bool,
    /// Descriptors 3 up to 3 + this are the program's (a socket kilnd passed, such as the
    /// guest's network link); every other descriptor is closed before `exec`.
    #[serde(default)]
    pub keep_fds: u32,
    /// The uids and cgroup root of the kilnd that started it.
    #[serde(default)]
    pub partition: Partition,
}

/// The part of the machine's jail resources one kilnd uses (`--jail-uids`, `--jail-cgroup`):
/// nodes sharing a machine keep their microVMs' uids and cgroups apart with them. The uid
/// lock stays machine-wide, so even overlapping ranges never give one uid to two jails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Partition {
    /// The first uid, and how many, inside kiln's range (`UID_BASE` onwards).
    pub uid_first: u32,
    pub uid_count: u32,
    /// The directory under the jailer's own cgroup holding its jails' cgroups.
    pub cgroup_root: String,
}

/// The cgroup root a kilnd uses unless told otherwise.
pub const DEFAULT_CGROUP_ROOT: &str = "kiln";

impl Default for Partition {
    fn default() -> Self {
        Partition {
            uid_first: UID_BASE,
            uid_count: UID_SLOTS,
            cgroup_root: DEFAULT_CGROUP_ROOT.to_string(),
        }
    }
}

impl Partition {
    /// `FIRST-LAST` (inclusive), inside kiln's range, and a cgroup directory name.
    pub fn new(uids: Option<&str>, cgroup_root: Option<&str>) -> Result<Partition, SpecError> {
        let mut p = Partition::default();
        if let Some(text) = uids {
            let bad = || SpecError::Uids(text.to_string());
            let (a, b) = text.split_once('-').ok_or_else(bad)?;
            let first: u32 = a.trim().parse().map_err(|_| bad())?;
            let last: u32 = b.trim().parse().map_err(|_| bad())?;
            p.uid_first = first;
            p.uid_count = last.checked_sub(first).ok_or_else(bad)?.saturating_add(1);
        }
        if let Some(root) = cgroup_root {
            p.cgroup_root = root.to_string();
        }
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        let end = u64::from(self.uid_first) + u64::from(self.uid_count);
        if self.uid_first < UID_BASE
            || self.uid_count == 0
            || end > u64::from(UID_BASE) + u64::from(UID_SLOTS)
        {
            return Err(SpecError::Uids(self.uid_range()));
        }
        let r = &self.cgroup_root;
        let plain = !r.is_empty()
            && r.len() <= 64
            && !r.starts_with('.')
            && r.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !plain {
            return Err(SpecError::CgroupRoot(r.clone()));
        }
        Ok(())
    }

    /// `FIRST-LAST`.
    pub fn uid_range(&self) -> String {
        let last = u64::from(self.uid_first) + u64::from(self.uid_count) - 1;
        format!("{}-{last}", self.uid_first)
    }
}

/// At most this many descriptors pass into a jail.
pub const MAX_KEPT_FDS: u32 = 8;

/// The cgroup limits of one jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU time allowed per period, in microseconds (`cpu_period_us` × CPUs).
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
}

/// The CFS period kiln uses: 100 ms, the kernel's default.
pub const CPU_PERIOD_US: u64 = 100_000;

impl Limits {
    /// Limits for `cpus` CPUs (fractions allowed) and `memory_bytes`.
    pub fn new(memory_bytes: u64, pids: u64, cpus: f64) -> Limits {
        Limits {
            memory_bytes,
            pids,
            cpu_quota_us: quota_for(cpus),
            cpu_period_us: CPU_PERIOD_US,
        }
    }
}

/// The CFS quota that gives `cpus` CPUs (at least 1 ms per period, the kernel's minimum).
pub fn quota_for(cpus: f64) -> u64 {
    ((cpus.max(0.0) * CPU_PERIOD_US as f64).round() as u64).max(1_000)
}

/// What the jailer reports on its first line of standard error, before the program runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JailReport {
    pub uid: u32,
    pub gid: u32,
    /// The program's pid as the host sees it.
    pub pid: u32,
    pub cgroups: crate::cgroup::Cgroups,
}

/// The prefix of the jailer's report line (followed by the report as JSON).
pub const READY_PREFIX: &str = "kiln-jailer: ready ";
/// The prefix of the jailer's failure line (followed by the reason).
pub const ERROR_PREFIX: &str = "kiln-jailer: error: ";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("jail path {0} must be absolute and plain (no `..`, no `.`)")]
    NotPlain(PathBuf),
    #[error("jail path {0} is not UTF-8")]
    NotUtf8(PathBuf),
    #[error("jail limit {what} must be positive")]
    ZeroLimit { what: &'static str },
    #[error("a jail keeps at most {MAX_KEPT_FDS} descriptors, not {0}")]
    TooManyFds(u32),
    #[error("jail uids {0:?}: give FIRST-LAST inside {UID_BASE}-{UID_LAST} (kiln's range)")]
    Uids(String),
    #[error("jail cgroup root {0:?}: give a directory name of letters, digits, `.`, `_` or `-` (at most 64)")]
    CgroupRoot(String),
}

impl JailSpec {
    /// Refuses relative or dotted paths (a bind mount of `..` would widen the view) and
    /// zero limits (a zero in a cgroup file means something else per controller).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.keep_fds > MAX_KEPT_FDS {
            return Err(SpecError::TooManyFds(self.keep_fds));
        }
        let paths = std::iter::once(&self.program)
            .chain(&self.owned_dirs)
            .chain(&self.read_only)
            .chain(&self.devices);
        for p in paths {
            check_plain(p)?;
        }
        self.partition.validate()?;
        let l = &self.limits;
        for (what, v) in [
            ("memoryBytes", l.memory_bytes),
            ("pids", l.pids),
            ("cpuQuotaUs", l.cpu_quota_us),
            ("cpuPeriodUs", l.cpu_period_us),
        ] {
            if v == 0 {
                return Err(SpecError::ZeroLimit { what });
            }
        }
        Ok(())
    }
}

fn check_plain(p: &Path) -> Result<(), SpecError> {
    let Some(text) = p.to_str() else {
        return Err(SpecError::NotUtf8(p.to_path_buf()));
    };
    // Checked on the text: `Path::components` would quietly drop a `.`.
    let plain = text.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
    });
    if plain {
        Ok(())
    } else {
        Err(SpecError::NotPlain(p.to_path_buf()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JailSpec {
        JailSpec {
            program: "/usr/bin/qemu-system-x86_64".into(),
            args: vec!["-nodefaults".into()],
            owned_dirs: vec!["/var/lib/kiln/run/a".into()],
            read_only: vec!["/var/lib/kiln/assets/kernel/vmlinux".into()],
            devices: vec![],
            limits: Limits::new(768 << 20, 256, 1.0),
            die_with_parent: true,
            host_network: false,
            keep_fds: 0,
            partition: Partition::default(),
        }
    }

    #[test]
    fn partitions_take_a_range_inside_kilns_and_a_plain_cgroup_name() {
        let p = Partition::new(Some("1900000100-1900000199"), Some("kiln-a")).unwrap();
        assert_eq!((p.uid_first, p.uid_count), (1_900_000_100, 100));
        assert_eq!(p.uid_range(), "1900000100-1900000199");
        assert_eq!(Partition::new(None, None).unwrap(), Partition::default());
        for bad in [
            "1000-2000",
            "1900000200-1900000100",
            "x-y",
            "1900000000",
            "1900000000-1900065536",
        ] {
            assert!(
                matches!(Partition::new(Some(bad), None), Err(SpecError::Uids(_))),
                "{bad}"
            );
        }
        for bad in ["", "..", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(
                matches!(
                    Partition::new(None, Some(bad)),
                    Err(SpecError::CgroupRoot(_))
                ),
                "{bad:?}"
            );
        }
        let mut s = spec();
        s.partition.cgroup_root = "../escape".into();
        assert!(s.validate().is_err(), "the jailer refuses it too");
    }

    #[test]
    fn plain_absolute_paths_pass_and_round_trip() {
        let s = spec();
        s.validate().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<JailSpec>(&json).unwrap(), s);
        assert!(json.contains("\"ownedDirs\""), "{json}");
    }

    #[test]
    fn dotted_relative_or_root_paths_are_refused() {
        for bad in [
            "/var/lib/kiln/run/../..",
            "run/a",
            "/",
            "/var/./lib",
            "/var//lib",
            "/var/",
        ] {
            let mut s = spec();
            s.read_only.push(bad.into());
            assert_eq!(s.validate(), Err(SpecError::NotPlain(bad.into())), "{bad}");
        }
    }

    #[test]
    fn zero_limits_and_too_many_descriptors_are_refused() {
        let mut s = spec();
        s.limits.pids = 0;
        assert_eq!(s.validate(), Err(SpecError::ZeroLimit { what: "pids" }));
        let mut s = spec();
        s.keep_fds = MAX_KEPT_FDS + 1;
        assert_eq!(s.validate(), Err(SpecError::TooManyFds(MAX_KEPT_FDS + 1)));
        s.keep_fds = 1;
        s.owned_dirs.clear();
        s.validate().expect("a helper may own no directory");
    }

    #[test]
    fn older_specs_without_network_or_descriptors_still_parse() {
        let mut json: serde_json::Value = serde_json::to_value(spec()).unwrap();
        let obj = json.as_object_mut().unwrap();
        obj.remove("hostNetwork");
        obj.remove("keepFds");
        let s: JailSpec = serde_json::from_value(json).unwrap();
        assert!(!s.host_network);
        assert_eq!(s.keep_fds, 0);
    }

    #[test]
    fn quotas_follow_cpus_with_the_kernel_minimum() {
        assert_eq!(quota_for(1.0), 100_000);
        assert_eq!(quota_for(0.25), 25_000);
        assert_eq!(quota_for(4.0), 400_000);
        assert_eq!(quota_for(0.0), 1_000);
    }
}
