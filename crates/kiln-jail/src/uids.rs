//! The uid range: one lock file for the whole machine (every kiln home shares it), one byte
//! of it per slot. A jail holds its slot's lock for as long as its jailer lives; the kernel
//! drops the lock when that process ends, however it ends, so a crash never leaks a uid.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::spec::{Partition, UID_BASE, UID_SLOTS};
use crate::sys;

/// Where the lock file lives (root's tmpfs: it is forgotten at reboot, when no jail runs).
pub fn lock_path() -> PathBuf {
    std::env::var_os("KILN_JAIL_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/kiln/jail"))
        .join("uids.lock")
}

fn open() -> io::Result<File> {
    let path = lock_path();
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
}

/// A held uid slot: dropping it (or the process ending) frees the uid.
pub struct Slot {
    file: File,
    index: u32,
}

impl Slot {
    pub fn uid(&self) -> u32 {
        UID_BASE + self.index
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = sys::unlock_byte(&self.file, self.index);
    }
}

/// Takes the first free uid of `partition`.
pub fn take(partition: &Partition) -> io::Result<Slot> {
    let file = open()?;
    let first = partition.uid_first.saturating_sub(UID_BASE);
    let end = first.saturating_add(partition.uid_count).min(UID_SLOTS);
    for index in first..end {
        if sys::try_lock_byte(&file, index)? {
            return Ok(Slot { file, index });
        }
    }
    Err(io::Error::other(format!(
        "all jail uids {} are in use",
        partition.uid_range()
    )))
}

/// Whether no jail holds `uid` now.
pub fn is_free(uid: u32) -> bool {
    let Some(index) = uid.checked_sub(UID_BASE).filter(|i| *i < UID_SLOTS) else {
        return false;
    };
    let Ok(file) = open() else {
        return false;
    };
    match sys::try_lock_byte(&file, index) {
        Ok(true) => {
            let _ = sys::unlock_byte(&file, index);
            true
        }
        _ => false,
    }
}

/// The uids jails hold now (for `kiln doctor` and leak checks).
pub fn in_use(limit: u32) -> Vec<u32> {
    let Ok(file) = open() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for index in 0..limit.min(UID_SLOTS) {
        match sys::try_lock_byte(&file, index) {
            Ok(true) => {
                let _ = sys::unlock_byte(&file, index);
            }
            Ok(false) => out.push(UID_BASE + index),
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_slots_differ_and_a_dropped_one_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY of the test: this variable is read only by this module's functions, and the
        // other tests of this crate do not take slots.
        std::env::set_var("KILN_JAIL_RUN_DIR", dir.path());
        let all = Partition::default();
        let a = take(&all).unwrap();
        let b = take(&all).unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(!is_free(a.uid()) && !is_free(b.uid()));
        assert!(in_use(4).contains(&a.uid()));
        let uid = a.uid();
        drop(a);
        assert!(is_free(uid));
        let c = take(&all).unwrap();
        assert_eq!(c.uid(), uid, "the lowest free slot is reused");
        assert!(!is_free(UID_BASE - 1), "outside the range is never free");

        // A partition's slots come from its own range, and the lock stays machine-wide: a
        // range overlapping a held uid skips it.
        let upper = Partition::new(Some(&format!("{}-{}", b.uid(), b.uid() + 1)), None).unwrap();
        let d = take(&upper).unwrap();
        assert_eq!(d.uid(), b.uid() + 1, "b's uid is held, so the next one");
        assert!(take(&upper).is_err(), "both uids of the range are held");
    }
}
