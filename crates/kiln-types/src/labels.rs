//! Labels: free-form `key=value` metadata on images and microVMs, set at creation, updated
//! later, and matched by list filters (`label=team=a`, `label=team`). Bounded, because a
//! client sets them and every list returns them.

use std::collections::BTreeMap;

/// An object's labels, in key order.
pub type Labels = BTreeMap<String, String>;

/// At most this many labels on one object.
pub const MAX_LABELS: usize = 64;
/// A key's longest length, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// A value's longest length, in characters.
pub const MAX_VALUE_CHARS: usize = 256;

/// Why a label or a label filter was refused; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("{0} labels; at most {MAX_LABELS} are allowed")]
    TooMany(usize),
    #[error(
        "label key {0:?}: use 1 to {MAX_KEY_BYTES} letters, digits, '.', '_', '-' or '/', \
         starting with a letter or digit"
    )]
    Key(String),
    #[error(
        "label {0:?}: the value is over {MAX_VALUE_CHARS} characters or has control characters"
    )]
    Value(String),
}

/// Checks one key.
pub fn check_key(key: &str) -> Result<(), LabelError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY_BYTES
        && key.as_bytes()[0].is_ascii_alphanumeric()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(LabelError::Key(shorten(key)))
    }
}

/// Checks one value.
pub fn check_value(key: &str, value: &str) -> Result<(), LabelError> {
    if value.chars().count() > MAX_VALUE_CHARS || value.chars().any(char::is_control) {
        return Err(LabelError::Value(shorten(key)));
    }
    Ok(())
}

/// Checks a whole set of labels.
pub fn check(labels: &Labels) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    for (k, v) in labels {
        check_key(k)?;
        check_value(k, v)?;
    }
    Ok(())
}

/// Applies a change: a key given a value is set, a key given `None` is removed. The result
/// is checked as a whole.
pub fn merge(
    labels: &Labels,
    change: &BTreeMap<String, Option<String>>,
) -> Result<Labels, LabelError> {
    let mut out = labels.clone();
    for (k, v) in change {
        match v {
            Some(v) => {
                out.insert(k.clone(), v.clone());
            }
            None => {
                out.remove(k);
            }
        }
    }
    check(&out)?;
    Ok(out)
}

/// One list filter: `key=value` (that value) or `key` (any value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelFilter {
    pub key: String,
    pub value: Option<String>,
}

impl LabelFilter {
    pub fn parse(text: &str) -> Result<LabelFilter, LabelError> {
        let (key, value) = match text.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (text, None),
        };
        check_key(key)?;
        if let Some(v) = value {
            check_value(key, v)?;
        }
        Ok(LabelFilter {
            key: key.to_string(),
            value: value.map(str::to_string),
        })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        match (&self.value, labels.get(&self.key)) {
            (Some(want), Some(have)) => want == have,
            (None, Some(_)) => true,
            (_, None) => false,
        }
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(MAX_KEY_BYTES + 1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_and_values_are_bounded() {
        for good in ["team", "a", "example.com/owner", "x_y-z.1", "9lives"] {
            assert_eq!(check_key(good), Ok(()), "{good}");
        }
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        for bad in ["", "-x", ".x", "a b", "a=b", "ä", long.as_str()] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        assert!(check(&labels(&[("a", "")])).is_ok());
        assert!(check(&labels(&[("a", "tab\there")])).is_err());
        assert!(check(&labels(&[("a", &"v".repeat(MAX_VALUE_CHARS + 1))])).is_err());
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert_eq!(check(&many), Err(LabelError::TooMany(MAX_LABELS + 1)));
    }

    #[test]
    fn a_change_sets_and_removes() {
        let base = labels(&[("team", "a"), ("env", "dev")]);
        let change = [
            ("env".to_string(), None),
            ("owner".to_string(), Some("bo".to_string())),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            merge(&base, &change).unwrap(),
            labels(&[("team", "a"), ("owner", "bo")])
        );
        let bad = [("no good".to_string(), Some(String::new()))]
            .into_iter()
            .collect();
        assert!(merge(&base, &bad).is_err());
    }

    #[test]
    fn filters_match_by_value_or_presence() {
        let l = labels(&[("team", "a"), ("env", "")]);
        assert!(LabelFilter::parse("team=a").unwrap().matches(&l));
        assert!(!LabelFilter::parse("team=b").unwrap().matches(&l));
        assert!(LabelFilter::parse("team").unwrap().matches(&l));
        assert!(LabelFilter::parse("env=").unwrap().matches(&l));
        assert!(!LabelFilter::parse("owner").unwrap().matches(&l));
        // `a=b=c` is key `a`, value `b=c`.
        assert_eq!(
            LabelFilter::parse("a=b=c").unwrap().value.as_deref(),
            Some("b=c")
        );
        assert!(LabelFilter::parse("=a").is_err());
    }
}
