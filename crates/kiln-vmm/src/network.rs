//! How a VM's NIC reaches the world. kiln's own backend (`kiln-net`) is the default: a
//! userspace stack in a process of its own (see `netproc`) behind QEMU's `-netdev stream`,
//! applying the VM's egress policy.
//! QEMU's built-in user-mode networking remains only for side-by-side benchmarks — it lets
//! the guest reach host loopback and must never carry a sandbox.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_net::{Connector, DenialSink, EgressPolicy, HostFacts, NetCounters, OperatorConfig};

use crate::confine::Confinement;
use crate::netproc::NetBackendProcess;
use crate::vm::VmError;

#[derive(Clone)]
pub enum NetworkAttachment {
    /// kiln's backend with this policy; counters and denials go to the caller.
    Egress {
        policy: Arc<EgressPolicy>,
        counters: Arc<NetCounters>,
        denials: DenialSink,
        /// Where the backend serves its reports, for a VM that outlives its kilnd (a path
        /// in a directory only root reads); `None`: a socket pair, gone with this process.
        control: Option<PathBuf>,
    },
    /// QEMU's user-mode networking (benchmarks only: no policy, host loopback reachable).
    QemuUserUnfiltered,
}

impl NetworkAttachment {
    /// kiln's backend with a policy that allows nothing: the safe default.
    pub fn closed() -> NetworkAttachment {
        NetworkAttachment::egress(EgressPolicy::default())
    }

    /// kiln's backend with the `internet` connector alone (public destinations).
    pub fn internet() -> NetworkAttachment {
        // INVARIANT: compile fails only for too many connectors, `none` with others, a bad
        // allowlist or an unknown host service; one `internet` connector is none of these.
        #[allow(clippy::expect_used)]
        let policy = EgressPolicy::compile(
            &[Connector::Internet],
            &OperatorConfig::default(),
            HostFacts::read(),
        )
        .expect("`internet` alone always compiles");
        NetworkAttachment::egress(policy)
    }

    /// kiln's backend with `policy`, fresh counters, denials only logged: at most
    /// [`DENIAL_LOGS_PER_MINUTE`] a minute (a hostile build step can be denied thousands of
    /// times a second; the counters still count every one).
    pub fn egress(policy: EgressPolicy) -> NetworkAttachment {
        let limiter = std::sync::Mutex::new(LogLimiter::default());
        NetworkAttachment::Egress {
            policy: Arc::new(policy),
            counters: Arc::new(NetCounters::default()),
            denials: Arc::new(move |d| {
                let mut l = limiter.lock().unwrap_or_else(|p| p.into_inner());
                match l.admit(std::time::Instant::now()) {
                    Admit::Log { suppressed: 0 } => tracing::info!("{d}"),
                    Admit::Log { suppressed } => {
                        tracing::info!("{d} ({suppressed} more denials were not logged)")
                    }
                    Admit::Drop => {}
                }
            }),
            control: None,
        }
    }

    /// The guest's link, before any process starts: QEMU's `-netdev` value and its
    /// descriptor (its descriptor 3), and the backend's end. QEMU and the backend can then
    /// start side by side; the socket pair holds what either sends first.
    pub(crate) fn link(&self) -> Result<Link, VmError> {
        match self {
            NetworkAttachment::Egress { .. } => {
                let (qemu_end, backend_end) =
                    std::os::unix::net::UnixStream::pair().map_err(|source| VmError::Dir {
                        path: "socketpair".into(),
                        source,
                    })?;
                Ok(Link {
                    qemu_fd: Some(qemu_end.into()),
                    backend_fd: Some(backend_end.into()),
                    netdev: "stream,id=net0,server=off,addr.type=fd,addr.str=3".into(),
                })
            }
            NetworkAttachment::QemuUserUnfiltered => Ok(Link {
                qemu_fd: None,
                backend_fd: None,
                netdev: "user,id=net0".into(),
            }),
        }
    }

    /// Starts the backend on the link's other end (QEMU's user networking has none).
    pub(crate) async fn start_backend(
        &self,
        backend_fd: Option<OwnedFd>,
        confinement: &Confinement,
        die_with_parent: bool,
    ) -> Result<Option<NetBackendProcess>, VmError> {
        let (
            NetworkAttachment::Egress {
                policy,
                counters,
                denials,
                control,
            },
            Some(fd),
        ) = (self, backend_fd)
        else {
            return Ok(None);
        };
        let backend = NetBackendProcess::spawn(
            policy,
            counters,
            denials,
            fd,
            confinement,
            die_with_parent,
            control.as_deref(),
        )
        .await?;
        Ok(Some(backend))
    }
}

/// The guest's link (see [`NetworkAttachment::link`]).
pub(crate) struct Link {
    /// QEMU's end (its descriptor 3).
    pub qemu_fd: Option<OwnedFd>,
    /// The backend's end (its descriptor 3).
    pub backend_fd: Option<OwnedFd>,
    pub netdev: OsString,
}

/// Denials logged per minute for guests without an event stream (builds, the CLI).
pub const DENIAL_LOGS_PER_MINUTE: u32 = 20;

/// A fixed one-minute window of at most [`DENIAL_LOGS_PER_MINUTE`] lines.
#[derive(Default)]
struct LogLimiter {
    window: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Log this one, saying how many were dropped before it.
    Log {
        suppressed: u64,
    },
    Drop,
}

impl LogLimiter {
    fn admit(&mut self, now: std::time::Instant) -> Admit {
        let fresh = self
            .window
            .is_none_or(|w| now.duration_since(w) >= std::time::Duration::from_secs(60));
        if fresh {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged < DENIAL_LOGS_PER_MINUTE {
            self.logged += 1;
            Admit::Log {
                suppressed: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Admit::Drop
        }
    }
}

impl Default for NetworkAttachment {
    fn default() -> Self {
        NetworkAttachment::closed()
    }
}

impl std::fmt::Debug for NetworkAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetworkAttachment::Egress { policy, .. } => write!(f, "Egress({policy:?})"),
            NetworkAttachment::QemuUserUnfiltered => f.write_str("QemuUserUnfiltered"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_logs_are_limited_per_minute_and_say_what_they_dropped() {
        let mut l = LogLimiter::default();
        let t0 = std::time::Instant::now();
        for _ in 0..DENIAL_LOGS_PER_MINUTE {
            assert_eq!(l.admit(t0), Admit::Log { suppressed: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(l.admit(t0), Admit::Drop);
        }
        let later = t0 + std::time::Duration::from_secs(61);
        assert_eq!(l.admit(later), Admit::Log { suppressed: 1000 });
        assert_eq!(l.admit(later), Admit::Log { suppressed: 0 });
    }
}
