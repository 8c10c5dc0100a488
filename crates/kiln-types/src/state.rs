use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Lifecycle state of a microVM, as the API shows it.
/// Read in any case (`running` too), written in capitals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum MicrovmState {
    Pending,
    Running,
    Suspended,
    Resuming,
    Terminated,
}

impl MicrovmState {
    pub const ALL: [MicrovmState; 5] = [
        MicrovmState::Pending,
        MicrovmState::Running,
        MicrovmState::Suspended,
        MicrovmState::Resuming,
        MicrovmState::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MicrovmState::Pending => "PENDING",
            MicrovmState::Running => "RUNNING",
            MicrovmState::Suspended => "SUSPENDED",
            MicrovmState::Resuming => "RESUMING",
            MicrovmState::Terminated => "TERMINATED",
        }
    }

    /// The lifecycle graph: PENDING → RUNNING ⇄ (SUSPENDED → RESUMING → RUNNING), a fork's
    /// clone PENDING → SUSPENDED (written from its parent, then resumed), and any live state
    /// → TERMINATED.
    pub fn can_become(self, next: MicrovmState) -> bool {
        use MicrovmState::*;
        matches!(
            (self, next),
            (Pending, Running)
                | (Pending, Suspended)
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

impl<'de> Deserialize<'de> for MicrovmState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

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

/// An image build's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ImageStatus {
    Creating,
    Successful,
    Failed,
    /// Baked with another QEMU or machine than this host has: `statusReason` names the
    /// differences, and `kiln image rebuild NAME` submits the build request again.
    RebuildRequired,
}

impl ImageStatus {
    pub const ALL: [ImageStatus; 4] = [
        ImageStatus::Creating,
        ImageStatus::Successful,
        ImageStatus::Failed,
        ImageStatus::RebuildRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Creating => "CREATING",
            ImageStatus::Successful => "SUCCESSFUL",
            ImageStatus::Failed => "FAILED",
            ImageStatus::RebuildRequired => "REBUILD_REQUIRED",
        }
    }
}

impl fmt::Display for ImageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Unknown image status {0:?}: use CREATING, SUCCESSFUL, FAILED or REBUILD_REQUIRED")]
pub struct ParseImageStatusError(String);

impl FromStr for ImageStatus {
    type Err = ParseImageStatusError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseImageStatusError(s.to_string()))
    }
}

/// What an auth token is for: the ingress (HTTP to the microVM's ports) or a shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Ingress,
    Shell,
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

    #[test]
    fn image_status_round_trips() {
        for s in ImageStatus::ALL {
            assert_eq!(s.as_str().parse::<ImageStatus>().unwrap(), s);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert!("DONE".parse::<ImageStatus>().is_err());
    }
}
