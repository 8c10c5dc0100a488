use std::io::Write;

use super::*;

fn zip_with(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".zip").tempfile().unwrap();
    let mut w = zip::ZipWriter::new(file.reopen().unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
    file
}

/// A tar whose header names are written raw, so hostile names can be produced.
fn tar_with(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".tar").tempfile().unwrap();
    let mut b = tar::Builder::new(file.reopen().unwrap());
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
    file
}

#[test]
fn zip_contexts_unpack_with_dockerfile_and_files() {
    let z = zip_with(&[
        ("Dockerfile", b"FROM busybox\n"),
        ("app/main.py", b"print(1)\n"),
        ("./req.txt", b"flask\n"),
    ]);
    let ctx = BuildContext::load(z.path(), ContextLimits::default()).unwrap();
    assert_eq!(ctx.read_text("Dockerfile", 1024).unwrap(), "FROM busybox\n");
    assert!(matches!(ctx.entries().get("app"), Some(Entry::Dir { .. })));
    assert!(matches!(
        ctx.entries().get("req.txt"),
        Some(Entry::File { size: 6, .. })
    ));
}

#[test]
fn zip_slip_and_absolute_paths_are_refused() {
    for bad in ["../evil", "a/../../evil", "/etc/passwd"] {
        let z = zip_with(&[("Dockerfile", b"FROM a\n"), (bad, b"x")]);
        let err = BuildContext::load(z.path(), ContextLimits::default()).unwrap_err();
        assert!(
            matches!(err, ContextError::UnsafeEntry { .. }),
            "{bad}: {err}"
        );
    }
    let t = tar_with(&[("../../tmp/evil", tar::EntryType::Regular, "", b"x")]);
    assert!(matches!(
        BuildContext::load(t.path(), ContextLimits::default()),
        Err(ContextError::UnsafeEntry { .. })
    ));
}

#[test]
fn entries_through_a_symlink_are_refused_and_symlinks_never_followed() {
    let t = tar_with(&[
        ("link", tar::EntryType::Symlink, "/etc", b""),
        ("link/passwd", tar::EntryType::Regular, "", b"owned"),
    ]);
    let err = BuildContext::load(t.path(), ContextLimits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            ContextError::UnsafeEntry {
                reason: "inside a symlink",
                ..
            }
        ),
        "{err}"
    );
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    assert!(
        !passwd.contains("owned"),
        "nothing was written through the symlink"
    );

    let t = tar_with(&[
        ("Dockerfile", tar::EntryType::Regular, "", b"FROM a\n"),
        ("hosts", tar::EntryType::Symlink, "/etc/hosts", b""),
    ]);
    let ctx = BuildContext::load(t.path(), ContextLimits::default()).unwrap();
    assert_eq!(
        ctx.entries()["hosts"],
        Entry::Symlink {
            target: "/etc/hosts".into()
        }
    );
    assert!(
        !ctx.root().join("hosts").exists(),
        "symlinks are not materialised on the host"
    );
}

#[test]
fn limits_bound_size_and_entry_count() {
    let z = zip_with(&[("Dockerfile", b"FROM a\n"), ("big", &[0u8; 4096])]);
    let err = BuildContext::load(
        z.path(),
        ContextLimits {
            max_total_bytes: 1000,
            max_entries: 100,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, ContextError::TooLarge { limit: 1000 }),
        "{err}"
    );
    let err = BuildContext::load(
        z.path(),
        ContextLimits {
            max_total_bytes: 1 << 20,
            max_entries: 1,
        },
    )
    .unwrap_err();
    assert!(matches!(err, ContextError::TooManyEntries { .. }), "{err}");
}

#[test]
fn dockerignore_excludes_with_exceptions() {
    let dir = tempfile::tempdir().unwrap();
    for (p, d) in [
        ("Dockerfile", "FROM a"),
        (".dockerignore", "*.log\ndocs\n!docs/keep.md\n**/secret*\n"),
        ("a.log", "x"),
        ("docs/x.md", "x"),
        ("docs/keep.md", "k"),
        ("src/deep/secret.key", "s"),
        ("src/main.rs", "m"),
    ] {
        let full = dir.path().join(p);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, d).unwrap();
    }
    let ctx = BuildContext::load(dir.path(), ContextLimits::default()).unwrap();
    let names: Vec<&str> = ctx.entries().keys().map(String::as_str).collect();
    assert!(
        names.contains(&"src/main.rs")
            && names.contains(&"docs/keep.md")
            && names.contains(&"Dockerfile"),
        "{names:?}"
    );
    for gone in ["a.log", "docs/x.md", "src/deep/secret.key"] {
        assert!(
            !names.contains(&gone),
            "{gone} should be ignored: {names:?}"
        );
    }
}

#[test]
fn select_expands_globs_and_directories() {
    let z = zip_with(&[
        ("Dockerfile", b"FROM a\n"),
        ("a.py", b"1"),
        ("b.py", b"2"),
        ("lib/x.py", b"3"),
        ("lib/sub/y.py", b"4"),
    ]);
    let ctx = BuildContext::load(z.path(), ContextLimits::default()).unwrap();
    let py: Vec<_> = ctx
        .select("*.py", "COPY source")
        .unwrap()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(py, vec!["a.py", "b.py"]);
    let lib = ctx.select("lib", "COPY source").unwrap();
    assert!(
        lib.contains(&("lib/sub/y.py".to_string(), "sub/y.py".to_string())),
        "{lib:?}"
    );
    assert_eq!(
        ctx.select("./a.py", "COPY source").unwrap(),
        vec![("a.py".to_string(), "a.py".to_string())]
    );
    let err = ctx
        .select("missing.txt", "COPY source")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.txt") && err.contains("not in the build context"),
        "{err}"
    );
    let d1 = ctx.digest(&ctx.select("*.py", "x").unwrap()).unwrap();
    let d2 = ctx.digest(&ctx.select("lib", "x").unwrap()).unwrap();
    assert_ne!(d1, d2);
}

/// A zip symlink's target is its content, which deflate can make enormous from a few bytes:
/// it is read only up to PATH_MAX, and a longer one is refused.
#[test]
fn a_zip_symlink_with_a_huge_target_is_refused_without_reading_it_all() {
    let file = tempfile::Builder::new().suffix(".zip").tempfile().unwrap();
    let mut w = zip::ZipWriter::new(file.reopen().unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    w.start_file("Dockerfile", opts).unwrap();
    w.write_all(b"FROM a\n").unwrap();
    w.add_symlink("link", "a".repeat(1 << 20), opts).unwrap();
    w.finish().unwrap();
    let err = BuildContext::load(file.path(), ContextLimits::default()).unwrap_err();
    assert!(
        matches!(&err, ContextError::TooLong { entry, what: "symlink target" } if entry == "link"),
        "{err}"
    );
    // A long name is refused too, in both formats.
    let long = "d/".repeat(MAX_PATH_BYTES / 2 + 1);
    let z = zip_with(&[(long.as_str(), b"x")]);
    let err = BuildContext::load(z.path(), ContextLimits::default()).unwrap_err();
    assert!(
        matches!(err, ContextError::TooLong { what: "name", .. }),
        "{err}"
    );
}
