//! Build contexts: a zip (the seed's flow), a tar, or a directory, unpacked into a private
//! directory with every entry checked: no absolute paths, no `..`, no entry inside a
//! symlink, size and count limits, `.dockerignore` honoured. Symlinks are recorded, never
//! followed on the host.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy)]
pub struct ContextLimits {
    pub max_total_bytes: u64,
    pub max_entries: usize,
}

impl Default for ContextLimits {
    fn default() -> Self {
        ContextLimits {
            max_total_bytes: 512 * 1024 * 1024,
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("Reading the build context {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The build context {0} is not a directory, a .zip or a .tar")]
    UnknownFormat(PathBuf),
    #[error("The zip build context is corrupt")]
    Zip(#[from] zip::result::ZipError),
    #[error("Build context entry {entry:?} is unsafe: {reason}")]
    UnsafeEntry { entry: String, reason: &'static str },
    #[error("The build context is over the {limit}-byte limit: leave large files out (.dockerignore) or raise the limit")]
    TooLarge { limit: u64 },
    #[error("The build context has over {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("{what} {source_path:?} is not in the build context")]
    Missing { what: String, source_path: String },
    #[error("Bad .dockerignore pattern {pattern:?}")]
    BadIgnore { pattern: String },
    #[error("Build context entry {entry:?}: its {what} is over {MAX_PATH_BYTES} bytes")]
    TooLong { entry: String, what: &'static str },
}

/// Longest entry name or symlink target (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File { size: u64, mode: u32 },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// An unpacked, validated build context.
#[derive(Debug)]
pub struct BuildContext {
    root: tempfile::TempDir,
    entries: BTreeMap<String, Entry>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContextError + '_ {
    move |source| ContextError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a path from an archive and returns it normalised (`a/b`, no leading `./`).
pub fn safe_relative(name: &str) -> Result<String, ContextError> {
    let unsafe_entry = |reason| ContextError::UnsafeEntry {
        entry: name.to_string(),
        reason,
    };
    if name.contains('\0') || name.contains('\\') {
        return Err(unsafe_entry("contains a NUL or a backslash"));
    }
    if name.starts_with('/') {
        return Err(unsafe_entry("absolute path"));
    }
    let mut parts = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(
                p.to_str()
                    .ok_or_else(|| unsafe_entry("not UTF-8"))?
                    .to_string(),
            ),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry("contains '..'")),
            _ => return Err(unsafe_entry("absolute path")),
        }
    }
    Ok(parts.join("/"))
}

struct Unpacker {
    root: tempfile::TempDir,
    entries: BTreeMap<String, Entry>,
    total: u64,
    limits: ContextLimits,
}

impl Unpacker {
    fn new(limits: ContextLimits) -> Result<Self, ContextError> {
        let root = tempfile::Builder::new()
            .prefix("kiln-context-")
            .tempdir()
            .map_err(io(Path::new("/tmp")))?;
        Ok(Unpacker {
            root,
            entries: BTreeMap::new(),
            total: 0,
            limits,
        })
    }

    fn check_parents(&mut self, rel: &str) -> Result<(), ContextError> {
        let mut prefix = String::new();
        for part in rel
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, p)| p)
            .unwrap_or(&[])
        {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            match self.entries.get(&prefix) {
                Some(Entry::Symlink { .. }) => {
                    return Err(ContextError::UnsafeEntry {
                        entry: rel.to_string(),
                        reason: "inside a symlink",
                    })
                }
                Some(Entry::File { .. }) => {
                    return Err(ContextError::UnsafeEntry {
                        entry: rel.to_string(),
                        reason: "inside a file",
                    })
                }
                Some(Entry::Dir { .. }) => {}
                None => {
                    self.entries
                        .insert(prefix.clone(), Entry::Dir { mode: 0o755 });
                }
            }
        }
        std::fs::create_dir_all(
            self.root
                .path()
                .join(rel)
                .parent()
                .unwrap_or(self.root.path()),
        )
        .map_err(io(self.root.path()))
    }

    fn count(&self) -> Result<(), ContextError> {
        if self.entries.len() >= self.limits.max_entries {
            return Err(ContextError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    fn add_dir(&mut self, name: &str, mode: u32) -> Result<(), ContextError> {
        self.count()?;
        let rel = safe_relative(name)?;
        if rel.is_empty() {
            return Ok(());
        }
        self.check_parents(&rel)?;
        std::fs::create_dir_all(self.root.path().join(&rel)).map_err(io(self.root.path()))?;
        self.entries.insert(
            rel,
            Entry::Dir {
                mode: mode & 0o7777,
            },
        );
        Ok(())
    }

    fn add_file(
        &mut self,
        name: &str,
        mode: u32,
        reader: &mut dyn Read,
    ) -> Result<(), ContextError> {
        self.count()?;
        let rel = safe_relative(name)?;
        if rel.is_empty() {
            return Err(ContextError::UnsafeEntry {
                entry: name.to_string(),
                reason: "empty name",
            });
        }
        self.check_parents(&rel)?;
        if self.entries.contains_key(&rel) {
            return Err(ContextError::UnsafeEntry {
                entry: rel,
                reason: "appears twice",
            });
        }
        let path = self.root.path().join(&rel);
        let mut file = std::fs::File::create(&path).map_err(io(&path))?;
        let remaining = self.limits.max_total_bytes - self.total;
        let copied =
            std::io::copy(&mut reader.take(remaining + 1), &mut file).map_err(io(&path))?;
        if copied > remaining {
            return Err(ContextError::TooLarge {
                limit: self.limits.max_total_bytes,
            });
        }
        self.total += copied;
        self.entries.insert(
            rel,
            Entry::File {
                size: copied,
                mode: mode & 0o7777,
            },
        );
        Ok(())
    }

    fn add_symlink(&mut self, name: &str, target: &str) -> Result<(), ContextError> {
        self.count()?;
        if target.len() > MAX_PATH_BYTES {
            return Err(ContextError::TooLong {
                entry: name.chars().take(200).collect(),
                what: "symlink target",
            });
        }
        let rel = safe_relative(name)?;
        self.check_parents(&rel)?;
        self.entries.insert(
            rel,
            Entry::Symlink {
                target: target.to_string(),
            },
        );
        Ok(())
    }

    fn finish(self) -> Result<BuildContext, ContextError> {
        let mut ctx = BuildContext {
            root: self.root,
            entries: self.entries,
        };
        ctx.apply_dockerignore()?;
        Ok(ctx)
    }
}

impl BuildContext {
    /// A directory, a `.zip` or a `.tar` file.
    pub fn load(path: &Path, limits: ContextLimits) -> Result<BuildContext, ContextError> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        let name = path.to_string_lossy().to_ascii_lowercase();
        if meta.is_dir() {
            Self::from_dir(path, limits)
        } else if name.ends_with(".zip") {
            Self::from_zip(path, limits)
        } else if name.ends_with(".tar") {
            Self::from_tar(path, limits)
        } else {
            Err(ContextError::UnknownFormat(path.to_path_buf()))
        }
    }

    pub fn from_zip(path: &Path, limits: ContextLimits) -> Result<BuildContext, ContextError> {
        let file = std::fs::File::open(path).map_err(io(path))?;
        let mut archive = zip::ZipArchive::new(file)?;
        let mut un = Unpacker::new(limits)?;
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i)?;
            let name = entry.name().to_string();
            let mode = entry.unix_mode().unwrap_or(0o644);
            if name.len() > MAX_PATH_BYTES {
                return Err(ContextError::TooLong {
                    entry: name.chars().take(200).collect(),
                    what: "name",
                });
            }
            if mode & 0o170000 == 0o120000 {
                // A symlink's target is its (compressed, so possibly huge) content: bounded.
                let mut target = Vec::new();
                (&mut entry)
                    .take(MAX_PATH_BYTES as u64 + 1)
                    .read_to_end(&mut target)
                    .map_err(io(path))?;
                un.add_symlink(&name, &String::from_utf8_lossy(&target))?;
            } else if entry.is_dir() {
                un.add_dir(&name, mode)?;
            } else {
                un.add_file(&name, mode, &mut entry)?;
            }
        }
        un.finish()
    }

    pub fn from_tar(path: &Path, limits: ContextLimits) -> Result<BuildContext, ContextError> {
        let file = std::fs::File::open(path).map_err(io(path))?;
        let mut archive = tar::Archive::new(file);
        let mut un = Unpacker::new(limits)?;
        for entry in archive.entries().map_err(io(path))? {
            let mut entry = entry.map_err(io(path))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            if name.len() > MAX_PATH_BYTES {
                return Err(ContextError::TooLong {
                    entry: name.chars().take(200).collect(),
                    what: "name",
                });
            }
            let mode = entry.header().mode().unwrap_or(0o644);
            match entry.header().entry_type() {
                tar::EntryType::Directory => un.add_dir(&name, mode)?,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    un.add_file(&name, mode, &mut entry)?
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(io(path))?
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    un.add_symlink(&name, &target)?
                }
                _ => {
                    return Err(ContextError::UnsafeEntry {
                        entry: name,
                        reason: "not a file, directory or symlink",
                    })
                }
            }
        }
        un.finish()
    }

    pub fn from_dir(dir: &Path, limits: ContextLimits) -> Result<BuildContext, ContextError> {
        use std::os::unix::fs::PermissionsExt;
        let mut un = Unpacker::new(limits)?;
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let full = dir.join(&rel);
            let mut children: Vec<_> = std::fs::read_dir(&full)
                .map_err(io(&full))?
                .collect::<Result<_, _>>()
                .map_err(io(&full))?;
            children.sort_by_key(|e| e.file_name());
            for child in children {
                let child_rel = rel.join(child.file_name());
                let name = child_rel.to_string_lossy().into_owned();
                let meta = std::fs::symlink_metadata(child.path()).map_err(io(&child.path()))?;
                let mode = meta.permissions().mode();
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(child.path()).map_err(io(&child.path()))?;
                    un.add_symlink(&name, &target.to_string_lossy())?;
                } else if meta.is_dir() {
                    un.add_dir(&name, mode)?;
                    stack.push(child_rel);
                } else if meta.is_file() {
                    let mut f = std::fs::File::open(child.path()).map_err(io(&child.path()))?;
                    un.add_file(&name, mode, &mut f)?;
                }
            }
        }
        un.finish()
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// Reads a file of the context as text (the Dockerfile).
    pub fn read_text(&self, rel: &str, max_bytes: u64) -> Result<String, ContextError> {
        let rel = safe_relative(rel)?;
        match self.entries.get(&rel) {
            Some(Entry::File { size, .. }) if *size <= max_bytes => {
                let path = self.root.path().join(&rel);
                std::fs::read_to_string(&path).map_err(io(&path))
            }
            Some(Entry::File { .. }) => Err(ContextError::TooLarge { limit: max_bytes }),
            _ => Err(ContextError::Missing {
                what: "File".into(),
                source_path: rel,
            }),
        }
    }

    fn apply_dockerignore(&mut self) -> Result<(), ContextError> {
        let Some(Entry::File { .. }) = self.entries.get(".dockerignore") else {
            return Ok(());
        };
        let text =
            std::fs::read_to_string(self.root.path().join(".dockerignore")).unwrap_or_default();
        let rules = IgnoreRules::parse(&text)?;
        let ignored: Vec<String> = self
            .entries
            .keys()
            .filter(|p| {
                p.as_str() != "Dockerfile" && p.as_str() != ".dockerignore" && rules.ignores(p)
            })
            .cloned()
            .collect();
        for p in ignored {
            self.entries.remove(&p);
        }
        Ok(())
    }

    /// Expands one COPY/ADD source (a path or a glob) to context entries, directories
    /// expanded to everything inside them. Returns (entry path, path relative to the
    /// source) pairs.
    pub fn select(&self, source: &str, what: &str) -> Result<Vec<(String, String)>, ContextError> {
        let pattern = safe_relative(source.trim_start_matches('/'))?;
        let is_glob = pattern.contains(['*', '?', '[']);
        let roots: Vec<String> = if pattern.is_empty() {
            vec![String::new()]
        } else if is_glob {
            let glob = glob(&pattern)?;
            self.entries
                .keys()
                .filter(|p| glob.is_match(p.as_str()))
                .cloned()
                .collect()
        } else if self.entries.contains_key(&pattern) {
            vec![pattern.clone()]
        } else {
            vec![]
        };
        if roots.is_empty() {
            return Err(ContextError::Missing {
                what: what.to_string(),
                source_path: source.to_string(),
            });
        }
        let mut out = Vec::new();
        for root in roots {
            match self.entries.get(&root) {
                Some(Entry::Dir { .. }) | None => {
                    let prefix = if root.is_empty() {
                        String::new()
                    } else {
                        format!("{root}/")
                    };
                    for (p, _) in self
                        .entries
                        .range(prefix.clone()..)
                        .take_while(|(p, _)| p.starts_with(&prefix))
                    {
                        out.push((p.clone(), p[prefix.len()..].to_string()));
                    }
                }
                Some(_) => {
                    let name = root.rsplit('/').next().unwrap_or(&root).to_string();
                    out.push((root.clone(), name));
                }
            }
        }
        Ok(out)
    }

    /// SHA-256 over the selected entries' names, modes and contents (for cache keys).
    pub fn digest(&self, selected: &[(String, String)]) -> Result<String, ContextError> {
        let mut h = Sha256::new();
        for (path, rel) in selected {
            h.update(path.as_bytes());
            h.update([0]);
            h.update(rel.as_bytes());
            h.update([0]);
            match &self.entries[path] {
                Entry::File { mode, .. } => {
                    h.update(b"f");
                    h.update(mode.to_le_bytes());
                    let full = self.root.path().join(path);
                    let mut f = std::fs::File::open(&full).map_err(io(&full))?;
                    std::io::copy(&mut f, &mut h).map_err(io(&full))?;
                }
                Entry::Dir { mode } => {
                    h.update(b"d");
                    h.update(mode.to_le_bytes());
                }
                Entry::Symlink { target } => {
                    h.update(b"l");
                    h.update(target.as_bytes());
                }
            }
        }
        Ok(hex::encode(h.finalize()))
    }
}

fn glob(pattern: &str) -> Result<GlobMatcher, ContextError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|_| ContextError::BadIgnore {
            pattern: pattern.to_string(),
        })
}

/// `.dockerignore`: globs (with `**`), `!` exceptions, last match wins, and a matching
/// directory excludes what it holds.
struct IgnoreRules {
    rules: Vec<(GlobMatcher, bool)>,
}

impl IgnoreRules {
    fn parse(text: &str) -> Result<IgnoreRules, ContextError> {
        let mut rules = Vec::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (exception, pattern) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
            let pattern = pattern.strip_prefix("./").unwrap_or(pattern);
            if pattern.is_empty() {
                continue;
            }
            rules.push((glob(pattern)?, exception));
        }
        Ok(IgnoreRules { rules })
    }

    fn ignores(&self, path: &str) -> bool {
        let mut ignored = false;
        let parts: Vec<&str> = path.split('/').collect();
        for (glob, exception) in &self.rules {
            let hit = (1..=parts.len()).any(|n| glob.is_match(parts[..n].join("/")));
            if hit {
                ignored = !exception;
            }
        }
        ignored
    }
}

#[cfg(test)]
mod tests;
