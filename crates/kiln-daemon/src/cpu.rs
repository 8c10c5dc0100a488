//! Baseline and burst, as the seed sizes a microVM: an image sets a CPU baseline; the guest
//! gets vCPUs enough for 4× that baseline; a microVM earns CPU credit while it runs below
//! its baseline and spends it above. While it has credit its cgroup quota is 4× the
//! baseline; once the credit is spent kilnd holds it to the baseline until it earns more.
//! The kernel's `cpu.cfs_burst_us` cannot give more than 2× a quota, so kilnd sets the
//! quota itself each tick, as burstable cloud instances do. Usage is read from the cgroup.

/// Burst is this many times the baseline.
pub const BURST_FACTOR: f64 = 4.0;
/// Smallest and largest baselines an image may ask for (4× the largest is 8 vCPUs).
pub const MIN_BASELINE: f64 = 0.05;
pub const MAX_BASELINE: f64 = 2.0;

/// The vCPUs a guest gets for `baseline` CPUs: enough to use 4× the baseline.
pub fn vcpus_for(baseline: f64) -> u8 {
    (baseline * BURST_FACTOR).ceil().clamp(1.0, 8.0) as u8
}

/// Checks an image's baseline, with the message a client sees.
pub fn check_baseline(baseline: f64) -> Result<(), String> {
    if baseline.is_finite() && (MIN_BASELINE..=MAX_BASELINE).contains(&baseline) {
        Ok(())
    } else {
        Err(format!(
            "cpuBaseline {baseline} must be {MIN_BASELINE} to {MAX_BASELINE} CPUs (the guest \
             gets vCPUs for 4x its baseline, at most 8)"
        ))
    }
}

/// One running microVM's credit account.
#[derive(Debug, Clone)]
pub struct CpuCredit {
    pub baseline: f64,
    /// CPU-seconds banked (0 ..= `max`).
    pub credit: f64,
    pub max: f64,
    /// Whether the quota is the burst one. Once the credit is spent it stays off until a
    /// tenth of the maximum is earned back: without that, a hog at its baseline would earn
    /// crumbs each tick and flap between the two quotas.
    pub bursting: bool,
    /// The cgroup's usage at the last tick.
    last_usage: Option<f64>,
}

/// The share of the maximum credit a held microVM must earn back before it bursts again.
pub const RESUME_BURST_SHARE: f64 = 0.1;

/// What one tick measured and decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tick {
    /// CPU-seconds used since the last tick.
    pub used: f64,
    /// Of those, CPU-seconds above the baseline.
    pub above: f64,
    /// The CPUs the quota allows from now on.
    pub quota_cpus: f64,
}

impl CpuCredit {
    /// A new account, full: a microVM starts able to burst.
    pub fn new(baseline: f64, max: f64) -> CpuCredit {
        CpuCredit {
            baseline,
            credit: max,
            max,
            bursting: max > 0.0,
            last_usage: None,
        }
    }

    /// The quota to start with: burst while there is credit.
    pub fn quota_cpus(&self) -> f64 {
        if self.bursting {
            self.baseline * BURST_FACTOR
        } else {
            self.baseline
        }
    }

    /// Accounts `usage` (the cgroup's total CPU-seconds now) over `elapsed` seconds.
    /// `throttled`: the kernel held the cgroup to its quota meanwhile (it wanted more).
    pub fn tick(&mut self, usage: f64, elapsed: f64, throttled: bool) -> Tick {
        let used = match self.last_usage {
            Some(last) if usage >= last => usage - last,
            // A new cgroup (after a resume) counts from zero.
            _ => usage.max(0.0),
        };
        self.last_usage = Some(usage);
        let allowance = self.baseline * elapsed.max(0.0);
        // Held to its baseline and still throttled, it wants more than it may use: it earns
        // nothing (timing noise between the two readings must not add up to a burst).
        if self.bursting || !throttled {
            self.credit = (self.credit + allowance - used).clamp(0.0, self.max);
        }
        if self.credit <= 0.0 {
            self.bursting = false;
        } else if self.credit >= self.max * RESUME_BURST_SHARE {
            self.bursting = true;
        }
        Tick {
            used,
            above: (used - allowance).max(0.0),
            quota_cpus: self.quota_cpus(),
        }
    }

    /// Forgets the last reading (the cgroup is new after a resume).
    pub fn restart(&mut self) {
        self.last_usage = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_cover_four_times_the_baseline() {
        assert_eq!(vcpus_for(0.1), 1);
        assert_eq!(vcpus_for(0.25), 1);
        assert_eq!(vcpus_for(0.5), 2);
        assert_eq!(vcpus_for(2.0), 8);
        assert!(check_baseline(0.25).is_ok());
        for bad in [0.0, 0.01, 2.5, f64::NAN, f64::INFINITY] {
            assert!(check_baseline(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_hog_spends_its_credit_then_is_held_to_its_baseline() {
        let mut c = CpuCredit::new(0.25, 2.0);
        assert_eq!(c.quota_cpus(), 1.0, "starts bursting");
        let first = c.tick(0.0, 0.0, false);
        assert_eq!(first.used, 0.0);
        // One CPU for a second: 0.75 CPU-seconds above the baseline each second.
        let t = c.tick(1.0, 1.0, false);
        assert_eq!((t.used, t.above, t.quota_cpus), (1.0, 0.75, 1.0));
        assert!((c.credit - 1.25).abs() < 1e-9);
        c.tick(2.0, 1.0, false);
        let t = c.tick(3.0, 1.0, true);
        assert_eq!(c.credit, 0.0);
        assert_eq!(t.quota_cpus, 0.25, "spent: held to the baseline");
        // Crumbs of credit (a hog at its baseline) do not bring the burst back.
        let held = c.tick(3.0 + 0.25 * 0.5 + 0.001, 0.5, true);
        assert_eq!(
            (c.credit, held.quota_cpus),
            (0.0, 0.25),
            "throttled: no credit"
        );
        let t = c.tick(3.0 + 0.25 * 1.0 - 0.01, 0.5, false);
        assert!(c.credit > 0.0 && t.quota_cpus == 0.25, "{c:?}");
        // Idle: it earns its baseline back, up to the maximum.
        let t = c.tick(3.24, 4.0, false);
        assert_eq!((t.used, t.above, t.quota_cpus), (0.0, 0.0, 1.0));
        assert!((c.credit - 1.011).abs() < 1e-9, "{c:?}");
        c.tick(3.24, 100.0, false);
        assert_eq!(c.credit, 2.0, "never above the maximum");
    }

    #[test]
    fn a_new_cgroup_counts_from_zero() {
        let mut c = CpuCredit::new(0.5, 10.0);
        c.tick(50.0, 1.0, false);
        c.restart();
        let t = c.tick(0.2, 1.0, false);
        assert!((t.used - 0.2).abs() < 1e-9);
    }
}
