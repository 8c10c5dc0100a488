//! Memory diffs: the pages of a template-launched guest that differ from its template, saved
//! and applied by kiln itself.
//!
//! A guest launched from a template maps the template's RAM file privately: every page it
//! never wrote is still the file's page (shared with every other clone through the page
//! cache), every page it wrote is a private copy. `/proc/<qemu>/pagemap` says which pages
//! are private, so a suspend reads only those (through `/proc/<qemu>/mem`, QEMU stopped),
//! drops the ones still equal to the template, and writes the rest. A resume maps the
//! template privately again and writes only the diff into the new QEMU before its device
//! state loads: clean pages stay shared.
//!
//! The file (`memory.diff`): a 4 KiB header, the changed pages' contents in page order, then
//! the index (page numbers of the data pages, then of the pages that became zero), all
//! little-endian. The checksum in the snapshot's manifest covers everything after the
//! header, computed as it is written and as it is read back.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const PAGE: usize = 4096;
const MAGIC: &[u8; 8] = b"KILNMEMD";
const VERSION: u32 = 1;
/// Pages read, compared and written per batch.
const BATCH_PAGES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU (pid {pid}) maps no {len}-byte private view of {base}: is it launched from that template?")]
    NoMapping { pid: u32, base: PathBuf, len: u64 },
    #[error("memory diff {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// What a diff holds, recorded in the snapshot's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffSummary {
    /// The template RAM file the diff applies to.
    pub base: String,
    /// Its size (the guest's RAM).
    pub ram_bytes: u64,
    /// Pages whose contents are in the file.
    pub data_pages: u64,
    /// Pages that became zero (their contents are not stored).
    pub zero_pages: u64,
    /// Pages the guest held privately when it was saved (its touched set).
    pub private_pages: u64,
    /// The file's size.
    pub file_bytes: u64,
    /// SHA-256 of everything after the header.
    pub sha256: String,
}

/// The header of a diff file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ram_bytes: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
}

impl Header {
    fn encode(&self) -> [u8; PAGE] {
        let mut out = [0u8; PAGE];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(PAGE as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.ram_bytes.to_le_bytes());
        out[24..32].copy_from_slice(&self.data_pages.to_le_bytes());
        out[32..40].copy_from_slice(&self.zero_pages.to_le_bytes());
        out
    }

    /// Parses and bounds a header: every count fits the RAM it describes.
    pub fn parse(bytes: &[u8]) -> Result<Header, String> {
        if bytes.len() < 40 || &bytes[..8] != MAGIC {
            return Err("not a kiln memory diff".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        if u32_at(8) != VERSION {
            return Err(format!(
                "format version {} (this kiln reads {VERSION})",
                u32_at(8)
            ));
        }
        if u32_at(12) as usize != PAGE {
            return Err(format!("page size {}", u32_at(12)));
        }
        let header = Header {
            ram_bytes: u64_at(16),
            data_pages: u64_at(24),
            zero_pages: u64_at(32),
        };
        let pages = header.ram_pages();
        if !header.ram_bytes.is_multiple_of(PAGE as u64) || pages > u64::from(u32::MAX) {
            return Err(format!(
                "RAM size {} is not a page multiple below 16 TiB",
                header.ram_bytes
            ));
        }
        if header.data_pages.saturating_add(header.zero_pages) > pages {
            return Err("more pages listed than the RAM holds".into());
        }
        Ok(header)
    }

    pub fn ram_pages(&self) -> u64 {
        self.ram_bytes / PAGE as u64
    }

    fn index_offset(&self) -> u64 {
        PAGE as u64 + self.data_pages * PAGE as u64
    }

    fn file_bytes(&self) -> u64 {
        self.index_offset() + (self.data_pages + self.zero_pages) * 4
    }
}

/// Parses the index (data page numbers, then zero page numbers): each list strictly
/// ascending, every page inside the RAM, no page in both.
pub fn parse_index(header: &Header, bytes: &[u8]) -> Result<(Vec<u32>, Vec<u32>), String> {
    let count =
        usize::try_from(header.data_pages + header.zero_pages).map_err(|e| e.to_string())?;
    if bytes.len() != count * 4 {
        return Err(format!(
            "index holds {} bytes, the header says {}",
            bytes.len(),
            count * 4
        ));
    }
    let pages: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let (data, zero) = pages.split_at(header.data_pages as usize);
    for list in [data, zero] {
        if list.windows(2).any(|w| w[0] >= w[1]) {
            return Err("page numbers out of order".into());
        }
        if list
            .last()
            .is_some_and(|&p| u64::from(p) >= header.ram_pages())
        {
            return Err("a page beyond the RAM".into());
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < data.len() && j < zero.len() {
        match data[i].cmp(&zero[j]) {
            std::cmp::Ordering::Equal => return Err(format!("page {} listed twice", data[i])),
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
        }
    }
    Ok((data.to_vec(), zero.to_vec()))
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DiffError + 'a {
    move |source| DiffError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A guest's RAM as QEMU maps it: the private view of a template RAM file.
#[derive(Debug, Clone)]
pub struct GuestRam {
    pid: u32,
    start: u64,
    len: u64,
    base: PathBuf,
}

impl GuestRam {
    /// Finds QEMU's mapping of `base` (by device and inode, so a jail's other view of the
    /// path does not matter): offset 0, `len` bytes, private and writable.
    pub fn find(pid: u32, base: &Path, len: u64) -> Result<GuestRam, DiffError> {
        let meta = std::fs::metadata(base).map_err(io("reading", base))?;
        let (ino, dev) = (meta.ino(), meta.dev());
        let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
        let maps = std::fs::read_to_string(&maps_path).map_err(io("reading", &maps_path))?;
        let found = maps.lines().find_map(|line| {
            let mapping = Mapping::parse(line)?;
            (mapping.inode == ino
                && mapping.dev == (major(dev), minor(dev))
                && mapping.offset == 0
                && mapping.end - mapping.start == len
                && mapping.perms.starts_with("rw")
                && mapping.perms.ends_with('p'))
            .then_some(mapping.start)
        });
        let start = found.ok_or_else(|| DiffError::NoMapping {
            pid,
            base: base.to_path_buf(),
            len,
        })?;
        Ok(GuestRam {
            pid,
            start,
            len,
            base: base.to_path_buf(),
        })
    }

    fn pages(&self) -> u64 {
        self.len / PAGE as u64
    }

    /// The pages QEMU holds privately (written since the mapping was made), ascending:
    /// present and not file-backed, or swapped out.
    pub fn private_pages(&self) -> Result<Vec<u32>, DiffError> {
        let path = PathBuf::from(format!("/proc/{}/pagemap", self.pid));
        let file = File::open(&path).map_err(io("opening", &path))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8 * 8192];
        let first = self.start / PAGE as u64;
        let mut page = 0u64;
        while page < self.pages() {
            let n = (self.pages() - page).min(8192) as usize;
            let chunk = &mut buf[..n * 8];
            file.read_exact_at(chunk, (first + page) * 8)
                .map_err(io("reading", &path))?;
            for (i, entry) in chunk.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(entry.try_into().unwrap_or([0; 8]));
                let (present, swapped, file_page) = (e >> 63 & 1, e >> 62 & 1, e >> 61 & 1);
                if (present == 1 && file_page == 0) || swapped == 1 {
                    out.push((page + i as u64) as u32);
                }
            }
            page += n as u64;
        }
        Ok(out)
    }

    fn mem(&self, write: bool) -> Result<(File, PathBuf), DiffError> {
        let path = PathBuf::from(format!("/proc/{}/mem", self.pid));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path)
            .map_err(io("opening", &path))?;
        Ok((file, path))
    }

    /// Writes the guest's pages that differ from the template to a new file at `out`
    /// (QEMU must be stopped). The file is fsynced before this returns.
    pub fn save(&self, out: &Path) -> Result<DiffSummary, DiffError> {
        let private = self.private_pages()?;
        let (mem, mem_path) = self.mem(false)?;
        let base = File::open(&self.base).map_err(io("opening", &self.base))?;
        let file = create_private(out)?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        writer
            .seek(SeekFrom::Start(PAGE as u64))
            .map_err(io("writing", out))?;
        let mut hash = Sha256::new();
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        let mut guest = vec![0u8; BATCH_PAGES * PAGE];
        let mut template = vec![0u8; BATCH_PAGES * PAGE];
        for run in runs(&private, BATCH_PAGES) {
            let (first, count) = (run[0], run.len());
            let bytes = count * PAGE;
            let offset = u64::from(first) * PAGE as u64;
            mem.read_exact_at(&mut guest[..bytes], self.start + offset)
                .map_err(io("reading guest memory from", &mem_path))?;
            base.read_exact_at(&mut template[..bytes], offset)
                .map_err(io("reading", &self.base))?;
            for i in 0..count {
                let page = &guest[i * PAGE..(i + 1) * PAGE];
                if page == &template[i * PAGE..(i + 1) * PAGE] {
                    continue;
                }
                if page.iter().all(|&b| b == 0) {
                    zero.push(first + i as u32);
                } else {
                    data.push(first + i as u32);
                    hash.update(page);
                    writer.write_all(page).map_err(io("writing", out))?;
                }
            }
        }
        let mut index = Vec::with_capacity((data.len() + zero.len()) * 4);
        for p in data.iter().chain(&zero) {
            index.extend_from_slice(&p.to_le_bytes());
        }
        hash.update(&index);
        writer.write_all(&index).map_err(io("writing", out))?;
        let header = Header {
            ram_bytes: self.len,
            data_pages: data.len() as u64,
            zero_pages: zero.len() as u64,
        };
        let file = writer.into_inner().map_err(|e| DiffError::Io {
            what: "writing",
            path: out.to_path_buf(),
            source: e.into_error(),
        })?;
        file.write_all_at(&header.encode(), 0)
            .map_err(io("writing", out))?;
        file.sync_all().map_err(io("syncing", out))?;
        Ok(DiffSummary {
            base: self.base.to_string_lossy().into_owned(),
            ram_bytes: self.len,
            data_pages: header.data_pages,
            zero_pages: header.zero_pages,
            private_pages: private.len() as u64,
            file_bytes: header.file_bytes(),
            sha256: hex::encode(hash.finalize()),
        })
    }

    /// Writes the diff at `path` into the guest (QEMU started, its state not yet loaded),
    /// after checking it against `expected` (from the manifest). Pages it does not list stay
    /// the template's, shared.
    pub fn apply(&self, path: &Path, expected: &DiffSummary) -> Result<(), DiffError> {
        let (mem, mem_path) = self.mem(true)?;
        let target = Target {
            file: &mem,
            path: &mem_path,
            start: self.start,
            len: self.len,
        };
        apply_into(path, expected, &target)
    }
}

/// Where a diff's pages are written: a guest's memory, or a RAM file.
struct Target<'a> {
    file: &'a File,
    path: &'a Path,
    /// The offset of guest page 0 in `file`.
    start: u64,
    /// The RAM's size.
    len: u64,
}

/// Writes the diff at `path` into `target`, checking it against `expected` (its size and
/// page counts before anything is written, its checksum as it is read).
fn apply_into(path: &Path, expected: &DiffSummary, target: &Target) -> Result<(), DiffError> {
    let invalid = |reason: String| DiffError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io("opening", path))?;
    let mut head = [0u8; PAGE];
    file.read_exact_at(&mut head, 0)
        .map_err(io("reading", path))?;
    let header = Header::parse(&head).map_err(invalid)?;
    let size = file.metadata().map_err(io("reading", path))?.len();
    if header.ram_bytes != target.len
        || header.data_pages != expected.data_pages
        || header.zero_pages != expected.zero_pages
        || size != header.file_bytes()
        || size != expected.file_bytes
    {
        return Err(invalid(format!(
            "{size} bytes for {} data and {} zero pages of {} bytes of RAM: not what the snapshot recorded",
            header.data_pages, header.zero_pages, header.ram_bytes
        )));
    }
    let mut index = vec![0u8; (size - header.index_offset()) as usize];
    file.read_exact_at(&mut index, header.index_offset())
        .map_err(io("reading", path))?;
    let (data, zero) = parse_index(&header, &index).map_err(invalid)?;
    let write = |bytes: &[u8], page: u32| {
        target
            .file
            .write_all_at(bytes, target.start + u64::from(page) * PAGE as u64)
            .map_err(io("writing guest memory to", target.path))
    };
    // The checksum is computed on a second thread while the pages are written (the file is
    // read twice, from the page cache): it is known before anything runs the guest, and it
    // costs the restore no time of its own.
    let digest = std::thread::scope(|scope| {
        let hasher = scope.spawn(|| digest_of(&file, path, header.index_offset(), &index));
        let mut buf = vec![0u8; BATCH_PAGES * PAGE];
        let mut at = PAGE as u64;
        for run in runs(&data, BATCH_PAGES) {
            let bytes = run.len() * PAGE;
            file.read_exact_at(&mut buf[..bytes], at)
                .map_err(io("reading", path))?;
            write(&buf[..bytes], run[0])?;
            at += bytes as u64;
        }
        hasher
            .join()
            .unwrap_or_else(|_| Err(invalid("checking its checksum panicked".into())))
    })?;
    if digest != expected.sha256 {
        return Err(invalid(
            "its checksum does not match the snapshot's manifest: the snapshot is corrupt".into(),
        ));
    }
    let zeros = vec![0u8; BATCH_PAGES * PAGE];
    for run in runs(&zero, BATCH_PAGES) {
        write(&zeros[..run.len() * PAGE], run[0])?;
    }
    Ok(())
}

/// SHA-256 of a diff file's page data (from the first page after the header to
/// `data_end`) and then its `index`, as [`GuestRam::save`] computed it.
fn digest_of(file: &File, path: &Path, data_end: u64, index: &[u8]) -> Result<String, DiffError> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; BATCH_PAGES * PAGE];
    let mut at = PAGE as u64;
    while at < data_end {
        let n = ((data_end - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)
            .map_err(io("reading", path))?;
        hash.update(&buf[..n]);
        at += n as u64;
    }
    hash.update(index);
    Ok(hex::encode(hash.finalize()))
}

/// Writes a new RAM file at `out`: the template RAM `base` with the diff at `diff` (checked
/// against `expected`) applied: a guest's memory as it was saved, standalone. Holes in
/// `base` stay holes. On failure `out` is removed. The file is fsynced before this returns.
pub fn materialize(
    base: &Path,
    diff: &Path,
    expected: &DiffSummary,
    out: &Path,
) -> Result<(), DiffError> {
    let result = (|| {
        let from = File::open(base).map_err(io("opening", base))?;
        let len = from.metadata().map_err(io("reading", base))?.len();
        if len != expected.ram_bytes {
            return Err(DiffError::Invalid {
                path: diff.to_path_buf(),
                reason: format!(
                    "it is for {} bytes of RAM, the template {} holds {len}",
                    expected.ram_bytes,
                    base.display()
                ),
            });
        }
        let to = create_private(out)?;
        copy_sparse(&from, base, &to, out, len)?;
        let target = Target {
            file: &to,
            path: out,
            start: 0,
            len,
        };
        apply_into(diff, expected, &target)?;
        to.sync_all().map_err(io("syncing", out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

/// Copies the `len` bytes of `from` into the empty `to`, skipping holes.
fn copy_sparse(
    from: &File,
    from_path: &Path,
    to: &File,
    to_path: &Path,
    len: u64,
) -> Result<(), DiffError> {
    use std::os::fd::AsRawFd;
    to.set_len(len).map_err(io("writing", to_path))?;
    let seek = |offset: u64, whence: libc::c_int| {
        // SAFETY: lseek on a file descriptor this function borrows; it touches no memory.
        let r = unsafe { libc::lseek(from.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `offset`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        } else {
            Ok(Some(r as u64))
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA).map_err(io("reading", from_path))? else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)
            .map_err(io("reading", from_path))?
            .unwrap_or(len)
            .min(len);
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], at)
                .map_err(io("reading", from_path))?;
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], at)
                    .map_err(io("writing", to_path))?;
            }
            at += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// What QEMU's mapping of the guest's RAM holds (`/proc/<pid>/smaps`), in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RamUsage {
    /// Resident.
    pub rss: u64,
    /// Proportional: each page divided by the processes mapping it.
    pub pss: u64,
    /// Resident pages other processes map too (the template's file pages other clones use).
    pub shared: u64,
    /// Resident pages only this QEMU maps (its written pages, and file pages no one else uses).
    pub private: u64,
    /// Anonymous: the pages it wrote (copies of the template's).
    pub anonymous: u64,
}

impl GuestRam {
    /// Reads this mapping's entry in `/proc/<pid>/smaps`.
    pub fn usage(&self) -> Result<RamUsage, DiffError> {
        let path = PathBuf::from(format!("/proc/{}/smaps", self.pid));
        let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
        Ok(parse_smaps_entry(&text, self.start).unwrap_or_default())
    }
}

/// The fields of the `smaps` entry of the mapping that starts at `start`.
pub(crate) fn parse_smaps_entry(text: &str, start: u64) -> Option<RamUsage> {
    let mut lines = text.lines();
    lines.find(|l| Mapping::parse(l).is_some_and(|m| m.start == start))?;
    let mut usage = RamUsage::default();
    for line in lines {
        if Mapping::parse(line).is_some() {
            break;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib = rest.trim().trim_end_matches("kB").trim().parse::<u64>();
        let Ok(bytes) = kib.map(|k| k * 1024) else {
            continue;
        };
        match key {
            "Rss" => usage.rss = bytes,
            "Pss" => usage.pss = bytes,
            "Shared_Clean" | "Shared_Dirty" => usage.shared += bytes,
            "Private_Clean" | "Private_Dirty" => usage.private += bytes,
            "Anonymous" => usage.anonymous = bytes,
            _ => {}
        }
    }
    Some(usage)
}

/// Where the mapping a `maps` line describes starts (None: not such a line).
pub(crate) fn mapping_start(line: &str) -> Option<u64> {
    Mapping::parse(line).map(|m| m.start)
}

/// Creates `out`, which must not exist (a link there is not followed), readable by root only.
fn create_private(out: &Path) -> Result<File, DiffError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(out)
        .map_err(io("creating", out))
}

/// Splits ascending page numbers into runs of consecutive pages, each at most `max` long.
fn runs(pages: &[u32], max: usize) -> impl Iterator<Item = &[u32]> {
    let mut rest = pages;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut n = 1;
        while n < rest.len() && n < max && rest[n] == rest[n - 1] + 1 {
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping<'a> {
    start: u64,
    end: u64,
    perms: &'a str,
    offset: u64,
    dev: (u64, u64),
    inode: u64,
}

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Mapping<'a>> {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?;
        let offset = fields.next()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let inode = fields.next()?;
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        Some(Mapping {
            start: hex(start)?,
            end: hex(end)?,
            perms,
            offset: hex(offset)?,
            dev: (hex(major)?, hex(minor)?),
            inode: inode.parse().ok()?,
        })
    }
}

/// The major number of a Linux `dev_t` (glibc's encoding).
fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

/// The minor number of a Linux `dev_t`.
fn minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A diff file written by hand: `data` pages filled with their byte, `zero` pages.
    fn write_diff(path: &Path, ram_bytes: u64, data: &[(u32, u8)], zero: &[u32]) -> DiffSummary {
        let header = Header {
            ram_bytes,
            data_pages: data.len() as u64,
            zero_pages: zero.len() as u64,
        };
        let mut bytes = header.encode().to_vec();
        bytes.resize(PAGE, 0);
        let mut hash = Sha256::new();
        for (_, fill) in data {
            let page = vec![*fill; PAGE];
            hash.update(&page);
            bytes.extend_from_slice(&page);
        }
        let mut index = Vec::new();
        for p in data.iter().map(|(p, _)| p).chain(zero) {
            index.extend_from_slice(&p.to_le_bytes());
        }
        hash.update(&index);
        bytes.extend_from_slice(&index);
        std::fs::write(path, &bytes).unwrap();
        DiffSummary {
            base: String::new(),
            ram_bytes,
            data_pages: header.data_pages,
            zero_pages: header.zero_pages,
            private_pages: 0,
            file_bytes: bytes.len() as u64,
            sha256: hex::encode(hash.finalize()),
        }
    }

    #[test]
    fn materialize_applies_a_diff_to_a_copy_of_the_template() {
        let dir = tempfile::tempdir().unwrap();
        let (base, diff, out) = (
            dir.path().join("ram"),
            dir.path().join("diff"),
            dir.path().join("out"),
        );
        let ram = 64 * PAGE as u64;
        let f = File::create(&base).unwrap();
        f.set_len(ram).unwrap();
        f.write_all_at(&[0x11; PAGE], 3 * PAGE as u64).unwrap();
        f.write_all_at(&[0x22; PAGE], 40 * PAGE as u64).unwrap();
        let summary = write_diff(&diff, ram, &[(1, 0xaa), (2, 0xbb)], &[3]);
        materialize(&base, &diff, &summary, &out).unwrap();
        let got = std::fs::read(&out).unwrap();
        let page = |n: usize| &got[n * PAGE..(n + 1) * PAGE];
        assert_eq!(got.len() as u64, ram);
        assert!(page(1).iter().all(|&b| b == 0xaa) && page(2).iter().all(|&b| b == 0xbb));
        assert!(
            page(3).iter().all(|&b| b == 0),
            "a page that became zero is zero"
        );
        assert!(
            page(40).iter().all(|&b| b == 0x22),
            "the template's pages stay"
        );
        assert!(page(0).iter().all(|&b| b == 0));
        // The template is untouched, and the copy kept its holes.
        assert!(std::fs::read(&base).unwrap()[3 * PAGE..4 * PAGE]
            .iter()
            .all(|&b| b == 0x11));
        let blocks = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(blocks < ram, "{blocks} bytes allocated for {ram} of RAM");

        // A diff whose contents do not match its checksum leaves no file behind.
        std::fs::remove_file(&out).unwrap();
        let mut bad = summary.clone();
        bad.sha256 = "0".repeat(64);
        let err = materialize(&base, &diff, &bad, &out).unwrap_err();
        assert!(err.to_string().contains("invalid"), "{err}");
        assert!(!out.exists());
        // So does one for another RAM size.
        let mut other = summary;
        other.ram_bytes = ram * 2;
        assert!(materialize(&base, &diff, &other, &out).is_err());
        assert!(!out.exists());
    }

    #[test]
    fn runs_split_at_gaps_and_length() {
        let pages = [1, 2, 3, 7, 8, 20];
        let got: Vec<&[u32]> = runs(&pages, 2).collect();
        assert_eq!(got, vec![&[1, 2][..], &[3], &[7, 8], &[20]]);
        assert_eq!(runs(&[], 4).count(), 0);
    }

    #[test]
    fn maps_lines_parse() {
        let line = "7f1234000000-7f1254000000 rw-p 00000000 fe:01 1234567                    /var/lib/kiln/t/memory.ram";
        let m = Mapping::parse(line).unwrap();
        assert_eq!(m.end - m.start, 0x2000_0000);
        assert_eq!(
            (m.perms, m.offset, m.dev, m.inode),
            ("rw-p", 0, (0xfe, 1), 1234567)
        );
        assert!(Mapping::parse("garbage").is_none());
    }

    #[test]
    fn smaps_entries_are_read_for_their_mapping_only() {
        let text = "\
7f0000000000-7f0020000000 rw-p 00000000 fe:01 42 /t/memory.ram
Size:             524288 kB
Rss:               90000 kB
Pss:               50000 kB
Shared_Clean:      80000 kB
Shared_Dirty:          0 kB
Private_Clean:      2000 kB
Private_Dirty:      8000 kB
Anonymous:          8000 kB
7f0020000000-7f0020001000 rw-p 00000000 00:00 0
Rss:                   4 kB
";
        let u = parse_smaps_entry(text, 0x7f00_0000_0000).unwrap();
        assert_eq!(u.rss, 90000 * 1024);
        assert_eq!(
            (u.shared, u.private, u.anonymous),
            (80000 * 1024, 10000 * 1024, 8000 * 1024)
        );
        assert!(parse_smaps_entry(text, 1).is_none());
    }

    #[test]
    fn dev_numbers_split_like_glibc() {
        // makedev(259, 3) = 0x10303 in glibc's encoding.
        assert_eq!((major(0x10303), minor(0x10303)), (259, 3));
        assert_eq!((major(0xfe01), minor(0xfe01)), (0xfe, 1));
    }

    #[test]
    fn headers_round_trip_and_bound_their_counts() {
        let h = Header {
            ram_bytes: 512 << 20,
            data_pages: 10,
            zero_pages: 3,
        };
        assert_eq!(Header::parse(&h.encode()), Ok(h));
        let too_many = Header {
            ram_bytes: 8 * PAGE as u64,
            data_pages: 6,
            zero_pages: 3,
        };
        assert!(Header::parse(&too_many.encode()).is_err());
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Header::parse(&bad).is_err());
        assert!(Header::parse(&[0; 10]).is_err());
    }

    #[test]
    fn indexes_must_be_ordered_inside_and_disjoint() {
        let h = Header {
            ram_bytes: 16 * PAGE as u64,
            data_pages: 2,
            zero_pages: 1,
        };
        let enc = |p: &[u32]| p.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(parse_index(&h, &enc(&[1, 5, 2])), Ok((vec![1, 5], vec![2])));
        assert!(parse_index(&h, &enc(&[5, 1, 2])).is_err(), "order");
        assert!(parse_index(&h, &enc(&[1, 16, 2])).is_err(), "beyond RAM");
        assert!(parse_index(&h, &enc(&[1, 5, 5])).is_err(), "both lists");
        assert!(parse_index(&h, &enc(&[1, 5])).is_err(), "short");
    }
}
