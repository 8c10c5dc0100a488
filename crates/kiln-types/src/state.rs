use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Lifecycle state of a microVM, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MicrovmState {
    Pending,
    Running,
    Suspended,
    Resuming,
    Terminated,
}

impl MicrovmState {
    pub fn as_str(self) -> &'static str {
        match self {
            MicrovmState::Pending => "PENDING",
            MicrovmState::Running => "RUNNING",
            MicrovmState::Suspended => "SUSPENDED",
            MicrovmState::Resuming => "RESUMING",
            MicrovmState::Terminated => "TERMINATED",
        }
    }

    /// The lifecycle graph: PENDING → RUNNING ⇄ (SUSPENDED → RESUMING → RUNNING), and any
    /// live state → TERMINATED.
    pub fn can_become(self, next: MicrovmState) -> bool {
        use MicrovmState::*;
        matches!(
            (self, next),
            (Pending, Running)
                | (Running, Suspended)
                | (Suspended, Resuming)
                | (Resuming, Running)
                | (Resuming, Suspended)
        ) || (self != Terminated && next == Terminated)
    }
}

impl fmt::Display for MicrovmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Unknown microVM state {0:?}: use PENDING, RUNNING, SUSPENDED, RESUMING or TERMINATED")]
pub struct ParseStateError(String);

impl FromStr for MicrovmState {
    type Err = ParseStateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "PENDING" => MicrovmState::Pending,
            "RUNNING" => MicrovmState::Running,
            "SUSPENDED" => MicrovmState::Suspended,
            "RESUMING" => MicrovmState::Resuming,
            "TERMINATED" => MicrovmState::Terminated,
            _ => return Err(ParseStateError(s.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::MicrovmState::*;
    use super::*;

    #[test]
    fn lifecycle_graph() {
        assert!(Pending.can_become(Running));
        assert!(Running.can_become(Suspended));
        assert!(Suspended.can_become(Resuming));
        assert!(Resuming.can_become(Running));
        for s in [Pending, Running, Suspended, Resuming] {
            assert!(s.can_become(Terminated));
        }
        assert!(!Running.can_become(Resuming));
        assert!(!Running.can_become(Running));
        assert!(!Terminated.can_become(Running));
        assert!(!Suspended.can_become(Running));
        assert_eq!("running".parse::<MicrovmState>().unwrap(), Running);
    }
}
