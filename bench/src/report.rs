//! Turning samples into figures: medians, percentiles, units, tables printed both for a
//! terminal and as markdown ready to paste into `docs/performance.md`, and the verdict.

use std::fmt::Write;

/// Whether every run of a scenario did the right thing (targets aside).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Correct,
    Wrong,
}

impl Verdict {
    /// [`Wrong`](Self::Wrong) if `wrong`.
    pub fn wrong_if(wrong: bool) -> Self {
        if wrong {
            Self::Wrong
        } else {
            Self::Correct
        }
    }
}

/// What a run's line says about it: `ok`, or `WRONG: ` and its problems.
pub fn outcome(problems: &[String]) -> String {
    if problems.is_empty() {
        "ok".to_owned()
    } else {
        format!("WRONG: {}", problems.join("; "))
    }
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The `q`-quantile (0 to 1, nearest rank) of `values`; NaN when empty.
#[allow(
    clippy::cast_possible_truncation,
    reason = "a rank from a fraction of the length, within 0..=len"
)]
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Bytes per second in MiB/s.
pub fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / seconds
}

/// `1GiB`, `128KiB`, `1000B`: the shortest exact binary unit.
pub fn size(bytes: u64) -> String {
    conlog::config::ByteSize(bytes).to_string()
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// `met` or `MISSED`.
pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// A table with a header row, printed aligned for a terminal or as markdown.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Columns padded to their widest cell; numbers (and `-`) right-aligned.
    pub fn text(&self) -> String {
        let columns = self.header.len();
        let width = |c: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                let numeric = cell.starts_with(|ch: char| ch.is_ascii_digit() || ch == '-');
                let w = widths[c];
                if c > 0 {
                    line.push_str("  ");
                }
                if numeric && c > 0 {
                    let _ = write!(line, "{cell:>w$}");
                } else {
                    let _ = write!(line, "{cell:<w$}");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.header));
        let rule: Vec<String> = (0..self.header.len())
            .map(|c| if c == 0 { "---" } else { "---:" }.to_owned())
            .collect();
        out.push_str(&line(&rule));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// The markdown section of a report, from `---- markdown ----` to `---- end ----`: the caption
/// (if any) and a blank line, then the tables, a blank line between two.
pub fn print_markdown(caption: Option<&str>, tables: &[&Table]) {
    println!("---- markdown ----");
    if let Some(caption) = caption {
        println!("{caption}");
        println!();
    }
    for (i, table) in tables.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", table.markdown());
    }
    println!("---- end ----");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.0), 1.0);
        // Nearest rank: the smallest value with at least q of them at or below it.
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn tables() {
        let mut table = Table::new(&["what", "value"]);
        table.row(vec!["a".into(), "12.5".into()]);
        table.row(vec!["longer".into(), "3".into()]);
        assert_eq!(
            table.text(),
            "what    value\na        12.5\nlonger      3\n"
        );
        assert!(table
            .markdown()
            .starts_with("| what | value |\n| --- | ---: |\n"));
    }
}
