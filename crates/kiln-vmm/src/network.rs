//! How a VM's NIC reaches the world. kiln's own backend (`kiln-net`) is the default: a
//! userspace stack behind a `-netdev stream` socket that applies the VM's egress policy.
//! QEMU's built-in user-mode networking remains only for side-by-side benchmarks — it lets
//! the guest reach host loopback and must never carry a sandbox.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use kiln_net::{
    Connector, DenialSink, EgressPolicy, HostFacts, NetCounters, NetworkBackend, OperatorConfig,
};

#[derive(Clone)]
pub enum NetworkAttachment {
    /// kiln's backend with this policy; counters and denials go to the caller.
    Egress {
        policy: Arc<EgressPolicy>,
        counters: Arc<NetCounters>,
        denials: DenialSink,
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

    /// kiln's backend with `policy`, fresh counters, denials only logged.
    pub fn egress(policy: EgressPolicy) -> NetworkAttachment {
        NetworkAttachment::Egress {
            policy: Arc::new(policy),
            counters: Arc::new(NetCounters::default()),
            denials: Arc::new(|d| tracing::info!("{d}")),
        }
    }

    /// Starts the backend (if any) and returns QEMU's `-netdev` value.
    pub(crate) fn start(
        &self,
        socket: &Path,
    ) -> std::io::Result<(Option<NetworkBackend>, OsString)> {
        match self {
            NetworkAttachment::Egress {
                policy,
                counters,
                denials,
            } => {
                let backend = NetworkBackend::start(
                    socket,
                    policy.clone(),
                    counters.clone(),
                    denials.clone(),
                )?;
                let mut arg = OsString::from("stream,id=net0,server=off,addr.type=unix,addr.path=");
                arg.push(socket);
                Ok((Some(backend), arg))
            }
            NetworkAttachment::QemuUserUnfiltered => Ok((None, "user,id=net0".into())),
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
