//! Console sessions: a browser signs in with the API key once and gets a session id (an
//! HttpOnly cookie) and a CSRF token (kept in the page's memory, sent as a header). The key
//! itself never reaches browser storage. Sessions live in kilnd's memory: a restart of kilnd
//! signs everyone out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

/// A session unused this long is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; signing in beyond drops the least recently used.
pub const MAX_SESSIONS: usize = 64;
/// The cookie that carries the session id.
pub const COOKIE: &str = "kiln_session";
/// The header that carries the CSRF token on requests that change anything.
pub const CSRF_HEADER: &str = "x-kiln-csrf";

struct Session {
    csrf: String,
    used: Instant,
}

/// Why a cookie-borne request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such session (never was, signed out, expired, or kilnd restarted).
    NoSession,
    /// A request that changes something without the session's CSRF token.
    Csrf,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::NoSession => {
                "the console session is over (signed out, idle 12 hours, or kilnd restarted): \
                 sign in again, or send `Authorization: Bearer <key>` with the key from \
                 KILN_HOME/api-key"
            }
            Refusal::Csrf => {
                "a console request that changes something needs the session's CSRF token in \
                 the X-Kiln-Csrf header (the console sends it; another site cannot)"
            }
        }
    }
}

/// The signed-in browsers.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves the map whole (every change is one insert
        // or remove), so a poisoned lock is still good to use.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session: its id (the cookie) and its CSRF token.
    pub fn create(&self) -> (String, String) {
        let (id, csrf) = (random_token(), random_token());
        let now = Instant::now();
        let mut all = self.sessions();
        all.retain(|_, s| now.duration_since(s.used) < IDLE_TIMEOUT);
        while all.len() >= MAX_SESSIONS {
            let oldest = all
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => all.remove(&k),
                None => break,
            };
        }
        all.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                used: now,
            },
        );
        (id, csrf)
    }

    /// The session's CSRF token, if `id` is a live session (which it then keeps alive).
    pub fn csrf(&self, id: &str) -> Option<String> {
        let mut all = self.sessions();
        let now = Instant::now();
        let s = all.get_mut(id)?;
        if now.duration_since(s.used) >= IDLE_TIMEOUT {
            all.remove(id);
            return None;
        }
        s.used = now;
        Some(s.csrf.clone())
    }

    /// Whether a request with this session id may go on: any live session may read
    /// (`safe`: GET, HEAD); a change also needs the session's CSRF token.
    pub fn authorize(&self, id: &str, safe: bool, csrf: Option<&str>) -> Result<(), Refusal> {
        let want = self.csrf(id).ok_or(Refusal::NoSession)?;
        if safe {
            return Ok(());
        }
        match csrf {
            Some(given) if constant_time_eq(given.as_bytes(), want.as_bytes()) => Ok(()),
            _ => Err(Refusal::Csrf),
        }
    }

    /// Signs a session out.
    pub fn revoke(&self, id: &str) {
        self.sessions().remove(id);
    }

    #[cfg(test)]
    fn age(&self, id: &str, by: Duration) {
        if let Some(s) = self.sessions().get_mut(id) {
            s.used -= by;
        }
    }
}

/// The session id in a `Cookie` header, if there is one.
pub fn session_cookie(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_reads_freely_and_changes_only_with_its_csrf_token() {
        let s = Sessions::default();
        let (id, csrf) = s.create();
        assert_ne!(id, csrf);
        assert_eq!(id.len(), 64);
        assert_eq!(s.authorize(&id, true, None), Ok(()));
        assert_eq!(s.authorize(&id, false, None), Err(Refusal::Csrf));
        assert_eq!(s.authorize(&id, false, Some(&id)), Err(Refusal::Csrf));
        assert_eq!(s.authorize(&id, false, Some(&csrf)), Ok(()));
        let (other, other_csrf) = s.create();
        assert_eq!(
            s.authorize(&id, false, Some(&other_csrf)),
            Err(Refusal::Csrf),
            "another session's token is no good"
        );
        s.revoke(&id);
        assert_eq!(s.authorize(&id, true, None), Err(Refusal::NoSession));
        assert_eq!(s.authorize(&other, true, None), Ok(()));
        assert_eq!(s.authorize("nope", true, None), Err(Refusal::NoSession));
    }

    #[test]
    fn idle_sessions_expire_and_the_count_is_bounded() {
        let s = Sessions::default();
        let (id, _) = s.create();
        s.age(&id, IDLE_TIMEOUT);
        assert_eq!(s.csrf(&id), None);
        let first = s.create().0;
        s.age(&first, Duration::from_secs(1));
        let rest: Vec<String> = (1..MAX_SESSIONS).map(|_| s.create().0).collect();
        assert!(s.csrf(&first).is_some(), "{MAX_SESSIONS} fit");
        s.age(&first, Duration::from_secs(1));
        let newest = s.create().0;
        assert_eq!(s.csrf(&first), None, "the least recently used one went");
        assert!(s.csrf(&newest).is_some() && rest.iter().all(|r| s.csrf(r).is_some()));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        assert_eq!(session_cookie("a=1; kiln_session=abc; b=2"), Some("abc"));
        assert_eq!(session_cookie("kiln_session="), None);
        assert_eq!(session_cookie("xkiln_session=abc"), None);
        assert_eq!(session_cookie(""), None);
    }
}
