//! Times and durations on the `dlq` command line: `--since 1h`, `--until 2026-01-31T12:00:00Z`,
//! `--connect-timeout 5s`.
//!
//! Durations use the services' grammar (`250ms`, `30s`, `5m`, `2h`, see
//! `orderflow_runtime::parse_duration`) plus days (`7d`), since dead letters are kept for weeks.
//! A time bound is an RFC 3339 time or a duration meaning "that long ago"; there a bare number
//! is refused: `--since 2026` must not quietly mean "2026 seconds ago".

use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const SECONDS_PER_DAY: u64 = 24 * 60 * 60;

/// A duration like `5s`, `30m`, `2h` or `7d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    if let Some(days) = trimmed.strip_suffix('d') {
        let days: u64 = days
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a whole number of days like 7d"))?;
        return days
            .checked_mul(SECONDS_PER_DAY)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is out of range"));
    }
    orderflow_runtime::parse_duration(trimmed)
}

/// `--since` / `--until`: an RFC 3339 time, or a duration with a unit meaning that long before
/// now. Returns the time as RFC 3339, the form `Filter` takes.
pub fn parse_time_bound(s: &str) -> Result<String, String> {
    time_bound_at(s, OffsetDateTime::now_utc()).map(format_rfc3339)
}

/// [`parse_time_bound`] relative to `now`.
pub fn time_bound_at(s: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let has_unit = s.ends_with(|c: char| c.is_ascii_alphabetic());
    let ago = has_unit.then(|| parse_duration(s)).and_then(Result::ok);
    let Some(ago) = ago else {
        return Err(format!(
            "{s:?} is neither an RFC 3339 time (2026-01-31T12:00:00Z) nor a time ago with a \
             unit (30m, 2h, 7d)"
        ));
    };
    time::Duration::try_from(ago)
        .ok()
        .and_then(|ago| now.checked_sub(ago))
        .ok_or_else(|| format!("{s:?} reaches too far back"))
}

/// RFC 3339 in UTC.
pub fn format_rfc3339(t: OffsetDateTime) -> String {
    // Formatting a UTC time as RFC 3339 fails only for years outside 0..=9999, which no clock
    // or parsed bound here produces; fall back to the debug form rather than panic.
    let t = t.to_offset(time::UtcOffset::UTC);
    t.format(&Rfc3339).unwrap_or_else(|_| format!("{t:?}"))
}

/// An RFC 3339 time shortened to whole seconds in UTC (`2026-01-31T12:00:03Z`) for tables;
/// anything else is returned as it is.
pub fn short_time(rfc3339: &str) -> String {
    match OffsetDateTime::parse(rfc3339, &Rfc3339) {
        Ok(t) => format_rfc3339(
            t.to_offset(time::UtcOffset::UTC)
                .replace_nanosecond(0)
                .unwrap_or(t),
        ),
        Err(_) => rfc3339.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn durations_take_the_services_units_and_days() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_mins(30)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_hours(2)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_hours(7 * 24)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("1.5d").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn time_bounds_are_rfc3339_or_that_long_ago() {
        let now = datetime!(2026-03-01 12:00:00 UTC);
        assert_eq!(
            time_bound_at("1h", now),
            Ok(datetime!(2026-03-01 11:00:00 UTC))
        );
        assert_eq!(
            time_bound_at("30m", now),
            Ok(datetime!(2026-03-01 11:30:00 UTC))
        );
        assert_eq!(
            time_bound_at("2d", now),
            Ok(datetime!(2026-02-27 12:00:00 UTC))
        );
        assert_eq!(
            time_bound_at("2026-01-31T10:00:00+02:00", now),
            Ok(datetime!(2026-01-31 08:00:00 UTC))
        );
        let refused = time_bound_at("2026", now).unwrap_err();
        assert!(refused.contains("RFC 3339"), "{refused}");
        assert!(time_bound_at("yesterday", now).is_err());
        assert!(time_bound_at("2026-01-31", now).is_err());
    }

    #[test]
    fn bounds_are_given_to_the_filter_in_utc() {
        assert_eq!(
            format_rfc3339(datetime!(2026-01-31 10:00:00 +02:00)),
            "2026-01-31T08:00:00Z"
        );
        let parsed = parse_time_bound("1h").unwrap();
        assert!(OffsetDateTime::parse(&parsed, &Rfc3339).is_ok(), "{parsed}");
    }

    #[test]
    fn table_times_are_whole_seconds() {
        assert_eq!(
            short_time("2026-01-31T12:00:03.123456789Z"),
            "2026-01-31T12:00:03Z"
        );
        assert_eq!(short_time("not a time"), "not a time");
    }
}
