//! The control API's bearer key: generated on first start into `KILN_HOME/api-key` with mode
//! 0600, compared in constant time.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use kiln_console::constant_time_eq;
use rand::RngCore;

use crate::error::ApiError;

pub const KEY_FILE: &str = "api-key";
/// The shortest key kilnd accepts from an existing file (its own are 64 hex characters).
pub const MIN_KEY_LEN: usize = 32;

/// Refuses a secret file that others than its owner may read or write.
fn refuse_shared(path: &Path) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is readable by others (mode {mode:o}): chmod 600 it",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// A secret from a file only its owner may read (a database URL with its password), trimmed.
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    refuse_shared(path)?;
    Ok(text.trim().to_string())
}

/// Reads the key, creating it (0600) when missing; refuses a key file others can read.
pub fn load_or_create(home: &Path) -> std::io::Result<String> {
    let path = home.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(key) => {
            refuse_shared(&path)?;
            let key = key.trim().to_string();
            // An empty key would compare equal to an empty header: never "auth off".
            if key.len() < MIN_KEY_LEN || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} holds a key of {} characters: use at least {MIN_KEY_LEN} printable \
                         characters without spaces, or remove the file and kilnd writes a new one",
                        path.display(),
                        key.chars().count()
                    ),
                ));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let key = hex::encode(bytes);
            // Whole or not at all: written and synced beside it (0600 from the start), then
            // linked into place, which fails if another kilnd made one meanwhile.
            let tmp = home.join(format!(".{KEY_FILE}.{}", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            writeln!(f, "{key}")?;
            f.sync_all()?;
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    std::fs::File::open(home)?.sync_all()?;
                    Ok(key)
                }
                // Another kilnd won: its key is the key.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(home),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// What a request may authenticate with: the API key, or a console session.
#[derive(Clone)]
pub struct Auth {
    pub key: std::sync::Arc<String>,
    pub sessions: std::sync::Arc<kiln_console::Sessions>,
}

/// Lets a request on with `Authorization: Bearer <key>`, or with a console session's cookie
/// (and, for anything but GET and HEAD, its CSRF token in `X-Kiln-Csrf`).
pub async fn require_key(
    State(auth): State<Auth>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let headers = request.headers();
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let session = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(kiln_console::session_cookie);
    match (bearer, session) {
        (Some(given), _) if constant_time_eq(given.trim().as_bytes(), auth.key.as_bytes()) => {}
        (None, Some(id)) => {
            let safe = matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
            let csrf = headers
                .get(kiln_console::CSRF_HEADER)
                .and_then(|v| v.to_str().ok());
            auth.sessions
                .authorize(id, safe, csrf)
                .map_err(|r| ApiError::new(kiln_api::ErrorCode::UnauthorizedException, r.message()))?;
        }
        _ => {
            return Err(ApiError::new(
                kiln_api::ErrorCode::UnauthorizedException,
                "missing or wrong API key: send `Authorization: Bearer <key>` with the key from KILN_HOME/api-key",
            ))
        }
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path()).unwrap();
        assert_eq!(key.len(), 64);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap(), key);
        std::fs::set_permissions(
            dir.path().join(KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(
            load_or_create(dir.path()).is_err(),
            "a world-readable key is refused"
        );
    }

    #[test]
    fn an_empty_or_short_key_stops_kilnd_instead_of_letting_everyone_in() {
        for bad in [
            "",
            "\n",
            "short-key\n",
            "a key with spaces in the middle of it, long\n",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(KEY_FILE);
            std::fs::write(&path, bad).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = load_or_create(dir.path()).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{bad:?}");
            assert!(err.to_string().contains("at least 32"), "{err}");
        }
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
