//! Whole numbers as JSON Schema counts them: `14` and `14.0` are both the integer 14, so a
//! client that writes every number as a float (JavaScript, some generators) is understood.
//! Fractions, negatives and values out of the field's range are still refused.
//!
//! Use with `#[serde(deserialize_with = "kiln_types::whole::de")]` (or `de_opt`, `de_vec`).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

/// A whole number of type `T`, read from an integer or an integral float.
pub struct Whole<T>(pub T);

struct WholeVisitor<T>(PhantomData<T>);

impl<T: TryFrom<u64>> Visitor<'_> for WholeVisitor<T> {
    type Value = Whole<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a whole number from 0 to {}", max_of::<T>())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        T::try_from(v)
            .map(Whole)
            .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        let u = u64::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))?;
        self.visit_u64(u)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        // 2^64 is the first float above u64::MAX.
        if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
            self.visit_u64(v as u64)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }
}

/// The largest value of `T`, for the message (found by halving: `T` is only `TryFrom<u64>`).
fn max_of<T: TryFrom<u64>>() -> u64 {
    let (mut lo, mut hi) = (0u64, u64::MAX);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if T::try_from(mid).is_ok() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

impl<'de, T: TryFrom<u64>> Deserialize<'de> for Whole<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WholeVisitor(PhantomData))
    }
}

pub fn de<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    Whole::deserialize(d).map(|w| w.0)
}

pub fn de_opt<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<Whole<T>>::deserialize(d).map(|o| o.map(|w| w.0))
}

pub fn de_vec<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<Whole<T>>::deserialize(d).map(|v| v.into_iter().map(|w| w.0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct S {
        #[serde(deserialize_with = "de")]
        port: u16,
        #[serde(default, deserialize_with = "de_opt")]
        secs: Option<u64>,
        #[serde(default, deserialize_with = "de_vec")]
        ports: Vec<u16>,
    }

    #[test]
    fn integral_floats_are_whole_numbers_and_nothing_else_is() {
        let s: S =
            serde_json::from_str(r#"{"port": 8080.0, "secs": 14, "ports": [1, 2.0]}"#).unwrap();
        assert_eq!((s.port, s.secs, s.ports), (8080, Some(14), vec![1, 2]));
        let s: S = serde_json::from_str(r#"{"port": 1}"#).unwrap();
        assert_eq!((s.secs, s.ports.len()), (None, 0));
        for bad in [
            r#"{"port": 1.5}"#,
            r#"{"port": -1}"#,
            r#"{"port": 65536}"#,
            r#"{"port": 1e300}"#,
            r#"{"port": "80"}"#,
            r#"{"port": 1, "secs": -3.0}"#,
        ] {
            let err = serde_json::from_str::<S>(bad).unwrap_err().to_string();
            assert!(err.contains("whole number"), "{bad}: {err}");
        }
        let err = serde_json::from_str::<S>(r#"{"port": 70000}"#).unwrap_err();
        assert!(err.to_string().contains("0 to 65535"), "{err}");
    }
}
