//! The control plane's side of the ingress: connecting to a guest port (auto-resuming a
//! suspended microVM when its policy allows), the activity guard, and token issuing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proxy::server::{Backend, BackendError, BoxFuture, GuestStream};
use kiln_types::MicrovmState;

use crate::manager::{Manager, MicrovmConfig};

/// How long a request waits for a microVM to become RUNNING (launch or resume).
const WAIT_FOR_RUNNING: Duration = Duration::from_secs(60);

pub struct IngressBackend(pub Arc<Manager>);

/// Counts an open request or stream; the microVM is not suspended while any is open.
struct ActivityGuard {
    manager: Arc<Manager>,
    id: String,
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.manager.end_request(&self.id);
    }
}

impl Backend for IngressBackend {
    fn connect(
        &self,
        microvm: &str,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn GuestStream>, BackendError>> {
        let id = microvm.to_string();
        Box::pin(async move {
            let m = &self.0;
            let deadline = Instant::now() + WAIT_FOR_RUNNING;
            loop {
                let row = match m.store().microvm(&id) {
                    Ok(Some(row)) => row,
                    Ok(None) => return Err(BackendError::NotFound),
                    Err(e) => return Err(BackendError::Unavailable(e.to_string())),
                };
                let state: MicrovmState = row.state.parse().unwrap_or(MicrovmState::Terminated);
                match state {
                    MicrovmState::Terminated => return Err(BackendError::NotFound),
                    MicrovmState::Running => {
                        let agent = {
                            let slot = m.slot(&id);
                            let slot = slot.lock().await;
                            slot.vm.as_ref().map(|vm| vm.agent().clone())
                        };
                        if let Some(agent) = agent {
                            return match agent.connect_port(port).await {
                                Ok(stream) => Ok(Box::new(stream) as Box<dyn GuestStream>),
                                Err(e) => {
                                    Err(BackendError::Unavailable(crate::manager::error_chain(&e)))
                                }
                            };
                        }
                    }
                    MicrovmState::Suspended => {
                        let config: Option<MicrovmConfig> =
                            serde_json::from_value(row.config.clone()).ok();
                        if !config.is_some_and(|c| c.idle_policy.auto_resume_enabled) {
                            return Err(BackendError::NotRunning(format!(
                                "microVM {id} is SUSPENDED and autoResumeEnabled is false: call ResumeMicrovm first"
                            )));
                        }
                        // A concurrent request may be resuming it already: then just wait.
                        let _ = m.resume(&id, "auto-resume: ingress request").await;
                    }
                    MicrovmState::Pending | MicrovmState::Resuming => {}
                }
                if Instant::now() > deadline {
                    return Err(BackendError::NotRunning(format!(
                        "microVM {id} did not become RUNNING within {WAIT_FOR_RUNNING:?}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    fn activity(&self, microvm: &str) -> Box<dyn Send + Sync> {
        self.0.begin_request(microvm);
        Box::new(ActivityGuard {
            manager: self.0.clone(),
            id: microvm.to_string(),
        })
    }

    fn hook_port(&self, microvm: &str) -> Option<u16> {
        let row = self.0.store().microvm(microvm).ok().flatten()?;
        let config: MicrovmConfig = serde_json::from_value(row.config).ok()?;
        Some(config.hook_port)
    }
}
