//! The control plane's side of the ingress: connecting to a guest port (auto-resuming a
//! suspended microVM when its policy allows), the activity guard, and token issuing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_proxy::server::{Backend, BackendError, BoxFuture, GuestStream};
use kiln_proxy::shell::{ShellChannels, ShellInput, ShellOutput};
use kiln_types::MicrovmState;
use kiln_vmm::agent::ExecEvent;
use tokio::sync::mpsc;

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

impl IngressBackend {
    /// The agent of a RUNNING microVM, resuming it first when its policy allows and waiting
    /// (bounded) while it is launching or resuming.
    async fn running_agent(&self, id: &str) -> Result<kiln_vmm::AgentClient, BackendError> {
        let m = &self.0;
        let deadline = Instant::now() + WAIT_FOR_RUNNING;
        loop {
            // Subscribed before each look, so a change between the look and the wait wakes it.
            let mut state = m.watch_state(id);
            if let Some(agent) = m.agents.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
                return Ok(agent.clone());
            }
            let row = match m.store().microvm(id) {
                Ok(Some(row)) => row,
                Ok(None) => return Err(BackendError::NotFound),
                Err(e) => return Err(BackendError::Unavailable(e.to_string())),
            };
            match row.state {
                MicrovmState::Terminated => return Err(BackendError::NotFound),
                // Being suspended (then auto-resumed) or launched: wait for the change.
                MicrovmState::Running => {}
                MicrovmState::Suspended => {
                    let config: Option<MicrovmConfig> =
                        serde_json::from_value(row.config.clone()).ok();
                    if !config.is_some_and(|c| c.idle_policy.auto_resume_enabled) {
                        return Err(BackendError::NotRunning(format!(
                            "microVM {id} is SUSPENDED and autoResumeEnabled is false: call ResumeMicrovm first"
                        )));
                    }
                    // A concurrent request may be resuming it already: then just wait.
                    let _ = m.resume(id, "auto-resume: ingress request").await;
                }
                MicrovmState::Pending | MicrovmState::Resuming => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackendError::NotRunning(format!(
                    "microVM {id} did not become RUNNING within {WAIT_FOR_RUNNING:?}"
                )));
            }
            // Woken by the actor's next state change (the agent is published with RUNNING).
            let Some(state) = state.as_mut() else {
                return Err(BackendError::NotRunning(format!(
                    "microVM {id} is {} and nothing is running it",
                    row.state
                )));
            };
            let _ = tokio::time::timeout(left, state.changed()).await;
        }
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
            // A SUSPENDED one stranded on a node that is gone is taken over here; another
            // node's microVM is reached through its owner (crate::tunnel).
            crate::travel::take_stranded(&self.0, &id)
                .await
                .map_err(|e| BackendError::Unavailable(e.message))?;
            if let Some(node) = crate::cluster::owner_elsewhere(&self.0, &id)
                .map_err(|e| BackendError::Unavailable(e.message))?
            {
                let key = self.0.key.clone();
                return crate::tunnel::open(&self.0, &key, &node, &id, port).await;
            }
            let agent = self.running_agent(&id).await?;
            match agent.connect_port(port).await {
                Ok(stream) => Ok(Box::new(stream) as Box<dyn GuestStream>),
                Err(e) => Err(BackendError::Unavailable(crate::manager::error_chain(&e))),
            }
        })
    }

    fn shell(
        &self,
        microvm: &str,
        cols: u16,
        rows: u16,
    ) -> BoxFuture<'_, Result<ShellChannels, BackendError>> {
        let id = microvm.to_string();
        Box::pin(async move {
            let agent = self.running_agent(&id).await?;
            let process = kiln_proto::ProcessSpec {
                argv: vec!["/bin/sh".into()],
                env: vec![("TERM".into(), "xterm-256color".into())],
                cwd: Some("/".into()),
                user: None,
            };
            let mut exec = agent
                .shell_stream(kiln_proto::ShellRequest {
                    process,
                    cols,
                    rows,
                })
                .await
                .map_err(|e| BackendError::Unavailable(crate::manager::error_chain(&e)))?;
            let (in_tx, mut in_rx) = mpsc::channel::<ShellInput>(32);
            let (out_tx, out_rx) = mpsc::channel::<ShellOutput>(32);
            let manager = self.0.clone();
            tokio::spawn(async move {
                let mut input_open = true;
                loop {
                    tokio::select! {
                        event = exec.next() => match event {
                            Ok(ExecEvent::Stdout(d)) | Ok(ExecEvent::Stderr(d)) => {
                                if out_tx.send(ShellOutput::Data(d)).await.is_err() {
                                    let _ = exec.signal(1).await;
                                    return;
                                }
                            }
                            Ok(ExecEvent::Exited(status)) => {
                                let _ = out_tx.send(ShellOutput::Exit(status.code)).await;
                                return;
                            }
                            Err(_) => {
                                let _ = out_tx.send(ShellOutput::Exit(None)).await;
                                return;
                            }
                        },
                        input = in_rx.recv(), if input_open => match input {
                            Some(ShellInput::Data(d)) => {
                                manager.record_activity(&id);
                                let _ = exec.send_stdin(&d).await;
                            }
                            Some(ShellInput::Resize { cols, rows }) => {
                                let _ = exec.resize(cols, rows).await;
                            }
                            None => {
                                // The client went away: hang up the terminal.
                                input_open = false;
                                let _ = exec.signal(1).await;
                            }
                        },
                    }
                }
            });
            Ok(ShellChannels {
                input: in_tx,
                output: out_rx,
            })
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
