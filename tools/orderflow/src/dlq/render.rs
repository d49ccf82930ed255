//! What `orderflow dlq` prints for people: tables, one dead letter in full, summaries. Pure
//! functions from the messaging crate's records to text, so they are unit-tested here.

use std::fmt::Write as _;

use orderflow_contracts::names::headers;
use orderflow_messaging::deadletter::{DeadLetter, Group, Outcome};

use super::when::short_time;

/// How many characters of an error a table shows.
const ERROR_WIDTH: usize = 72;

/// One line per dead letter: seq, time, consumer, subject, reason, deliveries, error.
pub fn letters_table(letters: &[DeadLetter]) -> String {
    let rows = letters
        .iter()
        .map(|dl| {
            vec![
                dl.seq.to_string(),
                short_time(&dl.dead_lettered_at),
                dl.consumer.clone(),
                or_dash(&dl.subject),
                dl.reason.clone(),
                dl.deliveries.to_string(),
                truncate(&dl.error, ERROR_WIDTH),
            ]
        })
        .collect();
    table(
        &[
            ("SEQ", Align::Right),
            ("DEAD-LETTERED", Align::Left),
            ("CONSUMER", Align::Left),
            ("SUBJECT", Align::Left),
            ("REASON", Align::Left),
            ("DELIVERIES", Align::Right),
            ("ERROR", Align::Left),
        ],
        rows,
    )
}

/// One line per fingerprint: count, fingerprint, first and last time, the last error.
pub fn groups_table(groups: &[Group]) -> String {
    let rows = groups
        .iter()
        .map(|g| {
            vec![
                g.count.to_string(),
                g.fingerprint.clone(),
                short_time(&g.first),
                short_time(&g.last),
                truncate(&g.last_error, ERROR_WIDTH),
            ]
        })
        .collect();
    table(
        &[
            ("COUNT", Align::Right),
            ("CONSUMER/REASON/EVENT TYPE", Align::Left),
            ("FIRST", Align::Left),
            ("LAST", Align::Left),
            ("LAST ERROR", Align::Left),
        ],
        rows,
    )
}

/// Every field of one dead letter, all its headers, and its payload (pretty-printed when it
/// is JSON).
pub fn letter_details(dl: &DeadLetter) -> String {
    let mut out = format!("dead letter {}\n", dl.seq);
    let origin = if dl.stream.is_empty() {
        "-".to_owned()
    } else {
        format!("{} sequence {}", dl.stream, dl.stream_sequence)
    };
    // `first_failure` falls back to the original's CloudEvents time: say which one it is.
    let first_seen = if dl
        .headers
        .iter()
        .any(|(k, _)| k == headers::DL_FIRST_FAILURE)
    {
        "first failure"
    } else {
        "published at"
    };
    let fields = [
        ("consumer", dl.consumer.clone()),
        ("reason", dl.reason.clone()),
        ("error", dl.error.clone()),
        ("deliveries", dl.deliveries.to_string()),
        ("subject", or_dash(&dl.subject)),
        ("origin", origin),
        ("event type", opt(dl.event_type.as_deref())),
        ("event id", opt(dl.event_id.as_deref())),
        (first_seen, opt(dl.first_failure.as_deref())),
        ("dead-lettered at", dl.dead_lettered_at.clone()),
    ];
    for (name, value) in fields {
        let _ = writeln!(out, "  {name:<17} {value}");
    }
    let _ = writeln!(out, "\nheaders ({})", dl.headers.len());
    for (name, value) in &dl.headers {
        let _ = writeln!(out, "  {name}: {value}");
    }
    out.push('\n');
    out.push_str(&payload(&dl.payload));
    out
}

/// The payload section of [`letter_details`].
fn payload(text: &str) -> String {
    if text.is_empty() {
        return "payload: empty\n".to_owned();
    }
    let bytes = text.len();
    let pretty = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok());
    if let Some(pretty) = pretty {
        return format!("payload (JSON, {bytes} bytes)\n{pretty}\n");
    }
    let note = if text.contains(char::REPLACEMENT_CHARACTER) {
        ", not valid UTF-8: shown lossily"
    } else {
        ""
    };
    format!("payload (not JSON, {bytes} bytes{note})\n{text}\n")
}

/// The last line of a replay or purge: `matched 3, replayed 3, errors 0`, then one line per
/// error.
pub fn outcome_summary(outcome: &Outcome, done_verb: &str) -> String {
    let mut out = format!(
        "matched {}, {done_verb} {}, errors {}",
        outcome.matched,
        outcome.done,
        outcome.errors.len()
    );
    if !outcome.seqs.is_empty() {
        let _ = write!(out, " (dead letters {})", seq_ranges(&outcome.seqs));
    }
    out.push('\n');
    for error in &outcome.errors {
        let _ = writeln!(out, "error: {error}");
    }
    out
}

/// How many ranges [`seq_ranges`] writes out before it only counts the rest.
const MAX_RANGES: usize = 12;

/// `1-3, 7, 9-10` for `[1, 2, 3, 7, 9, 10]`; after [`MAX_RANGES`] ranges, `… (N more)`.
pub fn seq_ranges(seqs: &[u64]) -> String {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for seq in sorted {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == seq => *end = seq,
            _ => ranges.push((seq, seq)),
        }
    }
    let mut parts: Vec<String> = ranges
        .iter()
        .take(MAX_RANGES)
        .map(|&(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect();
    if ranges.len() > MAX_RANGES {
        let hidden: u64 = ranges[MAX_RANGES..]
            .iter()
            .map(|(start, end)| end - start + 1)
            .sum();
        parts.push(format!("… ({hidden} more)"));
    }
    parts.join(", ")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell (in characters), two spaces apart; the last column is
/// not padded, so lines carry no trailing blanks.
fn table(columns: &[(&str, Align)], rows: Vec<Vec<String>>) -> String {
    let header: Vec<String> = columns.iter().map(|(name, _)| (*name).to_owned()).collect();
    let all: Vec<Vec<String>> = std::iter::once(header).chain(rows).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|c| {
            all.iter()
                .map(|row| row.get(c).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &all {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let width = widths[c];
            let last = c + 1 == row.len();
            let cell = match (columns[c].1, last) {
                (Align::Right, _) => format!("{cell:>width$}"),
                (Align::Left, false) => format!("{cell:<width$}"),
                (Align::Left, true) => cell.clone(),
            };
            if c > 0 {
                line.push_str("  ");
            }
            line.push_str(&cell);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// At most `max` characters, the last one an ellipsis when cut; line breaks become spaces.
fn truncate(s: &str, max: usize) -> String {
    let s = s.replace(['\r', '\n'], " ");
    if s.chars().count() <= max {
        return s;
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `1 dead letter`, `3 dead letters`.
pub fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn opt(s: Option<&str>) -> String {
    s.map_or_else(|| "-".to_owned(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let text = table(
            &[
                ("N", Align::Right),
                ("NAME", Align::Left),
                ("NOTE", Align::Left),
            ],
            vec![
                vec!["1".into(), "a".into(), "x".into()],
                vec!["120".into(), "longer".into(), String::new()],
            ],
        );
        assert_eq!(text, "  N  NAME    NOTE\n  1  a       x\n120  longer\n");
    }

    #[test]
    fn long_errors_are_cut_with_an_ellipsis() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdefghijkl", 5), "abcd…");
        assert_eq!(truncate("line\nbreak", 20), "line break");
        assert_eq!(
            truncate("ééééé", 5),
            "ééééé",
            "counts characters, not bytes"
        );
    }

    #[test]
    fn payloads_are_pretty_printed_when_json() {
        assert_eq!(
            payload(r#"{"a":1}"#),
            "payload (JSON, 7 bytes)\n{\n  \"a\": 1\n}\n"
        );
        assert_eq!(payload("garbage"), "payload (not JSON, 7 bytes)\ngarbage\n");
        assert_eq!(payload(""), "payload: empty\n");
    }

    #[test]
    fn sequences_are_shown_as_ranges() {
        assert_eq!(seq_ranges(&[9, 1, 2, 3, 7, 10]), "1-3, 7, 9-10");
        assert_eq!(seq_ranges(&[4]), "4");
        assert_eq!(seq_ranges(&[]), "");
        let many: Vec<u64> = (0..20).map(|i| i * 2).chain([100, 101, 102]).collect();
        assert_eq!(
            seq_ranges(&many),
            "0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, … (11 more)"
        );
    }

    #[test]
    fn summaries_count_and_list_errors() {
        let outcome = Outcome {
            matched: 3,
            done: 2,
            dry_run: false,
            seqs: vec![1, 2, 3],
            errors: vec!["dead letter 3: timed out".into()],
        };
        assert_eq!(
            outcome_summary(&outcome, "replayed"),
            "matched 3, replayed 2, errors 1 (dead letters 1-3)\nerror: dead letter 3: timed out\n"
        );
    }
}
