use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Identifier of a microVM or template. Safe to use as a path component and a DNS label:
/// 1..=63 characters of `[a-z0-9-]`, not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

#[derive(Debug, thiserror::Error)]
#[error(
    "Invalid id {0:?}: use 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
)]
pub struct InvalidVmId(String);

impl VmId {
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidVmId> {
        let value = value.into();
        let valid = !value.is_empty()
            && value.len() <= 63
            && !value.starts_with('-')
            && !value.ends_with('-')
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid {
            Ok(VmId(value))
        } else {
            Err(InvalidVmId(value))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VmId {
    type Err = InvalidVmId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmId::new(s)
    }
}

impl TryFrom<String> for VmId {
    type Error = InvalidVmId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        VmId::new(value)
    }
}

impl From<VmId> for String {
    fn from(id: VmId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_label_shapes() {
        for ok in ["a", "vm-1", "0abc", &"x".repeat(63)] {
            assert!(VmId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_paths_and_odd_characters() {
        for bad in [
            "",
            "-a",
            "a-",
            "../x",
            "a/b",
            "A",
            "a b",
            "a.b",
            &"x".repeat(64),
        ] {
            assert!(VmId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserialization_validates() {
        assert!(serde_json::from_str::<VmId>("\"../etc\"").is_err());
        assert_eq!(
            serde_json::from_str::<VmId>("\"vm-2\"").unwrap().as_str(),
            "vm-2"
        );
    }
}
