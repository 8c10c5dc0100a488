//! Fault injection for tests: `KILN_FAULT_AT=<step>[,<step>…]` makes the process kill
//! itself with SIGKILL (what `kill -9` or the OOM killer does) when it reaches a named step
//! of a transition, so the fault-injection suite can prove that recovery completes or rolls
//! back every step. Unset (always, outside tests), a step costs one environment lookup.
//!
//! `KILN_FAULT_HOLD` holds a task at a step instead (see [`hold`]): `idle.decided`, after
//! the idle scheduler chose to suspend a microVM and before the suspend takes it.
//!
//! Steps: `launch.before-run`, `launch.started`, `launch.hooked`, `suspend.hooked`,
//! `suspend.saving`, `suspend.saved`, `resume.before-run`, `resume.started`,
//! `terminate.killed`; image bakes (kiln-image): `bake.started`, `bake.baked`,
//! `bake.recorded`; key rotation (kiln-proxy, through `rotate_with`): `rotate.written`,
//! `rotate.renamed`.

/// The variable that names the steps to die at.
pub const FAULT_AT: &str = "KILN_FAULT_AT";

/// Dies here if `KILN_FAULT_AT` names `step`.
pub fn point(step: &str) {
    let Some(steps) = std::env::var_os(FAULT_AT) else {
        return;
    };
    if steps.to_string_lossy().split(',').any(|s| s.trim() == step) {
        tracing::error!(step, "{FAULT_AT}: killing this process at {step}");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; this is never reached.
        std::process::abort();
    }
}

/// The variable that holds a step: `KILN_FAULT_HOLD=<step>=<file>` makes the task that
/// reaches `<step>` wait there for as long as `<file>` exists (a test removes it to let go).
pub const FAULT_HOLD: &str = "KILN_FAULT_HOLD";

/// Waits here while `KILN_FAULT_HOLD` names `step` and its file exists.
pub async fn hold(step: &str) {
    let Some(spec) = std::env::var_os(FAULT_HOLD) else {
        return;
    };
    let spec = spec.to_string_lossy().into_owned();
    let Some((name, file)) = spec.split_once('=') else {
        return;
    };
    if name != step {
        return;
    }
    let file = std::path::Path::new(file);
    if file.exists() {
        tracing::warn!(
            step,
            "{FAULT_HOLD}: holding at {step} while {} exists",
            file.display()
        );
    }
    while file.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
