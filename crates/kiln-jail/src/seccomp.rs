//! The seccomp filter kiln puts on its own per-VM helpers (the network backend), which QEMU's
//! `-sandbox` does not cover. Like QEMU's, it denies what such a process never needs and an
//! attacker would: starting programs, tracing, namespaces, mounts, kernel modules and keys,
//! changing identity, raw or netlink sockets, io_uring. A denied call fails with `EPERM`;
//! `clone3` fails with `ENOSYS` so the C library falls back to `clone`, whose namespace
//! flags the filter can see.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(String),
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// System calls a helper never makes: denied whatever their arguments.
const DENIED: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_personality,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capset,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_fanotify_init,
    libc::SYS_move_pages,
    libc::SYS_migrate_pages,
    libc::SYS_vhangup,
];

/// Socket families a helper may open: IPv4 and IPv6 for the guest's connections and DNS,
/// Unix for the C library's resolver plumbing. Netlink, packet and the rest are denied.
const SOCKET_FAMILIES: &[libc::c_int] = &[libc::AF_INET, libc::AF_INET6, libc::AF_UNIX];

/// `clone` flags that would make new namespaces.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

fn arch() -> Result<TargetArch, SeccompError> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
}

fn build(e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Build(e.to_string())
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(build)
}

/// The `EPERM` filter: the denied calls, other socket families, namespace `clone`s.
fn eperm_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    // A rule matches when all its conditions do: the family is none of the allowed ones.
    let other_family = SOCKET_FAMILIES
        .iter()
        .map(|&f| cond(0, SeccompCmpOp::Ne, f as u64))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(other_family).map_err(build)?],
    );
    // Rules of one call match when any does: any namespace flag set.
    let namespace = NAMESPACE_FLAGS
        .iter()
        .map(|&f| {
            let flag = f as u64;
            SeccompRule::new(vec![cond(0, SeccompCmpOp::MaskedEq(flag), flag)?]).map_err(build)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, namespace);
    failing_with(rules, libc::EPERM)
}

/// The `ENOSYS` filter: `clone3`, whose flags sit behind a pointer no filter can read.
fn enosys_filter() -> Result<BpfProgram, SeccompError> {
    failing_with(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        libc::ENOSYS,
    )
}

/// A filter that allows every call but those `rules` match, which fail with `errno`.
fn failing_with(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: libc::c_int,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch()?,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// Puts the helper filter on this process. Call it before any thread starts: threads
/// created afterwards inherit it, threads already running would not.
pub fn confine_helper() -> Result<(), SeccompError> {
    let eperm = eperm_filter()?;
    let enosys = enosys_filter()?;
    seccompiler::apply_filter(&eperm).map_err(SeccompError::Install)?;
    seccompiler::apply_filter(&enosys).map_err(SeccompError::Install)?;
    Ok(())
}

/// A one-line description for `kiln doctor` and `/health`.
pub const HELPER_FILTER: &str = "kiln's own for the network backend (exec, ptrace, mounts, \
     namespaces, modules, keys, identity changes, io_uring, non-IP sockets denied)";

/// What [`probe_helper_filter`] found, one line per probe.
#[derive(Debug, Clone)]
pub struct Probe {
    pub ok: bool,
    pub lines: Vec<String>,
}

/// Run in a process that called [`confine_helper`]: tries what the filter must deny and
/// what it must allow, and says which behaved as it should. A probe whose call the filter
/// failed to deny ends the check as a failure, never as a success (`execve` runs `false`).
pub fn probe_helper_filter() -> Probe {
    let thread = std::thread::spawn(|| 7).join().ok() == Some(7);
    let mut probe = Probe {
        ok: thread,
        lines: vec![format!(
            "threads: {} ({})",
            if thread { "allowed" } else { "failed" },
            if thread { "ok" } else { "WRONG" }
        )],
    };
    let mut expect = |what: &str, rc: libc::c_long, denied: bool| {
        let err = std::io::Error::last_os_error();
        let was_denied = rc < 0 && err.raw_os_error() == Some(libc::EPERM);
        let good = was_denied == denied;
        probe.ok &= good;
        let seen = if rc >= 0 {
            "allowed".to_string()
        } else {
            format!("failed: {err}")
        };
        let verdict = if good { "ok" } else { "WRONG" };
        probe.lines.push(format!("{what}: {seen} ({verdict})"));
        rc
    };
    // SAFETY: socket takes only integers; a descriptor it returns is closed just below.
    let rc = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) };
    close_if_open(expect("socket(AF_NETLINK)", rc.into(), true));
    // SAFETY: as above.
    let rc = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    close_if_open(expect("socket(AF_INET)", rc.into(), false));
    // SAFETY: unshare takes only flags and changes only this process's namespaces (if
    // the filter let it, which the probe reports as a failure).
    let rc = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
    expect("unshare(CLONE_NEWUSER)", rc.into(), true);
    let prog = c"/bin/false";
    let argv = [prog.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: the path and both vectors are NUL-terminated and outlive the call. If the
    // filter failed to deny it, this process becomes `false`, which exits 1: a failure.
    let rc = unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    expect("execve", rc.into(), true);
    probe
}

fn close_if_open(fd: libc::c_long) {
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket and is owned by nobody else.
        unsafe { libc::close(fd as libc::c_int) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_compile_for_this_machine() {
        assert!(!eperm_filter().unwrap().is_empty());
        assert!(!enosys_filter().unwrap().is_empty());
    }
}
