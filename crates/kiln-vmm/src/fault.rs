//! Fault injection for tests: `KILN_FAULT_AT=<step>[,<step>…]` makes the process kill
//! itself with SIGKILL (what `kill -9` or the OOM killer does) when it reaches a named step
//! of a transition, so the fault-injection suite can prove that recovery completes or rolls
//! back every step. Unset (always, outside tests), a step costs one environment lookup.
//!
//! Steps: `launch.before-run`, `launch.started`, `launch.hooked`, `suspend.hooked`,
//! `suspend.saving`, `suspend.saved`, `resume.before-run`, `resume.started`,
//! `terminate.killed`.

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
