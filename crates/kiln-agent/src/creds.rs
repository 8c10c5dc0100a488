//! Runs file work as a guest user. The agent is root; each operation on behalf of a user
//! runs on a thread of its own that first takes that user's groups, gid and uid, so the
//! kernel applies the guest's own permissions and a refusal is the guest's own error. The
//! raw system calls change only the calling thread's credentials (the C library's wrappers
//! would change every thread's), and the thread ends with the operation, so no other work
//! ever runs with them.

use kiln_proto::{ErrorKind, GuestError};

use crate::user::Identity;

/// Runs `f` as `user` (root when absent) on a thread of its own.
pub async fn as_user<T, F>(user: Option<String>, f: F) -> Result<T, GuestError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, GuestError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("kiln-as-user".into())
        .spawn(move || {
            let outcome = crate::user::resolve(user.as_deref())
                .and_then(|id| become_user(&id))
                .and_then(|()| f());
            let _ = tx.send(outcome);
        });
    if let Err(e) = spawned {
        return Err(GuestError::new(
            ErrorKind::Io,
            format!("start a thread: {e}"),
        ));
    }
    rx.await
        .unwrap_or_else(|_| Err(GuestError::new(ErrorKind::Io, "file operation panicked")))
}

/// Gives the calling thread `id`'s credentials; for root, keeps them.
fn become_user(id: &Identity) -> Result<(), GuestError> {
    if id.uid == 0 && id.gid == 0 && id.groups.is_empty() {
        return Ok(());
    }
    let mut groups = id.groups.clone();
    if !groups.contains(&id.gid) {
        groups.push(id.gid);
    }
    let failed = |what: &str| {
        GuestError::new(
            ErrorKind::Io,
            format!(
                "take {what} of uid {}: {}",
                id.uid,
                std::io::Error::last_os_error()
            ),
        )
    };
    // SAFETY: setgroups reads `groups.len()` gids from a live vector; the raw call changes
    // only this thread's supplementary groups.
    if unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) } != 0 {
        return Err(failed("the groups"));
    }
    // SAFETY: plain integer arguments; changes only this thread's gids.
    if unsafe { libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid) } != 0 {
        return Err(failed("the gid"));
    }
    // SAFETY: plain integer arguments; changes only this thread's uids (and, leaving root,
    // drops its capabilities), which is the point.
    if unsafe { libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid) } != 0 {
        return Err(failed("the uid"));
    }
    Ok(())
}

/// A file error as the guest reports it: what failed, on which path, and the kernel's
/// words; the kind says who must act (the caller for a missing, forbidden or conflicting
/// path, the guest for the rest).
pub fn fs_error(action: &str, path: &str, e: std::io::Error) -> GuestError {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorKind::PermissionDenied,
        Some(libc::EEXIST | libc::ENOTEMPTY | libc::EBUSY) => ErrorKind::Conflict,
        Some(
            libc::ENOTDIR
            | libc::EISDIR
            | libc::EINVAL
            | libc::ELOOP
            | libc::ENAMETOOLONG
            | libc::EXDEV,
        ) => ErrorKind::InvalidRequest,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ErrorKind::TooLarge,
        _ => ErrorKind::Io,
    };
    GuestError::new(kind, format!("{action} {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_who_must_act() {
        let e = |n| fs_error("open", "/x", std::io::Error::from_raw_os_error(n)).kind;
        assert_eq!(e(libc::ENOENT), ErrorKind::NotFound);
        assert_eq!(e(libc::EACCES), ErrorKind::PermissionDenied);
        assert_eq!(e(libc::ENOTEMPTY), ErrorKind::Conflict);
        assert_eq!(e(libc::EISDIR), ErrorKind::InvalidRequest);
        assert_eq!(e(libc::ENOSPC), ErrorKind::TooLarge);
        assert_eq!(e(libc::EIO), ErrorKind::Io);
        let msg = fs_error(
            "open",
            "/x",
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(
            msg.message.starts_with("open /x: Permission denied"),
            "{msg}"
        );
    }

    /// As root (CI is), a user gets the kernel's permissions: a 0600 root file is closed to
    /// uid 65534, and the agent's own credentials stay root.
    #[tokio::test]
    async fn a_user_gets_the_kernels_permissions() {
        if !nix::unistd::geteuid().is_root() {
            let e = as_user(Some("65534".into()), || Ok(())).await.unwrap_err();
            assert!(e.message.contains("take the groups"), "{e}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let p = secret.clone();
        let e = as_user(Some("65534".into()), move || {
            std::fs::read(&p).map_err(|e| fs_error("open", "secret", e))
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
        assert_eq!(std::fs::read(&secret).unwrap(), b"x");
        assert!(nix::unistd::geteuid().is_root());
    }

    #[tokio::test]
    async fn root_runs_as_itself() {
        let uid = as_user(None, || Ok(nix::unistd::geteuid().as_raw()))
            .await
            .unwrap_or(u32::MAX);
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
    }
}
