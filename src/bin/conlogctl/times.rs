//! Times on conlogctl's command line and in its output: `history --since/--until` take a
//! duration back from now (`10m`, `2h`, `500ms`) or an RFC 3339 time, whose seconds may be left
//! out (`2026-12-05T03:00Z`, `2026-12-05T03:00:00.5+01:00`); `--timestamps` prefixes lines with
//! RFC 3339 in UTC with nanoseconds, like `kubectl logs --timestamps`.

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// Nanoseconds since the Unix epoch of `text`: a duration before `now_nanos`, or an RFC 3339
/// time.
pub fn parse_when(text: &str, now_nanos: i64) -> Result<i64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(
            "a time is needed: a duration back from now (10m, 2h) or an RFC 3339 time \
                    (2026-12-05T03:00:00Z)"
                .to_owned(),
        );
    }
    if !text.contains('-') && !text.contains(':') {
        let back = conlog::config::HumanDuration::parse(text)?.get();
        let back = i64::try_from(back.as_nanos()).map_err(|_| format!("{text} is too long"))?;
        return Ok(now_nanos.saturating_sub(back).max(0));
    }
    let full = with_seconds(text);
    let time = OffsetDateTime::parse(&full, &Rfc3339).map_err(|e| {
        format!(
            "{text:?} is neither a duration (10m, 2h) nor an RFC 3339 time \
             (2026-12-05T03:00:00Z, 2026-12-05T03:00Z, 2026-12-05T04:00:00.25+01:00): {e}"
        )
    })?;
    let nanos = time.unix_timestamp_nanos();
    i64::try_from(nanos)
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| format!("{text} lies outside 1970..2262"))
}

/// `2026-12-05T03:00Z` → `2026-12-05T03:00:00Z` (RFC 3339 requires the seconds; operators
/// leave them out), and a date alone → its midnight, UTC.
fn with_seconds(text: &str) -> String {
    let bytes = text.as_bytes();
    if bytes.len() == 10 {
        return format!("{text}T00:00:00Z");
    }
    // `YYYY-MM-DDTHH:MM` then the zone: the character after the minutes is not `:`.
    if bytes.len() > 16 && bytes[13] == b':' && bytes[16] != b':' {
        return format!("{}:00{}", &text[..16], &text[16..]);
    }
    text.to_owned()
}

/// `2026-12-05T03:12:07.123456789Z`: UTC, always nine digits, so that prefixes line up.
pub fn format_time(unix_nanos: i64) -> String {
    let Ok(time) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_nanos)) else {
        return unix_nanos.to_string();
    };
    let time = time.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        time.nanosecond()
    )
}

/// The wall clock now, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_nanos()).unwrap_or(i64::MAX)
}

/// A wire timestamp.
pub fn timestamp(unix_nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_nanos.div_euclid(1_000_000_000),
        // Below 10^9.
        nanos: i32::try_from(unix_nanos.rem_euclid(1_000_000_000)).unwrap_or_default(),
    }
}

/// Nanoseconds since the epoch of a wire timestamp.
pub fn nanos_of(time: &prost_types::Timestamp) -> i64 {
    time.seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(time.nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_443_200_000_000_000; // 2026-12-05T04:00:00Z

    #[test]
    fn durations_count_back_from_now() {
        assert_eq!(parse_when("10m", NOW), Ok(NOW - 600_000_000_000));
        assert_eq!(parse_when("500ms", NOW), Ok(NOW - 500_000_000));
        assert_eq!(parse_when("0s", NOW), Ok(NOW));
        assert!(parse_when("10 parsecs", NOW).is_err());
        assert!(parse_when("", NOW).is_err());
    }

    #[test]
    fn rfc3339_with_or_without_seconds() {
        assert_eq!(parse_when("2026-12-05T04:00:00Z", NOW), Ok(NOW));
        assert_eq!(parse_when("2026-12-05T04:00Z", NOW), Ok(NOW));
        assert_eq!(
            parse_when("2026-12-05T03:00Z", NOW),
            Ok(NOW - 3_600_000_000_000)
        );
        assert_eq!(parse_when("2026-12-05T05:00+01:00", NOW), Ok(NOW));
        assert_eq!(
            parse_when("2026-12-05T04:00:00.000000007Z", NOW),
            Ok(NOW + 7)
        );
        assert_eq!(
            parse_when("2026-12-05", NOW),
            Ok(NOW - 4 * 3_600_000_000_000)
        );
        let error = parse_when("2026-13-05T04:00Z", NOW).unwrap_err();
        assert!(error.contains("RFC 3339"), "{error}");
        assert!(parse_when("1969-12-31T23:59:59Z", NOW).is_err());
    }

    #[test]
    fn prefixes_have_nine_digits_in_utc() {
        assert_eq!(format_time(NOW), "2026-12-05T04:00:00.000000000Z");
        assert_eq!(
            format_time(NOW + 123_456_789),
            "2026-12-05T04:00:00.123456789Z"
        );
        assert_eq!(parse_when(&format_time(NOW + 5), NOW), Ok(NOW + 5));
        assert_eq!(nanos_of(&timestamp(NOW + 5)), NOW + 5);
    }
}
