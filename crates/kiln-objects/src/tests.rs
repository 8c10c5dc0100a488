use super::*;

/// The test object storage (scripts/test.sh starts SeaweedFS and sets it), with a prefix of
/// this test's own.
fn blobs(name: &str, cache: &Path) -> Option<Blobs> {
    let Ok(url) = std::env::var("KILN_TEST_S3_URL") else {
        eprintln!(
            "not run: KILN_TEST_S3_URL is not set (scripts/test.sh starts SeaweedFS and sets it)"
        );
        return None;
    };
    let (base, query) = url.split_once('?').unwrap();
    let url = format!("{base}/t-{}-{name}?{query}", std::process::id());
    Some(Blobs::open(&url, cache).unwrap())
}

/// Bytes that differ all along (not one repeated byte), `n` long.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

#[tokio::test]
async fn a_blob_goes_up_once_and_comes_back_checked() {
    let dir = tempfile::tempdir().unwrap();
    let Some(b) = blobs("roundtrip", &dir.path().join("cache")) else {
        return;
    };
    let file = dir.path().join("template.ram");
    let data = bytes(20 << 20, 7);
    std::fs::write(&file, &data).unwrap();
    let id = b.put_file(&file).await.unwrap();
    assert_eq!(id, digest_of(&file).await.unwrap());
    assert!(b.exists(&id).await.unwrap());
    let key = b.key(&id);
    let first = b.store.head(&key).await.unwrap();
    // The same bytes again: found, not uploaded a second time.
    let again = dir.path().join("copy.ram");
    std::fs::write(&again, &data).unwrap();
    assert_eq!(b.put_file(&again).await.unwrap(), id);
    assert_eq!(b.store.head(&key).await.unwrap().e_tag, first.e_tag);
    // Another node (another cache) downloads it whole; a second fetch is a cache hit.
    let other = Blobs::open(b.url(), &dir.path().join("cache-2")).unwrap();
    let got = other.fetch(&id).await.unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), data);
    assert_eq!(other.fetch(&id).await.unwrap(), got);
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache-2"))
            .unwrap()
            .count(),
        1,
        "no partial file left"
    );
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_is_never_used() {
    let dir = tempfile::tempdir().unwrap();
    let Some(b) = blobs("corrupt", &dir.path().join("cache")) else {
        return;
    };
    let file = dir.path().join("disk");
    std::fs::write(&file, bytes(1 << 20, 1)).unwrap();
    let id = b.put_file(&file).await.unwrap();
    // Someone with write access to the bucket swaps the bytes under the blob's key.
    b.store
        .put(&b.key(&id), bytes(1 << 20, 2).into())
        .await
        .unwrap();
    let err = b.fetch(&id).await.unwrap_err();
    assert!(matches!(err, ObjectError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(id.as_str()), "{err}");
    assert!(!err.is_unavailable());
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache")).unwrap().count(),
        0,
        "nothing kept"
    );
    // A blob that is not there is not found, and says so; it is not an outage.
    let missing = BlobId::parse(&"0".repeat(64)).unwrap();
    let err = b.fetch(&missing).await.unwrap_err();
    assert!(!err.is_unavailable(), "{err:?}");
    assert!(!b.exists(&missing).await.unwrap());
}

#[tokio::test]
async fn named_objects_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let Some(b) = blobs("named", &dir.path().join("cache")) else {
        return;
    };
    assert_eq!(b.get_named("images/x.json").await.unwrap(), None);
    b.put_named("images/x.json", b"{\"a\":1}".to_vec())
        .await
        .unwrap();
    assert_eq!(
        b.get_named("images/x.json").await.unwrap().unwrap(),
        b"{\"a\":1}"
    );
    assert!(BlobId::parse("abc").is_err() && BlobId::parse(&"A".repeat(64)).is_err());
    for (url, says) in [
        ("http://bucket", "use s3://"),
        (
            "s3://key:secret@bucket?endpoint=http://127.0.0.1:1",
            "AWS_ACCESS_KEY_ID",
        ),
        ("s3://?endpoint=http://127.0.0.1:1", "no bucket"),
    ] {
        let err = Blobs::open(url, &dir.path().join("c")).err().unwrap();
        assert!(err.to_string().contains(says), "{url}: {err}");
    }
}

#[tokio::test]
async fn unreachable_storage_is_an_outage_that_names_where() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = Blobs::open(
        &format!("s3://kiln?endpoint=http://127.0.0.1:{port}"),
        &dir.path().join("cache"),
    )
    .unwrap();
    let err = b
        .exists(&BlobId::parse(&"1".repeat(64)).unwrap())
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn blobs_are_listed_deleted_and_pruned_from_the_cache_only_when_unlinked() {
    let dir = tempfile::tempdir().unwrap();
    let Some(b) = blobs("collect", &dir.path().join("cache")) else {
        return;
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::write(&one, bytes(4096, 1)).unwrap();
    std::fs::write(&two, bytes(8192, 2)).unwrap();
    let before = crate::tests::now_ms() - 60_000;
    let (a, c) = (
        b.put_file(&one).await.unwrap(),
        b.put_file(&two).await.unwrap(),
    );
    let mut listed = b.list().await.unwrap();
    listed.sort_by_key(|l| l.bytes);
    assert_eq!(
        listed.iter().map(|l| (&l.id, l.bytes)).collect::<Vec<_>>(),
        [(&a, 4096), (&c, 8192)]
    );
    assert!(listed.iter().all(|l| l.modified_ms > before), "{listed:?}");
    b.delete(&a).await.unwrap();
    b.delete(&a).await.unwrap();
    assert!(!b.exists(&a).await.unwrap());
    assert_eq!(b.list().await.unwrap().len(), 1);

    // The cache: a blob linked into a template stays, as does one still named; an
    // unlinked, unnamed one goes once it is older than the cut-off.
    let cached = b.fetch(&c).await.unwrap();
    std::fs::write(b.cached(&a), bytes(4096, 1)).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    let none = std::collections::HashSet::new();
    assert_eq!(
        b.prune_cache(&none, std::time::SystemTime::UNIX_EPOCH),
        (0, 0)
    );
    let link = dir.path().join("template-file");
    std::fs::hard_link(&cached, &link).unwrap();
    assert_eq!(
        b.prune_cache(&none, later),
        (1, 4096),
        "only the unlinked one"
    );
    assert!(cached.exists() && !b.cached(&a).exists());
    std::fs::remove_file(&link).unwrap();
    let keep = std::collections::HashSet::from([c.to_string()]);
    assert_eq!(b.prune_cache(&keep, later), (0, 0), "still named");
    assert_eq!(b.prune_cache(&none, later), (1, 8192));
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
