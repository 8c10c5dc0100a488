use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The accelerator QEMU runs a guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization: the guest is isolated by the CPU.
    Kvm,
    /// Software emulation: for development only, not a security boundary.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// True when kiln runs in dev mode: emulation gives no isolation guarantee.
    pub fn is_dev_mode(self) -> bool {
        self == Accel::Tcg
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Unknown accelerator {0:?}: use \"kvm\" or \"tcg\"")]
pub struct ParseAccelError(String);

impl FromStr for Accel {
    type Err = ParseAccelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(ParseAccelError(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names_case_insensitively() {
        assert_eq!("KVM".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!(" tcg ".parse::<Accel>().unwrap(), Accel::Tcg);
        let err = "hvf".parse::<Accel>().unwrap_err().to_string();
        assert!(err.contains("hvf") && err.contains("kvm"), "{err}");
    }

    #[test]
    fn only_tcg_is_dev_mode() {
        assert!(Accel::Tcg.is_dev_mode());
        assert!(!Accel::Kvm.is_dev_mode());
    }
}
