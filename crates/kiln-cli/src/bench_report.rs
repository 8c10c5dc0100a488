//! What `kiln bench` prints: every figure as the median of its rounds with their spread
//! (min and max), ratios with the spread their two inputs allow, as text or, with `--json`,
//! as one JSON document on stdout.

use serde_json::{json, Value};

/// One measured figure over its rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Stat> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Stat {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }

    /// `self / other` at the medians, and the lowest and highest ratio the samples allow.
    pub fn ratio(&self, other: &Stat) -> (f64, f64, f64) {
        (
            self.median / other.median,
            self.min / other.max,
            self.max / other.min,
        )
    }
}

pub struct Report {
    json: bool,
    meta: Value,
    rows: Vec<Value>,
}

impl Report {
    /// Starts a report; in text mode the header line is printed at once.
    pub fn new(json: bool, header: &str, meta: Value) -> Report {
        if !json {
            println!("{header}");
        }
        Report {
            json,
            meta,
            rows: Vec::new(),
        }
    }

    /// A text-only heading for the rows that follow.
    pub fn section(&mut self, title: &str) {
        if !self.json {
            println!("{title}");
        }
    }

    /// Records a figure from its samples (at least one) and prints its line.
    pub fn samples(&mut self, name: &str, unit: &str, samples: &[f64]) -> Stat {
        let stat = Stat::of(samples).unwrap_or(Stat {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            n: 0,
        });
        if !self.json {
            let spread = if stat.n > 1 {
                format!(" (min {:.1}, max {:.1}, n={})", stat.min, stat.max, stat.n)
            } else {
                String::new()
            };
            println!("{name:<36} {:>10.1} {unit}{spread}", stat.median);
        }
        self.rows.push(json!({
            "name": name, "unit": unit, "median": stat.median, "min": stat.min,
            "max": stat.max, "n": stat.n, "samples": samples,
        }));
        stat
    }

    /// Records `a / b` and prints it with its spread.
    pub fn ratio(&mut self, name: &str, a: &Stat, b: &Stat) {
        let (r, lo, hi) = a.ratio(b);
        if !self.json {
            let spread = if a.n > 1 || b.n > 1 {
                format!(" ({lo:.2}x to {hi:.2}x)")
            } else {
                String::new()
            };
            println!("  {name:<34} {r:>10.2}x{spread}");
        }
        self.rows.push(json!({
            "name": name, "unit": "ratio", "median": r, "min": lo, "max": hi,
        }));
    }

    /// In JSON mode, prints the whole report.
    pub fn finish(self) -> anyhow::Result<()> {
        if self.json {
            let doc = json!({"meta": self.meta, "figures": self.rows});
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread_of_the_rounds() {
        let s = Stat::of(&[30.0, 10.0, 20.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (20.0, 10.0, 30.0, 3));
        assert!(Stat::of(&[]).is_none());
        assert_eq!(Stat::of(&[f64::NAN, 5.0]).unwrap().n, 1);
    }

    #[test]
    fn a_ratio_spans_what_its_inputs_allow() {
        let cold = Stat::of(&[7000.0, 8000.0, 7500.0]).unwrap();
        let launch = Stat::of(&[100.0, 200.0, 150.0]).unwrap();
        let (r, lo, hi) = cold.ratio(&launch);
        assert_eq!(r, 50.0);
        assert_eq!(lo, 35.0);
        assert_eq!(hi, 80.0);
    }
}
