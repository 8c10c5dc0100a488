//! What the backend reports: counters per microVM and one event per denied destination.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::policy::DenyReason;

/// Live counters of one microVM's network; they survive suspend and resume because the
/// caller keeps the same `Arc` for every backend of that microVM.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub connections: AtomicU64,
    pub denials: AtomicU64,
    pub dns_queries: AtomicU64,
}

pub use kiln_types::NetworkCounters as CounterSnapshot;

impl NetCounters {
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            denials: self.denials.load(Ordering::Relaxed),
            dns_queries: self.dns_queries.load(Ordering::Relaxed),
        }
    }

    /// Starts from earlier totals (e.g. after kilnd restarts).
    pub fn from_snapshot(s: CounterSnapshot) -> NetCounters {
        NetCounters {
            bytes_out: AtomicU64::new(s.bytes_out),
            bytes_in: AtomicU64::new(s.bytes_in),
            connections: AtomicU64::new(s.connections),
            denials: AtomicU64::new(s.denials),
            dns_queries: AtomicU64::new(s.dns_queries),
        }
    }
}

/// One refused destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub protocol: &'static str,
    pub destination: String,
    pub reason: DenyReason,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} denied: {}",
            self.protocol, self.destination, self.reason
        )
    }
}

/// Where denials go (kilnd turns them into events, rate-limited).
pub type DenialSink = Arc<dyn Fn(Denial) + Send + Sync>;
