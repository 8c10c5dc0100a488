//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay tests: what a client
//! sends the ingress before it is admitted (a token, a Host header, a path-style path). None may panic.

use std::sync::OnceLock;

use crate::token::TokenService;

fn service() -> Option<&'static TokenService> {
    static SERVICE: OnceLock<Option<(tempfile::TempDir, TokenService)>> = OnceLock::new();
    SERVICE
        .get_or_init(|| {
            let dir = tempfile::tempdir().ok()?;
            let svc = TokenService::open(&dir.path().join("ingress-keys.json")).ok()?;
            Some((dir, svc))
        })
        .as_ref()
        .map(|(_, s)| s)
}

/// A bearer token, verified (its JWE parsed, decrypted, its claims checked).
pub fn token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(svc) = service() {
        let _ = svc.verify(&text);
    }
}

/// A Host header naming a microVM.
pub fn host(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::server::microvm_from_host(&text, "localhost");
    let _ = crate::server::microvm_from_host(&text, "kiln.example.com");
}

/// A request path naming a microVM (`/m/<id>/…`).
pub fn path(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some((id, tail)) = crate::server::microvm_from_path(&text) {
        assert!(tail.starts_with('/') && !id.is_empty(), "{text:?}");
    }
}
