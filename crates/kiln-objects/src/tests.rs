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
