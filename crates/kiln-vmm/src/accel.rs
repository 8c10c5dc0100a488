//! The accelerator rule: KVM only when `/dev/kvm` opens *and* the CPU advertises vmx or svm;
//! otherwise TCG. `KILN_ACCEL=kvm|tcg` overrides. Hosts whose `/dev/kvm` is backed by
//! nested emulation without those flags are unusable for KVM, so the rule picks TCG there.

use std::path::Path;

use kiln_types::Accel;
use tracing::warn;

/// Warning printed wherever kiln reports its accelerator while in TCG dev mode.
pub const DEV_MODE_WARNING: &str = "dev mode: emulation (TCG), not a security boundary";

/// What the probe found, for `kiln doctor` and health output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccelProbe {
    pub kvm_device_opens: bool,
    pub cpu_virt_flag: Option<String>,
    pub override_value: Option<String>,
}

/// The chosen accelerator and a sentence saying why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
    pub probe: AccelProbe,
}

impl AccelChoice {
    pub fn dev_mode(&self) -> bool {
        self.accel.is_dev_mode()
    }
}

/// Probes this host and applies the rule (and `KILN_ACCEL`).
pub fn detect() -> Result<AccelChoice, kiln_types::ParseAccelError> {
    let probe = AccelProbe {
        kvm_device_opens: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        cpu_virt_flag: cpu_virt_flag(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()),
        override_value: std::env::var("KILN_ACCEL")
            .ok()
            .filter(|v| !v.trim().is_empty()),
    };
    let choice = decide(probe)?;
    if choice.dev_mode() {
        warn!(reason = %choice.reason, "{DEV_MODE_WARNING}");
    }
    Ok(choice)
}

/// The rule itself, separate from probing so it can be tested.
pub fn decide(probe: AccelProbe) -> Result<AccelChoice, kiln_types::ParseAccelError> {
    if let Some(value) = &probe.override_value {
        let accel: Accel = value.parse()?;
        return Ok(AccelChoice {
            accel,
            reason: format!("KILN_ACCEL={value}"),
            probe,
        });
    }
    let (accel, reason) = match (probe.kvm_device_opens, &probe.cpu_virt_flag) {
        (true, Some(flag)) => (Accel::Kvm, format!("/dev/kvm opens and the CPU advertises {flag}")),
        (true, None) => (
            Accel::Tcg,
            "/dev/kvm opens but the CPU advertises neither vmx nor svm (nested emulation): using TCG".to_string(),
        ),
        (false, _) => (Accel::Tcg, "/dev/kvm is missing or cannot be opened: using TCG".to_string()),
    };
    Ok(AccelChoice {
        accel,
        reason,
        probe,
    })
}

fn cpu_virt_flag(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find(|f| *f == "vmx" || *f == "svm")
        .map(str::to_string)
}

/// True when a path exists: used by `kiln doctor` to show the device even when it won't open.
pub fn kvm_device_present() -> bool {
    Path::new("/dev/kvm").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(opens: bool, flag: Option<&str>, over: Option<&str>) -> AccelProbe {
        AccelProbe {
            kvm_device_opens: opens,
            cpu_virt_flag: flag.map(str::to_string),
            override_value: over.map(str::to_string),
        }
    }

    #[test]
    fn kvm_needs_both_the_device_and_the_cpu_flag() {
        assert_eq!(
            decide(probe(true, Some("vmx"), None)).unwrap().accel,
            Accel::Kvm
        );
        assert_eq!(decide(probe(true, None, None)).unwrap().accel, Accel::Tcg);
        assert_eq!(
            decide(probe(false, Some("svm"), None)).unwrap().accel,
            Accel::Tcg
        );
    }

    #[test]
    fn override_wins_and_is_validated() {
        assert_eq!(
            decide(probe(false, None, Some("kvm"))).unwrap().accel,
            Accel::Kvm
        );
        assert_eq!(
            decide(probe(true, Some("vmx"), Some("tcg"))).unwrap().accel,
            Accel::Tcg
        );
        assert!(decide(probe(true, None, Some("xen"))).is_err());
    }

    #[test]
    fn reads_flags_from_cpuinfo() {
        assert_eq!(
            cpu_virt_flag("flags\t: fpu vme svm sse\n").as_deref(),
            Some("svm")
        );
        assert_eq!(cpu_virt_flag("flags\t: fpu sse4_2\n"), None);
    }

    #[test]
    fn this_host_follows_the_rule() {
        // Whatever this machine is, the probe's answer must agree with the rule applied to
        // what it saw (and on the CI hosts, which lack vmx/svm, that means TCG).
        let choice = detect().unwrap();
        let again = decide(choice.probe.clone()).unwrap();
        assert_eq!(choice.accel, again.accel);
        if choice.probe.override_value.is_none() && choice.probe.cpu_virt_flag.is_none() {
            assert_eq!(choice.accel, Accel::Tcg);
        }
    }
}
