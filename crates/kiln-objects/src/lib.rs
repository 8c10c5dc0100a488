//! Blobs in S3-compatible object storage, content-addressed: a blob's key is its SHA-256
//! (`blobs/sha256/<hex>`), so a blob is uploaded once (a HEAD finds it) and whatever a key
//! names is what its digest says. A download is checked against the digest while it is
//! written, into a temporary file renamed into the node's cache only when it matches: no
//! half-downloaded or corrupt blob is ever used. An upload is one PUT (or one multipart
//! upload, completed as a whole): an object either exists whole or not at all.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a request is retried before its error is returned.
const RETRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// Parts of a multipart upload.
const PART_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object store URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("object storage at {target} failed")]
    Store {
        target: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {expected} from {target} has digest {found}: not used")]
    Corrupt {
        target: String,
        expected: String,
        found: String,
    },
    #[error("{0:?} is not a SHA-256 digest (64 hex characters)")]
    BadDigest(String),
}

impl ObjectError {
    /// The storage could not be reached (rather than refusing or answering wrongly).
    pub fn is_unavailable(&self) -> bool {
        match self {
            ObjectError::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. } | object_store::Error::AlreadyExists { .. }
            ),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, ObjectError>;

/// A blob's SHA-256, hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(String);

impl BlobId {
    pub fn parse(hex: &str) -> Result<BlobId> {
        let ok = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if ok {
            Ok(BlobId(hex.to_string()))
        } else {
            Err(ObjectError::BadDigest(hex.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One blob as [`Blobs::list`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: BlobId,
    pub modified_ms: i64,
    pub bytes: u64,
}

/// An access key for the object store (its secret never printed).
#[derive(Clone)]
pub struct Credentials {
    pub key_id: String,
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ key_id: {:?}, secret: .. }}", self.key_id)
    }
}

/// Object storage, and this node's cache of what it downloaded.
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    /// The URL it was opened with (it holds no credentials).
    url: String,
    /// `s3://bucket/prefix` at `endpoint`, for messages (never credentials).
    target: String,
    prefix: String,
    cache: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ObjectError + '_ {
    move |source| ObjectError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Blobs {
    /// `s3://BUCKET[/PREFIX]?endpoint=http://HOST:PORT&region=R` (region defaults to
    /// us-east-1; `http://` endpoints are allowed for loopback and private networks). The
    /// credentials come from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (never the URL).
    pub fn open(url: &str, cache: &Path) -> Result<Blobs> {
        Self::open_with(url, cache, None)
    }

    /// [`Blobs::open`] with these credentials instead of the environment's.
    pub fn open_with(url: &str, cache: &Path, creds: Option<&Credentials>) -> Result<Blobs> {
        let bad = |why: &str| ObjectError::Url {
            url: url.to_string(),
            why: why.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if parsed.scheme() != "s3" {
            return Err(bad("use s3://BUCKET?endpoint=…"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad(
                "credentials go in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, not the URL",
            ));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("no bucket"))?;
        let query = |k: &str| {
            parsed
                .query_pairs()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        let endpoint = query("endpoint");
        let region = query("region").unwrap_or_else(|| "us-east-1".into());
        // A few quick retries, then the error: an outage is reported within seconds, not
        // after object_store's default three minutes.
        let retry = object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: RETRY_TIMEOUT,
            ..Default::default()
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_retry(retry);
        if let Some(c) = creds {
            builder = builder
                .with_access_key_id(&c.key_id)
                .with_secret_access_key(&c.secret);
        }
        if let Some(e) = &endpoint {
            builder = builder
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = builder.build().map_err(|e| bad(&e.to_string()))?;
        let prefix = parsed.path().trim_matches('/').to_string();
        std::fs::create_dir_all(cache).map_err(io(cache))?;
        Ok(Blobs {
            url: url.to_string(),
            store: Arc::new(store),
            target: format!(
                "s3://{bucket}/{prefix} at {}",
                endpoint.as_deref().unwrap_or("AWS")
            ),
            prefix,
            cache: cache.to_path_buf(),
        })
    }

    /// The URL it was opened with: another cache on the same storage opens it again.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, id: &BlobId) -> ObjectPath {
        self.key_prefix().child(id.as_str())
    }

    fn failed(&self) -> impl FnOnce(object_store::Error) -> ObjectError + '_ {
        move |source| ObjectError::Store {
            target: self.target.clone(),
            source,
        }
    }

    /// Where a verified blob is kept on this node.
    pub fn cached(&self, id: &BlobId) -> PathBuf {
        self.cache.join(id.as_str())
    }

    /// Whether the store holds the blob.
    pub async fn exists(&self, id: &BlobId) -> Result<bool> {
        match self.store.head(&self.key(id)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.failed()(e)),
        }
    }

    /// Uploads a file unless the store has it already; its id either way.
    pub async fn put_file(&self, path: &Path) -> Result<BlobId> {
        let id = digest_of(path).await?;
        self.put_file_as(path, &id).await?;
        Ok(id)
    }

    /// Uploads a file whose digest is `id` (from [`digest_of`]; the file does not change)
    /// unless the store has it already.
    pub async fn put_file_as(&self, path: &Path, id: &BlobId) -> Result<()> {
        let id = id.clone();
        if self.exists(&id).await? {
            return Ok(());
        }
        let upload = self
            .store
            .put_multipart(&self.key(&id))
            .await
            .map_err(self.failed())?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut file = tokio::fs::File::open(path).await.map_err(io(path))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).await.map_err(io(path))?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(4).await.map_err(self.failed())?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(self.failed())?;
        Ok(())
    }

    /// Every blob in the store: its id, when it was written (ms since the epoch) and its
    /// size. Keys under `blobs/sha256/` that name no digest are left out (never deleted).
    pub async fn list(&self) -> Result<Vec<Listed>> {
        let prefix = self.key_prefix();
        let mut stream = self.store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(self.failed())?;
            let Some(name) = meta.location.filename() else {
                continue;
            };
            if let Ok(id) = BlobId::parse(name) {
                out.push(Listed {
                    id,
                    modified_ms: meta.last_modified.timestamp_millis(),
                    bytes: meta.size,
                });
            }
        }
        Ok(out)
    }

    /// Deletes a blob (one that is gone already counts as deleted).
    pub async fn delete(&self, id: &BlobId) -> Result<()> {
        match self.store.delete(&self.key(id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed()(e)),
        }
    }

    /// Removes cached blobs of this node that `keep` does not name, that nothing links to
    /// (a template assembled here holds hard links), and that were written before
    /// `before`: how many, and their bytes.
    pub fn prune_cache(
        &self,
        keep: &std::collections::HashSet<String>,
        before: std::time::SystemTime,
    ) -> (usize, u64) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(&self.cache) else {
            return (0, 0);
        };
        let (mut n, mut bytes) = (0, 0);
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if BlobId::parse(name).is_err() || keep.contains(name) {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let old = meta.modified().is_ok_and(|t| t < before);
            if meta.is_file() && meta.nlink() == 1 && old && std::fs::remove_file(e.path()).is_ok()
            {
                n += 1;
                bytes += meta.len();
            }
        }
        (n, bytes)
    }

    fn key_prefix(&self) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from("blobs/sha256")
        } else {
            ObjectPath::from(format!("{}/blobs/sha256", self.prefix))
        }
    }

    /// The blob as a file in this node's cache, downloaded (and checked) on a miss.
    pub async fn fetch(&self, id: &BlobId) -> Result<PathBuf> {
        let dest = self.cached(id);
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            return Ok(dest);
        }
        let tmp = self
            .cache
            .join(format!(".{id}.{}.part", std::process::id()));
        let got = self.store.get(&self.key(id)).await.map_err(self.failed())?;
        let mut stream = got.into_stream();
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
        let mut hash = Sha256::new();
        let result = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(self.failed())?;
                hash.update(&chunk);
                file.write_all(&chunk).await.map_err(io(&tmp))?;
            }
            file.sync_all().await.map_err(io(&tmp))?;
            let found = hex::encode(hash.finalize());
            if found != id.as_str() {
                return Err(ObjectError::Corrupt {
                    target: self.target.clone(),
                    expected: id.to_string(),
                    found,
                });
            }
            tokio::fs::rename(&tmp, &dest).await.map_err(io(&dest))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result.map(|()| dest)
    }

    /// Puts bytes under a key of their own (not a blob: manifests that name blobs), whole.
    pub async fn put_named(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&self.named(name), bytes.into())
            .await
            .map_err(self.failed())?;
        Ok(())
    }

    /// What [`Blobs::put_named`] put, or `None`.
    pub async fn get_named(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.store.get(&self.named(name)).await {
            Ok(got) => Ok(Some(got.bytes().await.map_err(self.failed())?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed()(e)),
        }
    }

    fn named(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(format!("named/{name}"))
        } else {
            ObjectPath::from(format!("{}/named/{name}", self.prefix))
        }
    }
}

/// A file's SHA-256, read in 1 MiB pieces.
pub async fn digest_of(path: &Path) -> Result<BlobId> {
    let mut file = tokio::fs::File::open(path).await.map_err(io(path))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(io(path))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(BlobId(hex::encode(hash.finalize())))
}

#[cfg(test)]
mod tests;
