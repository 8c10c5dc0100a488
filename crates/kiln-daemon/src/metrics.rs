//! Per-microVM metrics: every tick the actor of a RUNNING microVM records a sample (CPU from
//! its metering, host memory as its QEMU's PSS, host disk as its overlay's allocated blocks,
//! network from its egress backend, and every [`GUEST_EVERY`] what the guest's agent says
//! of its memory and root disk). The last [`METRICS_KEPT`] samples stay in memory: the
//! newest is GetMicrovm's `metrics`, all of them GetMicrovmMetrics, and the newest feeds the
//! Prometheus gauges. History is not state: a restart of kilnd starts it again.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use kiln_api::{MicrovmMetrics, Usage, METRICS_KEPT};
use kiln_proto::GuestStats;

/// How often the guest is asked (its agent answers in a few ms, but under emulation every
/// question wakes a guest that may be idle).
pub const GUEST_EVERY: Duration = Duration::from_secs(5);
/// How long a tick waits for the guest's answer before going without.
pub const GUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// What one tick measured.
pub struct Sample {
    pub at_ms: i64,
    pub usage: Usage,
    pub host_memory_bytes: u64,
    pub host_disk_bytes: u64,
    /// `None` when the guest was not asked this tick or could not say.
    pub guest: Option<GuestStats>,
}

#[derive(Default)]
struct Series {
    samples: VecDeque<MicrovmMetrics>,
    /// The guest's last answer and when it came.
    guest: Option<(i64, GuestStats)>,
}

#[derive(Default)]
pub struct MetricsLog {
    series: Mutex<HashMap<String, Series>>,
}

impl MetricsLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Series>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the guest should be asked at `now_ms`.
    pub fn guest_due(&self, id: &str, now_ms: i64) -> bool {
        self.lock()
            .get(id)
            .and_then(|s| s.guest.as_ref())
            .is_none_or(|(at, _)| now_ms - at >= GUEST_EVERY.as_millis() as i64)
    }

    pub fn record(&self, id: &str, s: Sample) {
        let mut all = self.lock();
        let series = all.entry(id.to_string()).or_default();
        if let Some(g) = s.guest {
            series.guest = Some((s.at_ms, g));
        }
        let cpu_percent = match series.samples.back() {
            Some(prev) if s.at_ms > prev.at_ms => {
                let used = (s.usage.cpu_seconds - prev.cpu_seconds).max(0.0);
                used / ((s.at_ms - prev.at_ms) as f64 / 1000.0) * 100.0
            }
            _ => 0.0,
        };
        let guest = series.guest.as_ref().map(|(_, g)| g);
        let kib = |v: u64| v.saturating_mul(1024);
        let sample = MicrovmMetrics {
            at_ms: s.at_ms,
            cpu_percent,
            cpu_seconds: s.usage.cpu_seconds,
            host_memory_bytes: s.host_memory_bytes,
            host_disk_bytes: s.host_disk_bytes,
            guest_memory_total_bytes: guest.map(|g| kib(g.mem_total_kib)),
            guest_memory_available_bytes: guest.map(|g| kib(g.mem_available_kib)),
            guest_disk_total_bytes: guest.map(|g| g.disk_total_bytes),
            guest_disk_used_bytes: guest
                .map(|g| g.disk_total_bytes.saturating_sub(g.disk_free_bytes)),
            network_bytes_in: s.usage.network.bytes_in,
            network_bytes_out: s.usage.network.bytes_out,
        };
        if series.samples.len() == METRICS_KEPT {
            series.samples.pop_front();
        }
        series.samples.push_back(sample);
    }

    pub fn latest(&self, id: &str) -> Option<MicrovmMetrics> {
        self.lock().get(id).and_then(|s| s.samples.back().cloned())
    }

    /// The samples taken after `since_ms` (all with `None`), oldest first.
    pub fn history(&self, id: &str, since_ms: Option<i64>) -> Vec<MicrovmMetrics> {
        self.lock()
            .get(id)
            .map(|s| {
                s.samples
                    .iter()
                    .filter(|m| since_ms.is_none_or(|t| m.at_ms > t))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets the microVMs `keep` rejects (those no longer RUNNING).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }
}

/// A process's proportional set size in bytes (0 when it cannot be read).
pub fn pss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The blocks a file takes on disk, in bytes (0 when it cannot be read).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: i64, cpu: f64, guest: Option<GuestStats>) -> Sample {
        Sample {
            at_ms,
            usage: Usage {
                cpu_seconds: cpu,
                ..Default::default()
            },
            host_memory_bytes: 1,
            host_disk_bytes: 2,
            guest,
        }
    }

    #[test]
    fn cpu_percent_is_the_rate_since_the_last_sample_and_guest_figures_carry_on() {
        let log = MetricsLog::default();
        let g = GuestStats {
            mem_total_kib: 1000,
            mem_available_kib: 400,
            disk_total_bytes: 10,
            disk_free_bytes: 4,
        };
        assert!(log.guest_due("a", 0));
        log.record("a", sample(1000, 1.0, Some(g)));
        assert!(!log.guest_due("a", 2000) && log.guest_due("a", 6000));
        log.record("a", sample(2000, 1.5, None));
        let m = log.latest("a").unwrap();
        assert!((m.cpu_percent - 50.0).abs() < 1e-9, "{m:?}");
        assert_eq!(m.guest_memory_total_bytes, Some(1000 * 1024));
        assert_eq!(m.guest_disk_used_bytes, Some(6));
        assert_eq!(log.history("a", Some(1000)).len(), 1);
        assert_eq!(log.history("a", None).len(), 2);
        assert!(log.latest("b").is_none());
        log.retain(|id| id != "a");
        assert!(log.latest("a").is_none());
    }

    #[test]
    fn history_is_bounded() {
        let log = MetricsLog::default();
        for n in 0..(METRICS_KEPT as i64 + 10) {
            log.record("a", sample(n * 1000, 0.0, None));
        }
        let h = log.history("a", None);
        assert_eq!(h.len(), METRICS_KEPT);
        assert_eq!(h[0].at_ms, 10_000);
    }

    #[test]
    fn this_process_has_a_pss() {
        assert!(pss_bytes(std::process::id()) > 0);
        assert_eq!(pss_bytes(u32::MAX), 0);
    }
}
