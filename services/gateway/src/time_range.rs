//! The `from`/`to` bounds of analytics queries: RFC 3339 instants or times relative to the moment
//! the request arrived (`now`, `-15m`, `now-2h`, `-7d`), validated into a half-open range.
//!
//! Pure logic without HTTP so that it can be tested exhaustively; the caller turns a
//! [`TimeRangeError`] into the API's error body, naming [`TimeRangeError::field`].

use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// `from` when the client gives none: the last hour.
pub const DEFAULT_FROM: &str = "-1h";
/// `to` when the client gives none.
pub const DEFAULT_TO: &str = "now";
/// The longest range one query may cover; it bounds the work one request can ask of ClickHouse.
pub const MAX_RANGE_DAYS: i64 = 400;

/// The earliest instant accepted: `DateTime64` stores it, and nothing older was ever proxied.
const EARLIEST_UNIX_SECONDS: i64 = 0;
/// The last instant `DateTime64` can hold (2299-12-31T23:59:59Z).
const LATEST_UNIX_SECONDS: i64 = 10_413_791_999;

/// A half-open time range `[from, to)` at microsecond precision (the precision of the
/// `requests.time` column), so that what a response echoes is exactly what was queried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    from: OffsetDateTime,
    to: OffsetDateTime,
}

/// Why `from` or `to` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeRangeError {
    #[error(
        "{value:?} is not a time: use RFC 3339 (e.g. 2025-05-01T12:00:00Z) or a time relative to now \
         (now, -30s, -15m, -2h, -7d, -1w){hint}"
    )]
    Unparsable { field: &'static str, value: String, hint: &'static str },
    #[error("{value:?} is outside the supported years 1970 to 2299")]
    OutOfRange { field: &'static str, value: String },
    #[error("`from` ({from}) must be before `to` ({to})")]
    NotIncreasing { from: String, to: String },
    #[error("the range covers more than {MAX_RANGE_DAYS} days; query a shorter one")]
    TooLong,
}

impl TimeRangeError {
    /// The query parameter at fault; an ordering problem is blamed on `from`, which is the one
    /// clients usually compute.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Unparsable { field, .. } | Self::OutOfRange { field, .. } => field,
            Self::NotIncreasing { .. } | Self::TooLong => "from",
        }
    }
}

impl TimeRange {
    /// Parses both bounds against one `now`, so `from=-1h&to=now` covers exactly an hour.
    pub fn parse(from: Option<&str>, to: Option<&str>, now: OffsetDateTime) -> Result<Self, TimeRangeError> {
        let from_instant = parse_instant("from", from.unwrap_or(DEFAULT_FROM), now)?;
        let to_instant = parse_instant("to", to.unwrap_or(DEFAULT_TO), now)?;
        Self::new(from_instant, to_instant)
    }

    /// Validates a range: `from` strictly before `to`, at most [`MAX_RANGE_DAYS`] long.
    pub fn new(from: OffsetDateTime, to: OffsetDateTime) -> Result<Self, TimeRangeError> {
        let from_micros = truncate_to_micros(from);
        let to_micros = truncate_to_micros(to);
        if from_micros >= to_micros {
            return Err(TimeRangeError::NotIncreasing {
                from: format_rfc3339(from_micros),
                to: format_rfc3339(to_micros),
            });
        }
        if to_micros - from_micros > Duration::days(MAX_RANGE_DAYS) {
            return Err(TimeRangeError::TooLong);
        }
        Ok(Self { from: from_micros, to: to_micros })
    }

    pub fn from(&self) -> OffsetDateTime {
        self.from
    }

    pub fn to(&self) -> OffsetDateTime {
        self.to
    }

    /// Microseconds since the Unix epoch, the unit bound into ClickHouse queries.
    pub fn from_unix_micros(&self) -> i64 {
        unix_micros(self.from)
    }

    pub fn to_unix_micros(&self) -> i64 {
        unix_micros(self.to)
    }

    /// The range's length in seconds (positive by construction).
    pub fn seconds(&self) -> f64 {
        (self.to - self.from).as_seconds_f64()
    }
}

/// Parses one bound: `now`, `-<n><unit>` or `now-<n><unit>` (units s, m, h, d, w), or RFC 3339.
pub fn parse_instant(field: &'static str, value: &str, now: OffsetDateTime) -> Result<OffsetDateTime, TimeRangeError> {
    let instant = match relative_offset(value) {
        Some(Ok(offset)) => now.checked_sub(offset),
        Some(Err(())) => return Err(unparsable(field, value)),
        None => Some(OffsetDateTime::parse(value, &Rfc3339).map_err(|_| unparsable(field, value))?),
    };
    match instant {
        Some(instant) if (EARLIEST_UNIX_SECONDS..=LATEST_UNIX_SECONDS).contains(&instant.unix_timestamp()) => {
            Ok(instant)
        }
        _ => Err(TimeRangeError::OutOfRange { field, value: value.to_owned() }),
    }
}

/// `None` when the value is not relative syntax at all (so it is tried as RFC 3339), `Some(Err)`
/// when it starts like a relative time but is malformed.
fn relative_offset(value: &str) -> Option<Result<Duration, ()>> {
    let after_now = value.strip_prefix("now");
    if after_now == Some("") {
        return Some(Ok(Duration::ZERO));
    }
    let amount_and_unit = after_now.unwrap_or(value).strip_prefix('-')?;
    let unit_start = amount_and_unit.find(|character: char| !character.is_ascii_digit())?;
    let (digits, unit) = amount_and_unit.split_at(unit_start);
    // Nine digits keep `amount * seconds per week` far inside i64; nobody needs more.
    if digits.is_empty() || digits.len() > 9 {
        return Some(Err(()));
    }
    let Ok(amount) = digits.parse::<i64>() else {
        return Some(Err(()));
    };
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Some(Err(())),
    };
    Some(Ok(Duration::seconds(amount * seconds_per_unit)))
}

fn unparsable(field: &'static str, value: &str) -> TimeRangeError {
    // A `+` in a query string decodes to a space, which turns `+02:00` into ` 02:00`.
    let hint = if value.contains(' ') { "; encode '+' in a time zone offset as %2B" } else { "" };
    TimeRangeError::Unparsable { field, value: value.to_owned(), hint }
}

fn truncate_to_micros(instant: OffsetDateTime) -> OffsetDateTime {
    let utc = instant.to_offset(time::UtcOffset::UTC);
    utc.replace_nanosecond(utc.nanosecond() / 1_000 * 1_000).unwrap_or(utc)
}

fn unix_micros(instant: OffsetDateTime) -> i64 {
    // Bounded to years 1970..=2299 by parse_instant, so the quotient fits in i64.
    i64::try_from(instant.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

fn format_rfc3339(instant: OffsetDateTime) -> String {
    instant.format(&Rfc3339).unwrap_or_else(|_| instant.to_string())
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2025-06-15 12:00:00.123_456_789 UTC);

    fn instant(value: &str) -> Result<OffsetDateTime, TimeRangeError> {
        parse_instant("from", value, NOW)
    }

    #[test]
    fn relative_times_count_back_from_now() {
        assert_eq!(instant("now"), Ok(NOW));
        assert_eq!(instant("-30s"), Ok(NOW - Duration::seconds(30)));
        assert_eq!(instant("-15m"), Ok(NOW - Duration::minutes(15)));
        assert_eq!(instant("now-2h"), Ok(NOW - Duration::hours(2)));
        assert_eq!(instant("-7d"), Ok(NOW - Duration::days(7)));
        assert_eq!(instant("-1w"), Ok(NOW - Duration::weeks(1)));
        assert_eq!(instant("-0m"), Ok(NOW));
    }

    #[test]
    fn rfc3339_times_keep_their_instant_whatever_the_offset() {
        assert_eq!(instant("2025-06-15T10:00:00Z"), Ok(datetime!(2025-06-15 10:00:00 UTC)));
        assert_eq!(instant("2025-06-15T12:00:00+02:00"), Ok(datetime!(2025-06-15 10:00:00 UTC)));
        assert_eq!(instant("2025-06-15T10:00:00.5Z"), Ok(datetime!(2025-06-15 10:00:00.5 UTC)));
    }

    #[test]
    fn malformed_times_are_refused_with_the_field() {
        for bad in [
            "",
            "-",
            "-m",
            "-15",
            "15m",
            "-15x",
            "-1.5h",
            "+15m",
            "now+1h",
            "now-",
            "-15M",
            "- 15m",
            "-1234567890s",
            "yesterday",
            "2025-06-15",
            "2025-06-15T10:00:00",
            "2025-13-01T00:00:00Z",
            "1718445600",
        ] {
            let error = parse_instant("to", bad, NOW).err();
            assert!(matches!(error, Some(TimeRangeError::Unparsable { field: "to", .. })), "{bad:?} gave {error:?}");
        }
    }

    #[test]
    fn a_decoded_plus_gets_a_hint() {
        let message = instant("2025-06-15T12:00:00 02:00").err().map(|error| error.to_string());
        assert!(message.as_deref().is_some_and(|text| text.contains("%2B")), "{message:?}");
    }

    #[test]
    fn times_outside_datetime64_are_refused() {
        assert!(matches!(instant("1969-12-31T23:59:59Z"), Err(TimeRangeError::OutOfRange { .. })));
        assert!(matches!(instant("2300-01-01T00:00:00Z"), Err(TimeRangeError::OutOfRange { .. })));
        assert!(matches!(instant("-999999999w"), Err(TimeRangeError::OutOfRange { .. })));
        assert!(instant("1970-01-01T00:00:00Z").is_ok());
        assert!(instant("2299-12-31T23:59:59.999999Z").is_ok());
    }

    #[test]
    fn defaults_are_the_last_hour_truncated_to_microseconds() -> Result<(), TimeRangeError> {
        let range = TimeRange::parse(None, None, NOW)?;
        assert_eq!(range.to(), datetime!(2025-06-15 12:00:00.123_456 UTC));
        assert_eq!(range.from(), datetime!(2025-06-15 11:00:00.123_456 UTC));
        assert_eq!(range.seconds(), 3_600.0);
        assert_eq!(range.to_unix_micros() - range.from_unix_micros(), 3_600_000_000);
        Ok(())
    }

    #[test]
    fn from_must_come_before_to() {
        let equal = TimeRange::parse(Some("now"), Some("now"), NOW);
        assert!(matches!(equal, Err(TimeRangeError::NotIncreasing { .. })), "{equal:?}");
        let reversed = TimeRange::parse(Some("-1h"), Some("-2h"), NOW);
        assert_eq!(reversed.as_ref().err().map(TimeRangeError::field), Some("from"));
        // Sub-microsecond differences vanish at the column's precision, so they are empty too.
        let tiny = TimeRange::new(NOW, NOW + Duration::nanoseconds(100));
        assert!(matches!(tiny, Err(TimeRangeError::NotIncreasing { .. })), "{tiny:?}");
    }

    #[test]
    fn ranges_are_capped_at_400_days() {
        assert!(TimeRange::parse(Some("-400d"), None, NOW).is_ok());
        assert_eq!(TimeRange::parse(Some("-401d"), None, NOW), Err(TimeRangeError::TooLong));
        let long = TimeRange::parse(Some("2020-01-01T00:00:00Z"), Some("2025-01-01T00:00:00Z"), NOW);
        assert_eq!(long, Err(TimeRangeError::TooLong));
    }

    #[test]
    fn bad_bounds_name_their_own_field() {
        let bad_to = TimeRange::parse(Some("-1h"), Some("soon"), NOW);
        assert_eq!(bad_to.err().map(|error| error.field()), Some("to"));
        let bad_from = TimeRange::parse(Some("earlier"), Some("soon"), NOW);
        assert_eq!(bad_from.err().map(|error| error.field()), Some("from"));
    }
}
