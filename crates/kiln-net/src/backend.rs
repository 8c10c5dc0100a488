//! The network backend as a process of its own, one per running microVM
//! (`kiln-net-backend`, jailed like QEMU but in the host's network namespace). kilnd hands
//! it the compiled policy and the counters so far on standard input, the guest's link as
//! descriptor 3 (the other end is QEMU's `-netdev stream`), and reads what it reports, one
//! JSON object per line on descriptor 4: the counters (at most every [`COUNTER_INTERVAL`],
//! on each new reader, and once more at the end) and each denial.
//!
//! Descriptor 4 is either a connected stream ([`Reports::Stream`]: builds, tests, the CLI)
//! or a listening socket ([`Reports::Listener`]: kilnd's microVMs), so that a kilnd that
//! restarts reconnects to a backend that kept serving its guest: the newest reader gets
//! the reports, and the totals at once.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::observe::{CounterSnapshot, Denial, DenialSink, NetCounters};
use crate::policy::{DenyReason, EgressPolicy};

/// Largest configuration kilnd sends (a policy is at most a few hundred entries).
pub const MAX_CONFIG_BYTES: usize = 4 << 20;
/// Longest report line kilnd reads; longer ones are dropped.
pub const MAX_EVENT_LINE: usize = 4096;
/// How often changed counters are reported.
pub const COUNTER_INTERVAL: Duration = Duration::from_millis(100);
/// Denials queued for the report; beyond that they are only counted.
const EVENT_QUEUE: usize = 256;
/// A reader that takes no report for this long is dropped (a listener waits for the next).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the reports go.
pub enum Reports {
    /// One reader for the backend's whole life.
    Stream(Box<dyn AsyncWrite + Unpin + Send>),
    /// Readers connect here, one at a time; each new one replaces the last.
    Listener(tokio::net::UnixListener),
}

/// What kilnd sends on the backend's standard input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendConfig {
    pub policy: EgressPolicy,
    /// The microVM's totals so far: the backend counts on from them.
    pub counters: CounterSnapshot,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("the network backend's configuration is over {MAX_CONFIG_BYTES} bytes")]
    TooLarge,
    #[error("reading the network backend's configuration")]
    Read(#[source] std::io::Error),
    #[error("the network backend's configuration is not valid")]
    Parse(#[source] serde_json::Error),
}

impl BackendConfig {
    /// Reads the configuration from `r` (standard input), bounded.
    pub fn read(r: impl std::io::Read) -> Result<BackendConfig, ConfigError> {
        use std::io::Read;
        let mut bytes = Vec::new();
        r.take(MAX_CONFIG_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(ConfigError::Read)?;
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge);
        }
        serde_json::from_slice(&bytes).map_err(ConfigError::Parse)
    }
}

/// One line of the backend's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase", deny_unknown_fields)]
pub enum BackendEvent {
    /// The microVM's totals (not a delta).
    #[serde(rename_all = "camelCase")]
    Counters { counters: CounterSnapshot },
    #[serde(rename_all = "camelCase")]
    Denial {
        protocol: String,
        destination: String,
        reason: DenyReason,
    },
}

impl BackendEvent {
    /// Parses one report line; anything else (too long, not JSON, unknown) is `None`.
    pub fn parse(line: &str) -> Option<BackendEvent> {
        if line.len() > MAX_EVENT_LINE {
            return None;
        }
        serde_json::from_str(line).ok()
    }

    /// The denial this event reports, if it is one.
    pub fn into_denial(self) -> Option<Denial> {
        match self {
            BackendEvent::Denial {
                protocol,
                destination,
                reason,
            } => Some(Denial {
                protocol: match protocol.as_str() {
                    "tcp" => "tcp",
                    "udp" => "udp",
                    "dns" => "dns",
                    _ => "other",
                },
                destination: destination.chars().take(256).collect(),
                reason,
            }),
            BackendEvent::Counters { .. } => None,
        }
    }
}

/// Serves `link` under `config` until the guest's side closes, reporting to `reports`. A
/// report that cannot be written (kilnd went away) is dropped; the guest is still served.
pub async fn run(link: tokio::net::UnixStream, config: BackendConfig, reports: Reports) {
    let counters = Arc::new(NetCounters::from_snapshot(config.counters));
    let (tx, rx) = mpsc::channel::<BackendEvent>(EVENT_QUEUE);
    let denials: DenialSink = Arc::new(move |d: Denial| {
        let _ = tx.try_send(BackendEvent::Denial {
            protocol: d.protocol.to_string(),
            destination: d.destination,
            reason: d.reason,
        });
    });
    let reporter = tokio::spawn(report(rx, counters.clone(), reports));
    crate::serve(link, Arc::new(config.policy), counters, denials).await;
    // The stack (and with it the last sender) is gone: the reporter writes the final totals.
    let _ = tokio::time::timeout(Duration::from_secs(5), reporter).await;
}

async fn report(
    mut rx: mpsc::Receiver<BackendEvent>,
    counters: Arc<NetCounters>,
    reports: Reports,
) {
    let (mut out, listener) = match reports {
        Reports::Stream(w) => (Some(w), None),
        Reports::Listener(l) => (None, Some(l)),
    };
    let mut tick = tokio::time::interval(COUNTER_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = counters.snapshot();
    loop {
        let event = tokio::select! {
            event = rx.recv() => match event {
                Some(e) => e,
                None => break,
            },
            _ = tick.tick() => {
                let now = counters.snapshot();
                if now == last {
                    continue;
                }
                last = now;
                BackendEvent::Counters { counters: now }
            }
            reader = accept(listener.as_ref()) => {
                let Ok(reader) = reader else { continue };
                // A new reader learns the totals at once.
                out = Some(Box::new(reader));
                last = counters.snapshot();
                BackendEvent::Counters { counters: last }
            }
        };
        send(&mut out, &event).await;
        // A denial's count goes out with it, not a tick later.
        let now = counters.snapshot();
        if matches!(event, BackendEvent::Denial { .. }) && now != last {
            last = now;
            send(&mut out, &BackendEvent::Counters { counters: now }).await;
        }
    }
    let last = BackendEvent::Counters {
        counters: counters.snapshot(),
    };
    send(&mut out, &last).await;
}

/// The next reader on `listener`; never, without one.
async fn accept(
    listener: Option<&tokio::net::UnixListener>,
) -> std::io::Result<tokio::net::UnixStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Writes one line to the reader, if there is one; a reader that is gone or stalled is
/// dropped.
async fn send(out: &mut Option<Box<dyn AsyncWrite + Unpin + Send>>, event: &BackendEvent) {
    let Some(w) = out else { return };
    let Ok(mut line) = serde_json::to_vec(event) else {
        return;
    };
    line.push(b'\n');
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        w.write_all(&line).await?;
        w.flush().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        *out = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_bad_lines_are_dropped() {
        let counters = BackendEvent::Counters {
            counters: CounterSnapshot {
                bytes_out: 5,
                ..CounterSnapshot::default()
            },
        };
        let line = serde_json::to_string(&counters).unwrap();
        assert!(line.contains("\"event\":\"counters\""), "{line}");
        assert!(line.contains("\"bytesOut\":5"), "{line}");
        assert_eq!(BackendEvent::parse(&line), Some(counters));
        let denial = BackendEvent::Denial {
            protocol: "tcp".into(),
            destination: "10.0.0.1:80".into(),
            reason: DenyReason::PrivateRange,
        };
        let line = serde_json::to_string(&denial).unwrap();
        let d = BackendEvent::parse(&line).unwrap().into_denial().unwrap();
        assert_eq!((d.protocol, d.reason), ("tcp", DenyReason::PrivateRange));
        for bad in [
            "",
            "{}",
            "{\"event\":\"other\"}",
            &"x".repeat(MAX_EVENT_LINE + 1),
        ] {
            assert_eq!(BackendEvent::parse(bad), None, "{bad:.40}");
        }
        let odd = BackendEvent::Denial {
            protocol: "icmp\n".into(),
            destination: "d".repeat(10_000),
            reason: DenyReason::NotAllowed,
        };
        let d = odd.into_denial().unwrap();
        assert_eq!(d.protocol, "other");
        assert_eq!(d.destination.len(), 256);
    }

    #[test]
    fn a_policy_survives_the_trip_to_the_backend() {
        use crate::policy::{Connector, Destination, HostFacts, OperatorConfig};
        let policy = EgressPolicy::compile(
            &[Connector::Allowlist {
                destinations: vec![Destination {
                    cidr: None,
                    name: Some("*.example.com".into()),
                    ports: vec![443],
                }],
            }],
            &OperatorConfig::default(),
            HostFacts::default(),
        )
        .unwrap();
        let config = BackendConfig {
            policy,
            counters: CounterSnapshot::default(),
        };
        let json = serde_json::to_vec(&config).unwrap();
        let back = BackendConfig::read(&json[..]).unwrap();
        assert!(back.policy.name_rule("api.example.com").is_some());
        assert!(back.policy.name_rule("example.org").is_none());
        let huge = vec![b' '; MAX_CONFIG_BYTES + 1];
        assert!(matches!(
            BackendConfig::read(&huge[..]),
            Err(ConfigError::TooLarge)
        ));
        assert!(matches!(
            BackendConfig::read(&b"{}"[..]),
            Err(ConfigError::Parse(_))
        ));
    }
}
