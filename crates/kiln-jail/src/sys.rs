//! Every system call the jail makes, each in one small function. The jailer is
//! single-threaded, so `fork` and the calls after it are safe to use freely.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes a write lock on byte `slot` of `file`, owned by the open file description (so it is
/// released when the last process holding the descriptor ends, however it ends).
pub fn try_lock_byte(file: &std::fs::File, slot: u32) -> io::Result<bool> {
    // SAFETY: flock is plain data; all-zero is a valid value that is then filled in.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = libc::off_t::from(slot);
    lock.l_len = 1;
    // SAFETY: the descriptor is open for the call's duration and `lock` is a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Releases a lock taken with [`try_lock_byte`].
pub fn unlock_byte(file: &std::fs::File, slot: u32) -> io::Result<()> {
    // SAFETY: as in try_lock_byte.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_UNLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = libc::off_t::from(slot);
    lock.l_len = 1;
    // SAFETY: the descriptor is open and `lock` is a valid flock.
    check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) })
}

/// Changes the owner of `path` itself (never a symlink's target).
/// Clock ticks per second (the unit of CPU times in /proc), 100 when it cannot be read.
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf takes a constant and reads only system configuration.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated path for the call's duration.
    check(unsafe { libc::lchown(p.as_ptr(), uid, gid) })
}

/// New mount, IPC, UTS, network, cgroup and (for children) PID namespaces.
pub fn unshare_namespaces(host_network: bool) -> io::Result<()> {
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWCGROUP;
    if !host_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes only flags and changes only this process's namespaces.
    check(unsafe { libc::unshare(flags) })
}

pub enum Forked {
    Parent { child: libc::pid_t },
    Child,
}

/// Forks the (single-threaded) jailer.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the jailer has one thread, so the child is a complete copy with no locks held
    // by other threads; both sides go on with ordinary code.
    let pid = unsafe { libc::fork() };
    match pid {
        p if p < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
}

/// A pipe whose ends are closed on exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    use std::os::fd::FromRawFd;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for the call.
    check(unsafe {
        libc::mount(
            ptr(&src),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
    .map_err(|e| io::Error::new(e.kind(), format!("mount {}: {e}", target.to_string_lossy())))
}

/// Stops mount events from reaching the host's namespace.
pub fn make_mounts_private() -> io::Result<()> {
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
}

/// A small tmpfs: the jail's root.
pub fn mount_tmpfs(target: &Path) -> io::Result<()> {
    mount(
        Some(Path::new("tmpfs")),
        target,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=1m,nr_inodes=4096,mode=0755"),
    )
}

/// Binds `src` at `target`; read-only ones also lose suid, devices and (unless `exec`)
/// execution.
pub fn bind(src: &Path, target: &Path, read_only: bool, exec: bool, dev: bool) -> io::Result<()> {
    mount(Some(src), target, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    if !exec {
        flags |= libc::MS_NOEXEC;
    }
    if !dev {
        flags |= libc::MS_NODEV;
    }
    mount(None, target, None, flags, None)
}

/// A procfs of the jail's own PID namespace.
pub fn mount_proc(target: &Path) -> io::Result<()> {
    mount(
        Some(Path::new("proc")),
        target,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
}

/// Makes `root` the process's `/` and drops the old root from its namespace entirely.
pub fn pivot_into(root: &Path) -> io::Result<()> {
    std::env::set_current_dir(root)?;
    let dot = cstr(".")?;
    // SAFETY: both arguments are the valid string "."; pivot_root with the same directory
    // for both stacks the old root under the new one, which is then detached below.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as i32 })?;
    // SAFETY: `dot` is a valid path; detaching the old root leaves only the jail's mounts.
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })?;
    std::env::set_current_dir("/")
}

/// Remounts the (already pivoted) root read-only.
pub fn remount_root_read_only() -> io::Result<()> {
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Becomes `uid`/`gid` for good: no supplementary groups, every capability gone from the
/// bounding, ambient, permitted and effective sets, `no_new_privs` set.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments; capabilities above the kernel's last one
        // fail with EINVAL, which ends the loop.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 {
            break;
        }
    }
    // SAFETY: integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    // SAFETY: an empty list: the pointer is never read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only. Changing every uid away from 0 clears the permitted
    // and effective capabilities (no SECBIT_KEEP_CAPS is set).
    check(unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    // SAFETY: getuid and geteuid cannot fail.
    let (now, effective) = unsafe { (libc::getuid(), libc::geteuid()) };
    if now != uid || effective != uid {
        return Err(io::Error::other("the uid did not change"));
    }
    Ok(())
}

/// Asks the kernel to SIGKILL this process when its parent ends (set after the uid change,
/// which clears it).
pub fn die_with_parent() -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })
}

/// Closes every descriptor from 3 up.
/// Closes every descriptor from `first` up.
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; nothing in this process uses them after.
    check(unsafe { libc::close_range(first, libc::c_uint::MAX, 0) })
}

/// Closes descriptors `first..first + count` (the jailer's copies of the program's).
pub fn close_range(first: u32, count: u32) -> io::Result<()> {
    if count == 0 {
        return Ok(());
    }
    // SAFETY: as above; these descriptors belong to the jailed program, not to this process.
    check(unsafe { libc::close_range(first, first + count - 1, 0) })
}

pub fn set_umask(mask: libc::mode_t) {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) };
}

/// Replaces the process with `program`, with an empty environment.
pub fn exec(program: &Path, args: &[String]) -> io::Error {
    let Ok(prog) = cstr(program) else {
        return io::Error::from(io::ErrorKind::InvalidInput);
    };
    let mut argv: Vec<CString> = vec![prog.clone()];
    for a in args {
        match CString::new(a.as_bytes()) {
            Ok(c) => argv.push(c),
            Err(_) => return io::Error::from(io::ErrorKind::InvalidInput),
        }
    }
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let env: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: `prog`, `ptrs` and `env` are NUL-terminated and outlive the call; execve only
    // returns on failure.
    unsafe { libc::execve(prog.as_ptr(), ptrs.as_ptr(), env.as_ptr()) };
    io::Error::last_os_error()
}

/// How a child ended.
pub enum Ended {
    Code(i32),
    Signal(i32),
}

/// Waits for `child`, retrying on EINTR.
pub fn wait_for(child: libc::pid_t) -> io::Result<Ended> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid int for waitpid to fill in.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if libc::WIFEXITED(status) {
            return Ok(Ended::Code(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Ended::Signal(libc::WTERMSIG(status)));
        }
    }
}

/// Ends this process the way a child ended: same code, or killed by the same signal.
pub fn exit_like(ended: Ended) -> ! {
    match ended {
        Ended::Code(c) => std::process::exit(c),
        Ended::Signal(sig) => {
            // SAFETY: restoring the default action and raising the signal on ourselves; if it
            // does not end the process (it is ignored or stopped), exit below does.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
            std::process::exit(128 + sig)
        }
    }
}

pub fn getpid() -> u32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() as u32 }
}

/// Arranges for `fds` to be the spawned program's descriptors 3, 4, … in order; every other
/// descriptor of this process stays close-on-exec. The descriptors stay open here until
/// `cmd` is dropped.
pub fn pass_fds(cmd: &mut std::process::Command, fds: Vec<OwnedFd>) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let count = fds.len();
    if count > crate::spec::MAX_KEPT_FDS as usize {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut raw = [-1 as libc::c_int; crate::spec::MAX_KEPT_FDS as usize];
    for (slot, fd) in raw.iter_mut().zip(&fds) {
        *slot = fd.as_raw_fd();
    }
    let above = 3 + count as libc::c_int;
    // SAFETY: the closure runs in the forked child before exec. It only calls fcntl and
    // dup2, which are async-signal-safe, on descriptors it owns in that child, and
    // allocates nothing (`raw` is a fixed array captured by value). `fds` is moved in only
    // to keep the descriptors open in this process until `cmd` is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &fds;
            let mut moved = [-1 as libc::c_int; crate::spec::MAX_KEPT_FDS as usize];
            // First out of the way of 3.., so no target overwrites a source not yet moved.
            for i in 0..count {
                moved[i] = libc::fcntl(raw[i], libc::F_DUPFD_CLOEXEC, above);
                if moved[i] < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // dup2 clears close-on-exec on the target; the moved copies close at exec.
            for (i, fd) in moved.iter().enumerate().take(count) {
                if libc::dup2(*fd, 3 + i as libc::c_int) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// A descriptor that refers to process `pid` itself (never to a later process given the
/// same pid): it becomes readable when the process ends.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process a [`pidfd_open`] descriptor refers to.
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: the descriptor is open for the call; a null siginfo means "as kill(2) would".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
