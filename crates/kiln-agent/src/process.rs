//! Turns a [`ProcessSpec`] into a command: environment, working directory, identity,
//! and its own process group (so a timeout or signal reaches its children too).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_proto::{ErrorKind, GuestError, ProcessSpec};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn command(spec: &ProcessSpec) -> Result<Command, GuestError> {
    let mut cmd = base_command(spec)?;
    cmd.process_group(0);
    Ok(cmd)
}

/// Like [`command`] but without a process group of its own (a terminal session calls setsid).
pub fn base_command(spec: &ProcessSpec) -> Result<Command, GuestError> {
    let Some(program) = spec.argv.first() else {
        return Err(GuestError::new(
            ErrorKind::InvalidRequest,
            "argv is empty: give the program to run",
        ));
    };
    let identity = crate::user::resolve(spec.user.as_deref())?;
    let path_var = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let cwd = spec.cwd.clone().unwrap_or_else(|| "/".to_string());
    if !Path::new(&cwd).is_dir() {
        return Err(GuestError::new(
            ErrorKind::NotFound,
            format!("working directory {cwd} does not exist"),
        ));
    }
    let resolved = find_program(program, path_var, &cwd).ok_or_else(|| {
        GuestError::new(
            ErrorKind::NotFound,
            format!("{program}: command not found (PATH={path_var})"),
        )
    })?;
    let mut cmd = Command::new(resolved);
    cmd.arg0(program)
        .args(&spec.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &identity.home)
        .env("HOSTNAME", "kiln")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd);
    if identity.uid != 0 || identity.gid != 0 {
        cmd.uid(identity.uid).gid(identity.gid);
    }
    Ok(cmd)
}

/// Finds an executable the way a shell would, so "not found" is a clear error instead of a
/// failed exec.
fn find_program(program: &str, path_var: &str, cwd: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = Path::new(cwd).join(program);
        return executable(&p).then_some(p);
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_path_and_by_relative_path() {
        assert!(find_program("sh", DEFAULT_PATH, "/").is_some());
        assert!(find_program("/bin/sh", "", "/").is_some());
        assert!(find_program("definitely-not-a-program", DEFAULT_PATH, "/").is_none());
        assert!(find_program("bin/sh", "", "/").is_some());
    }

    #[test]
    fn empty_argv_and_missing_cwd_are_clear_errors() {
        let err = command(&ProcessSpec::default()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        let spec = ProcessSpec {
            argv: vec!["sh".into()],
            cwd: Some("/no/such/dir".into()),
            ..Default::default()
        };
        assert!(command(&spec).unwrap_err().message.contains("/no/such/dir"));
    }
}
