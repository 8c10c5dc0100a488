//! What every list shares: label filters (`label=key=value`, `label=key`) and cursor
//! pagination. A page's cursor is the sort key of its last item (ids, names and zero-padded
//! times only, so it can be checked), and the next page starts after it: items created
//! between two pages are neither lost nor repeated when they sort after the cursor.

use kiln_api::{DEFAULT_PAGE, MAX_PAGE};
use kiln_types::{LabelFilter, Labels};

use crate::error::{ApiError, ApiResult};

/// The most `label` filters one list takes.
pub const MAX_FILTERS: usize = 16;
/// The longest cursor kilnd gives out.
const MAX_CURSOR: usize = 160;

/// Parses `label` parameters (400 with what is wrong).
pub fn filters(texts: &[String]) -> ApiResult<Vec<LabelFilter>> {
    if texts.len() > MAX_FILTERS {
        return Err(ApiError::bad_request(format!(
            "{} label filters; at most {MAX_FILTERS} are allowed",
            texts.len()
        )));
    }
    texts
        .iter()
        .map(|t| {
            LabelFilter::parse(t).map_err(|e| ApiError::bad_request(format!("label={t}: {e}")))
        })
        .collect()
}

/// Whether labels pass every filter.
pub fn matches(filters: &[LabelFilter], labels: &Labels) -> bool {
    filters.iter().all(|f| f.matches(labels))
}

/// One page of `items` (any order): sorted by `key`, those after `cursor`, at most `limit`
/// (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]); and the next page's cursor when more
/// follow.
pub fn page<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> String,
    limit: Option<u32>,
    cursor: Option<&str>,
) -> ApiResult<(Vec<T>, Option<String>)> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_PAGE} (got {limit})"
        )));
    }
    if let Some(c) = cursor {
        let valid = !c.is_empty()
            && c.len() <= MAX_CURSOR
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !valid {
            return Err(ApiError::bad_request(
                "cursor is not one kilnd gave out: pass the previous page's nextCursor",
            ));
        }
    }
    let mut keyed: Vec<(String, T)> = items.drain(..).map(|t| (key(&t), t)).collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let after = keyed
        .into_iter()
        .filter(|(k, _)| cursor.is_none_or(|c| k.as_str() > c));
    let mut out = Vec::new();
    let mut next = None;
    for (k, t) in after {
        if out.len() == limit as usize {
            next = Some(k);
            break;
        }
        out.push((k, t));
    }
    let next_cursor = next.and(out.last().map(|(k, _)| k.clone()));
    Ok((out.into_iter().map(|(_, t)| t).collect(), next_cursor))
}

/// The sort key of something created at `created_ms` with id `id`: oldest first.
pub fn by_age(created_ms: i64, id: &str) -> String {
    format!("{:020}.{id}", created_ms.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<u32> = (0..25).rev().collect();
        let key = |n: &u32| format!("{n:03}");
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (got, next) = page(items.clone(), key, Some(10), cursor.as_deref()).unwrap();
            assert!(got.len() <= 10);
            seen.extend(got);
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, (0..25).collect::<Vec<_>>());
        // A last page exactly full has no next cursor.
        let (got, next) = page((0..10).collect::<Vec<u32>>(), key, Some(10), None).unwrap();
        assert_eq!((got.len(), next), (10, None));
    }

    #[test]
    fn bad_limits_and_cursors_are_refused() {
        let items = vec![1u32];
        let key = |n: &u32| n.to_string();
        assert!(page(items.clone(), key, Some(0), None).is_err());
        assert!(page(items.clone(), key, Some(MAX_PAGE + 1), None).is_err());
        for bad in ["", "A", "a b", "../x", &"a".repeat(MAX_CURSOR + 1)] {
            assert!(
                page(items.clone(), key, None, Some(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(filters(&vec!["a".to_string(); MAX_FILTERS + 1]).is_err());
        assert!(filters(&["bad key=x".to_string()]).is_err());
    }

    #[test]
    fn age_keys_sort_as_times() {
        assert!(by_age(9, "b") < by_age(10, "a"));
        assert!(by_age(10, "a") < by_age(10, "b"));
    }
}
