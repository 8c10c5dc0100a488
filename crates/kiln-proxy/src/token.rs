//! Auth tokens: compact JWE (RFC 7516) with `alg: dir`, `enc: A256GCM` and a key id. The
//! claims say which microVM, which ports, until when, which token (`jti`) and what for
//! (`ingress` or `shell`). Keys live in `KILN_HOME/ingress-keys.json` (0600); rotation adds a
//! new current key and keeps old ones until every token they signed has expired.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Longest token lifetime (minutes), as for Lambda MicroVMs.
pub const MAX_EXPIRATION_MINUTES: u64 = 60;
/// Longest token accepted at all (bytes).
pub const MAX_TOKEN_LEN: usize = 4096;

pub use kiln_types::TokenKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The microVM id.
    pub sub: String,
    pub ports: Vec<u16>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issue time, milliseconds since the epoch (orders tokens against revocations).
    pub iat_ms: u64,
    pub jti: String,
    pub kind: TokenKind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token was not issued by this kiln or was altered")]
    Forged,
    #[error("the token has expired")]
    Expired,
    #[error("the token was revoked")]
    Revoked,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("Key file {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Key file {0} is readable by others: chmod 600 it")]
    Permissions(PathBuf),
    #[error("Key file {0} is corrupt")]
    Corrupt(PathBuf),
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// base64url of 32 bytes.
    key: String,
    created: u64,
    /// Set when a newer key replaced this one: tokens it signed expire by then + 60 min.
    retired: Option<u64>,
}

#[derive(Default, Serialize, Deserialize)]
struct KeyFile {
    keys: Vec<StoredKey>,
}

impl KeyFile {
    /// The key new tokens are signed with: the newest one not retired.
    fn current(&self) -> Option<&StoredKey> {
        self.keys.iter().rev().find(|k| k.retired.is_none())
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    enc: String,
    kid: String,
    typ: String,
}

/// Revocations as kept on disk beside the key file (0600), so a revoked token stays revoked
/// across a restart of kilnd.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revocations {
    /// Token id → when its revocation can be forgotten (it has expired by then), seconds.
    tokens: BTreeMap<String, u64>,
    /// microVM → tokens issued at or before this time (milliseconds) are revoked.
    before: BTreeMap<String, u64>,
}

/// `ingress-keys.json` → `ingress-keys.revocations.json`.
fn revocations_path(keys: &Path) -> PathBuf {
    keys.with_extension("revocations.json")
}

impl Revocations {
    fn load(path: &Path) -> Result<Revocations, KeyError> {
        let mut r: Revocations = match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|_| KeyError::Corrupt(path.to_path_buf()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Revocations::default(),
            Err(source) => {
                return Err(KeyError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        r.prune();
        Ok(r)
    }

    /// Drops what no token can need any more: every token expires within
    /// `MAX_EXPIRATION_MINUTES` of its issue.
    fn prune(&mut self) {
        let now = now_secs();
        self.tokens.retain(|_, until| *until > now);
        let horizon = now_millis().saturating_sub(MAX_EXPIRATION_MINUTES * 60 * 1000);
        self.before.retain(|_, at| *at > horizon);
    }
}

/// Keys, revocations, issue and verify.
pub struct TokenService {
    path: PathBuf,
    keys: RwLock<KeyFile>,
    revoked_tokens: RwLock<BTreeMap<String, u64>>,
    /// microVM → tokens issued at or before this time (milliseconds) are revoked.
    revoked_before: RwLock<BTreeMap<String, u64>>,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

impl TokenService {
    /// Loads `path` (creating it with a first key, mode 0600, when missing).
    pub fn open(path: &Path) -> Result<TokenService, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        // A rotation that was interrupted before its rename left the old file whole.
        let _ = std::fs::remove_file(path.with_extension("tmp"));
        let file = match std::fs::read(path) {
            Ok(bytes) => {
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Permissions(path.to_path_buf()));
                }
                serde_json::from_slice(&bytes).map_err(|_| KeyError::Corrupt(path.to_path_buf()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => KeyFile::default(),
            Err(e) => return Err(io(e)),
        };
        // `issue` signs with the current key: one that is not a valid AES-256 key makes the
        // file corrupt; a missing one is made.
        if file.current().is_some_and(|k| Self::cipher(k).is_none()) {
            return Err(KeyError::Corrupt(path.to_path_buf()));
        }
        let needs_key = file.current().is_none();
        let revoked = Revocations::load(&revocations_path(path))?;
        let service = TokenService {
            path: path.to_path_buf(),
            keys: RwLock::new(file),
            revoked_tokens: RwLock::new(revoked.tokens),
            revoked_before: RwLock::new(revoked.before),
        };
        if needs_key {
            service.rotate()?;
        }
        Ok(service)
    }

    /// Writes the key file whole (temporary, fsync, rename), calling `step` after the new
    /// file is durable (`rotate.written`) and after it replaced the old one
    /// (`rotate.renamed`).
    fn save(&self, file: &KeyFile, step: &dyn Fn(&str)) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let json = serde_json::to_vec_pretty(file).map_err(|e| io(std::io::Error::other(e)))?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
        step("rotate.written");
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        step("rotate.renamed");
        Ok(())
    }

    /// Makes a new current key; older keys keep verifying until their tokens expire.
    pub fn rotate(&self) -> Result<String, KeyError> {
        self.rotate_with(&|_| {})
    }

    /// [`TokenService::rotate`], calling `step` at each named step of writing the key file
    /// (the fault-injection suite stops kilnd there). The old file stays whole until the
    /// new one, complete and synced, replaces it, and the key in memory changes only then.
    pub fn rotate_with(&self, step: &dyn Fn(&str)) -> Result<String, KeyError> {
        let mut file = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let now = now_secs();
        let mut next = KeyFile {
            keys: file.keys.clone(),
        };
        for k in next.keys.iter_mut().filter(|k| k.retired.is_none()) {
            k.retired = Some(now);
        }
        next.keys.retain(|k| {
            k.retired
                .is_none_or(|r| r + MAX_EXPIRATION_MINUTES * 60 > now)
        });
        let kid = format!("k{}", B64.encode(random_bytes::<6>()));
        next.keys.push(StoredKey {
            kid: kid.clone(),
            key: B64.encode(random_bytes::<32>()),
            created: now,
            retired: None,
        });
        self.save(&next, step)?;
        *file = next;
        Ok(kid)
    }

    fn cipher(key: &StoredKey) -> Option<Aes256Gcm> {
        let bytes = B64.decode(&key.key).ok()?;
        Aes256Gcm::new_from_slice(&bytes).ok()
    }

    /// Issues a token for `claims` with the current key.
    pub fn issue(&self, claims: &Claims) -> String {
        let file = self.keys.read().unwrap_or_else(|p| p.into_inner());
        // INVARIANT: `open` makes sure of a current key and `rotate`, the only other writer,
        // always adds one.
        #[allow(clippy::expect_used)]
        let key = file.current().expect("a current key");
        let header = Header {
            alg: "dir".into(),
            enc: "A256GCM".into(),
            kid: key.kid.clone(),
            typ: "kiln-token".into(),
        };
        // INVARIANT: Header and Claims hold only strings, numbers, a list of ports and a unit
        // enum, which serde_json always encodes.
        #[allow(clippy::expect_used)]
        let (header_json, plaintext) = (
            serde_json::to_vec(&header).expect("header serializes"),
            serde_json::to_vec(claims).expect("claims serialize"),
        );
        let header_b64 = B64.encode(header_json);
        let iv = random_bytes::<12>();
        // INVARIANT: `open` checked the current key's cipher (and `rotate` makes valid keys);
        // AES-GCM fails only on messages of tens of gigabytes; claims are a few hundred bytes.
        #[allow(clippy::expect_used)]
        let sealed = Self::cipher(key)
            .expect("stored key is valid")
            .encrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &plaintext,
                    aad: header_b64.as_bytes(),
                },
            )
            .expect("encryption cannot fail");
        let (ciphertext, tag) = sealed.split_at(sealed.len() - 16);
        format!(
            "{header_b64}..{}.{}.{}",
            B64.encode(iv),
            B64.encode(ciphertext),
            B64.encode(tag)
        )
    }

    /// Decrypts and checks a token (signature, expiry, revocation). Scope (microVM, port,
    /// kind) is the caller's to check.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let parts: Vec<&str> = token.trim().split('.').collect();
        let [header_b64, encrypted_key, iv, ciphertext, tag] = parts.as_slice() else {
            return Err(TokenError::Malformed);
        };
        if !encrypted_key.is_empty() {
            return Err(TokenError::Malformed);
        }
        let header: Header = B64
            .decode(header_b64)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or(TokenError::Malformed)?;
        if header.alg != "dir" || header.enc != "A256GCM" {
            return Err(TokenError::Forged);
        }
        let (iv, mut sealed, tag) = match (B64.decode(iv), B64.decode(ciphertext), B64.decode(tag))
        {
            (Ok(i), Ok(c), Ok(t)) if i.len() == 12 && t.len() == 16 => (i, c, t),
            _ => return Err(TokenError::Malformed),
        };
        sealed.extend_from_slice(&tag);
        let file = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = file
            .keys
            .iter()
            .find(|k| k.kid == header.kid)
            .ok_or(TokenError::Forged)?;
        let plaintext = Self::cipher(key)
            .ok_or(TokenError::Forged)?
            .decrypt(
                Nonce::from_slice(&iv),
                Payload {
                    msg: &sealed,
                    aad: header_b64.as_bytes(),
                },
            )
            .map_err(|_| TokenError::Forged)?;
        let claims: Claims = serde_json::from_slice(&plaintext).map_err(|_| TokenError::Forged)?;
        let now = now_secs();
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if self
            .revoked_tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&claims.jti)
        {
            return Err(TokenError::Revoked);
        }
        if let Some(before) = self
            .revoked_before
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&claims.sub)
        {
            if claims.iat_ms <= *before {
                return Err(TokenError::Revoked);
            }
        }
        Ok(claims)
    }

    /// A copy of the revocations in memory.
    fn revocations(&self) -> Revocations {
        Revocations {
            tokens: self
                .revoked_tokens
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            before: self
                .revoked_before
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// The keys and the revocations as JSON, for the store a cluster's nodes share.
    pub fn export(&self) -> (String, String) {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let revocations = self.revocations();
        (
            serde_json::to_string(&*keys).unwrap_or_default(),
            serde_json::to_string(&revocations).unwrap_or_default(),
        )
    }

    /// Takes in what another node shared ([`TokenService::export`]): keys by id (a key
    /// retired anywhere is retired here; of those not retired, the newest signs and the
    /// others retire now) and revocations (both kept, the later time winning); saved to the
    /// files when anything changed. `Ok(true)` when it did.
    pub fn merge(&self, keys_json: &str, revocations_json: &str) -> Result<bool, KeyError> {
        let corrupt = || KeyError::Corrupt(self.path.clone());
        let theirs: KeyFile = serde_json::from_str(keys_json).map_err(|_| corrupt())?;
        let their_revocations: Revocations =
            serde_json::from_str(revocations_json).map_err(|_| corrupt())?;
        if theirs.keys.iter().any(|k| Self::cipher(k).is_none()) {
            return Err(corrupt());
        }
        let mut file = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let mut next = KeyFile {
            keys: file.keys.clone(),
        };
        for key in theirs.keys {
            match next.keys.iter_mut().find(|k| k.kid == key.kid) {
                Some(k) => {
                    k.retired = match (k.retired, key.retired) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    }
                }
                None => next.keys.push(key),
            }
        }
        next.keys
            .sort_by(|a, b| (a.created, &a.kid).cmp(&(b.created, &b.kid)));
        let newest = next.current().map(|k| k.kid.clone());
        let now = now_secs();
        for k in next.keys.iter_mut() {
            if k.retired.is_none() && Some(&k.kid) != newest.as_ref() {
                k.retired = Some(now);
            }
        }
        let keys_changed = serde_json::to_string(&next).ok() != serde_json::to_string(&*file).ok();
        if keys_changed {
            self.save(&next, &|_| {})?;
            *file = next;
        }
        drop(file);
        let mut changed = keys_changed;
        {
            let mut tokens = self
                .revoked_tokens
                .write()
                .unwrap_or_else(|p| p.into_inner());
            for (jti, until) in their_revocations.tokens {
                let e = tokens.entry(jti).or_insert(0);
                changed |= until > *e;
                *e = (*e).max(until);
            }
            let mut before = self
                .revoked_before
                .write()
                .unwrap_or_else(|p| p.into_inner());
            for (vm, at) in their_revocations.before {
                let e = before.entry(vm).or_insert(0);
                changed |= at > *e;
                *e = (*e).max(at);
            }
        }
        if changed {
            self.save_revocations();
        }
        Ok(changed)
    }

    /// Revokes one token (by its `jti`) until it would have expired anyway.
    pub fn revoke_token(&self, jti: &str) {
        let mut revoked = self
            .revoked_tokens
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let now = now_secs();
        revoked.retain(|_, until| *until > now);
        revoked.insert(jti.to_string(), now + MAX_EXPIRATION_MINUTES * 60);
        drop(revoked);
        self.save_revocations();
    }

    /// Writes the revocations beside the key file (atomically, 0600, synced). A failure is
    /// logged: the revocation holds in memory regardless.
    fn save_revocations(&self) {
        let mut r = self.revocations();
        r.prune();
        let path = revocations_path(&self.path);
        let write = || -> std::io::Result<()> {
            let tmp = path.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec(&r).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), "saving token revocations: {e}");
        }
    }

    /// Revokes every token issued so far for a microVM.
    pub fn revoke_microvm(&self, microvm: &str) {
        self.revoked_before
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(microvm.to_string(), now_millis());
        self.save_revocations();
    }

    /// Builds claims for a new token, issued after any revocation for that microVM.
    pub fn claims(&self, microvm: &str, ports: Vec<u16>, minutes: u64, kind: TokenKind) -> Claims {
        let floor = self
            .revoked_before
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(microvm)
            .copied()
            .unwrap_or(0);
        Claims {
            sub: microvm.to_string(),
            ports,
            exp: now_secs() + minutes * 60,
            iat_ms: now_millis().max(floor + 1),
            jti: B64.encode(random_bytes::<12>()),
            kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> (tempfile::TempDir, TokenService) {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenService::open(&dir.path().join("keys.json")).unwrap();
        (dir, s)
    }

    #[test]
    fn nodes_that_merge_each_others_keys_and_revocations_accept_the_same_tokens() {
        let ((_da, a), (db, b)) = (service(), service());
        let from_a = a.issue(&a.claims("mvm-1", vec![8080], 5, TokenKind::Ingress));
        assert!(b.verify(&from_a).is_err(), "separate keys at first");
        let (keys, revoked) = a.export();
        assert!(b.merge(&keys, &revoked).unwrap());
        assert!(
            !b.merge(&keys, &revoked).unwrap(),
            "nothing new the second time"
        );
        // One signing key on both: the newest; the other is retired and still verifies.
        let (keys, revoked) = b.export();
        a.merge(&keys, &revoked).unwrap();
        assert_eq!(a.export().0, b.export().0);
        let from_b = b.issue(&b.claims("mvm-1", vec![8080], 5, TokenKind::Ingress));
        assert!(a.verify(&from_b).is_ok() && b.verify(&from_a).is_ok());
        // A revocation on one node holds on the other once merged, and in its file.
        let jti = a.verify(&from_b).unwrap().jti;
        a.revoke_token(&jti);
        let (keys, revoked) = a.export();
        assert!(b.merge(&keys, &revoked).unwrap());
        assert!(b.verify(&from_b).is_err());
        let reopened = TokenService::open(&db.path().join("keys.json")).unwrap();
        assert!(reopened.verify(&from_b).is_err() && reopened.verify(&from_a).is_ok());
        assert!(matches!(b.merge("{", "{}"), Err(KeyError::Corrupt(_))));
    }

    #[test]
    fn issued_tokens_verify_and_carry_their_scope() {
        let (dir, s) = service();
        let claims = s.claims("mvm-1", vec![8080], 5, TokenKind::Ingress);
        let token = s.issue(&claims);
        assert_eq!(token.split('.').count(), 5);
        assert_eq!(token.split('.').nth(1), Some(""), "dir: no encrypted key");
        assert_eq!(s.verify(&token).unwrap(), claims);
        let mode = std::fs::metadata(dir.path().join("keys.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn tampered_forged_malformed_and_expired_tokens_fail() {
        let (_d, s) = service();
        let token = s.issue(&s.claims("mvm-1", vec![8080], 5, TokenKind::Ingress));
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut ct = B64.decode(&parts[3]).unwrap();
        ct[0] ^= 1;
        parts[3] = B64.encode(ct);
        assert_eq!(s.verify(&parts.join(".")), Err(TokenError::Forged));
        let (_d2, other) = service();
        assert_eq!(
            other.verify(&token),
            Err(TokenError::Forged),
            "another kiln's key"
        );
        for bad in ["", "a.b", "x..y.z.w", &"A".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(
                matches!(
                    s.verify(bad),
                    Err(TokenError::Malformed | TokenError::Forged)
                ),
                "{bad:?}"
            );
        }
        let mut old = s.claims("mvm-1", vec![8080], 5, TokenKind::Ingress);
        old.exp = now_secs() - 1;
        assert_eq!(s.verify(&s.issue(&old)), Err(TokenError::Expired));
    }

    #[test]
    fn rotation_keeps_old_tokens_and_revocation_is_immediate() {
        let (dir, s) = service();
        let before = s.issue(&s.claims("mvm-1", vec![8080], 5, TokenKind::Ingress));
        s.rotate().unwrap();
        let after = s.issue(&s.claims("mvm-1", vec![8080], 5, TokenKind::Ingress));
        assert!(s.verify(&before).is_ok() && s.verify(&after).is_ok());
        let reopened = TokenService::open(&dir.path().join("keys.json")).unwrap();
        assert!(reopened.verify(&before).is_ok(), "keys persist");

        let one = s.verify(&after).unwrap();
        s.revoke_token(&one.jti);
        assert_eq!(s.verify(&after), Err(TokenError::Revoked));
        assert!(s.verify(&before).is_ok());
        s.revoke_microvm("mvm-1");
        assert_eq!(s.verify(&before), Err(TokenError::Revoked));
        let fresh = s.issue(&s.claims("mvm-1", vec![8080], 5, TokenKind::Ingress));
        assert!(
            s.verify(&fresh).is_ok(),
            "tokens issued after a revocation work"
        );
        // A restart (the service opened again) keeps every revocation.
        let restarted = TokenService::open(&dir.path().join("keys.json")).unwrap();
        assert_eq!(restarted.verify(&after), Err(TokenError::Revoked));
        assert_eq!(restarted.verify(&before), Err(TokenError::Revoked));
        assert!(restarted.verify(&fresh).is_ok());
        let saved = dir.path().join("keys.revocations.json");
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
