//! The filters every analytics endpoint shares (`from`, `to`, `route`, `upstream`, `consumer`,
//! `status`, `cache`): parsed from the query string, validated, and turned into a `WHERE` clause
//! whose values are all bound with `?` placeholders, never spliced into the SQL text.

use serde::Deserialize;
use serde::de::IntoDeserializer;
use stone_events::request::CacheStatus;
use time::OffsetDateTime;
use utoipa::IntoParams;

use crate::error::ApiError;
use crate::time_range::TimeRange;

/// Longest accepted route, upstream or consumer name; real names are far shorter, and the cap
/// keeps a hostile query string from becoming a hostile SQL literal.
const MAX_NAME_LENGTH: usize = 256;

/// The query parameters as documented in the OpenAPI document. The handler parses the raw pairs
/// with [`AnalyticsFilter::from_pairs`] instead (to name the failing field and to reject unknown
/// or repeated parameters); a test keeps the two in step.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AnalyticsQuery {
    /// Start of the range, inclusive: RFC 3339 (`2025-05-01T12:00:00Z`) or relative to now
    /// (`now`, `-30s`, `-15m`, `-2h`, `-7d`, `-1w`). Default `-1h`.
    #[param(example = "-1h")]
    pub from: Option<String>,
    /// End of the range, exclusive; same syntax as `from`. Default `now`. The range must be
    /// positive and at most 400 days.
    #[param(example = "now")]
    pub to: Option<String>,
    /// Only requests matched by this route.
    pub route: Option<String>,
    /// Only requests sent to this upstream.
    pub upstream: Option<String>,
    /// Only requests by this consumer.
    pub consumer: Option<String>,
    /// Only requests with this status: an exact code (`503`) or a class (`5xx`).
    #[param(example = "5xx")]
    pub status: Option<String>,
    /// Only requests with this cache outcome: `hit`, `miss`, `stale`, `revalidated`, `bypass` or
    /// `none`.
    #[param(example = "hit")]
    pub cache: Option<String>,
}

/// A status filter: one code, or a class such as `5xx` (`500..=599`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Exact(u16),
    Class { first: u16, last: u16 },
}

impl StatusFilter {
    pub fn parse(value: &str) -> Result<Self, ApiError> {
        let invalid = || {
            ApiError::invalid(
                "status",
                format!("{value:?} is not a status: use a code such as 503 or a class such as 5xx"),
            )
        };
        if let Some(digit) = value.strip_suffix("xx") {
            let class = match digit {
                "1" => 1,
                "2" => 2,
                "3" => 3,
                "4" => 4,
                "5" => 5,
                _ => return Err(invalid()),
            };
            return Ok(Self::Class { first: class * 100, last: class * 100 + 99 });
        }
        match value.parse::<u16>() {
            Ok(code) if value.len() == 3 && (100..=599).contains(&code) => Ok(Self::Exact(code)),
            _ => Err(invalid()),
        }
    }
}

/// Validated filters, ready to become a `WHERE` clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnalyticsFilter {
    pub range: TimeRange,
    pub route: Option<String>,
    pub upstream: Option<String>,
    pub consumer: Option<String>,
    pub status: Option<StatusFilter>,
    pub cache: Option<CacheStatus>,
}

/// The time column a [`WhereClause`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeColumn {
    /// `time` of the raw tables.
    Time,
    /// `bucket` of the rollups.
    Bucket,
}

/// An endpoint's own parameters, by name, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraParameters {
    values: std::collections::BTreeMap<&'static str, Option<String>>,
}

impl ExtraParameters {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).and_then(|value| value.as_deref())
    }

    /// A bounded integer parameter, `default` when absent.
    pub fn integer(
        &self,
        name: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ApiError> {
        let Some(text) = self.get(name) else { return Ok(default) };
        match text.parse::<u64>() {
            Ok(value) if range.contains(&value) => Ok(value),
            _ => Err(ApiError::invalid(
                name,
                format!("{text:?} is not an integer from {} to {}", range.start(), range.end()),
            )),
        }
    }

    /// One of `choices` (by its name), `default` when absent.
    pub fn choice<T: Copy>(&self, name: &'static str, default: T, choices: &[(&str, T)]) -> Result<T, ApiError> {
        let Some(text) = self.get(name) else { return Ok(default) };
        choices.iter().find(|(choice, _)| *choice == text).map(|(_, value)| *value).ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(choice, _)| *choice).collect();
            ApiError::invalid(name, format!("{text:?} is not valid for {name}: use {}", names.join(", ")))
        })
    }
}

/// A value bound to a `?` placeholder, in placeholder order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlValue {
    Int(i64),
    UInt(u16),
    UInt64(u64),
    Text(String),
}

/// SQL text made only of constant fragments, plus the values for its placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhereClause {
    pub sql: String,
    pub values: Vec<SqlValue>,
}

impl WhereClause {
    /// Binds every value to `query`, in order.
    pub fn bind_to(&self, query: clickhouse::query::Query) -> clickhouse::query::Query {
        self.values.iter().fold(query, |query, value| match value {
            SqlValue::Int(number) => query.bind(number),
            SqlValue::UInt(number) => query.bind(number),
            SqlValue::UInt64(number) => query.bind(number),
            SqlValue::Text(text) => query.bind(text.as_str()),
        })
    }

    /// Appends `AND sql` with its values.
    pub fn condition(&mut self, sql: &str, values: impl IntoIterator<Item = SqlValue>) {
        if !self.sql.is_empty() {
            self.sql.push_str(" AND ");
        }
        self.sql.push_str(sql);
        self.values.extend(values);
    }
}

impl AnalyticsFilter {
    /// Parses raw query pairs. Unknown and repeated parameters are errors: a typo such as `rout=`
    /// must not silently widen the result to every route.
    pub fn from_pairs(pairs: &[(String, String)], now: OffsetDateTime) -> Result<Self, ApiError> {
        Self::from_pairs_with(pairs, now, &[]).map(|(filter, _)| filter)
    }

    /// As [`Self::from_pairs`], also accepting the endpoint's own parameters `extra` (each at
    /// most once), which are returned by name.
    pub fn from_pairs_with(
        pairs: &[(String, String)],
        now: OffsetDateTime,
        extra: &[&'static str],
    ) -> Result<(Self, ExtraParameters), ApiError> {
        let mut query = AnalyticsQuery::default();
        let mut extras = ExtraParameters::default();
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "from" => &mut query.from,
                "to" => &mut query.to,
                "route" => &mut query.route,
                "upstream" => &mut query.upstream,
                "consumer" => &mut query.consumer,
                "status" => &mut query.status,
                "cache" => &mut query.cache,
                other => match extra.iter().find(|known| **known == other) {
                    Some(known) => extras.values.entry(known).or_default(),
                    None => {
                        let mut expected = vec!["from", "to", "route", "upstream", "consumer", "status", "cache"];
                        expected.extend_from_slice(extra);
                        return Err(ApiError::invalid(
                            other,
                            format!("unknown parameter {other:?}; expected one of {}", expected.join(", ")),
                        ));
                    }
                },
            };
            if slot.replace(value.clone()).is_some() {
                return Err(ApiError::invalid(name.as_str(), format!("parameter {name:?} is given more than once")));
            }
        }
        Ok((Self::from_query(query, now)?, extras))
    }

    pub fn from_query(query: AnalyticsQuery, now: OffsetDateTime) -> Result<Self, ApiError> {
        Ok(Self {
            range: TimeRange::parse(query.from.as_deref(), query.to.as_deref(), now)?,
            route: query.route.map(|value| name("route", value)).transpose()?,
            upstream: query.upstream.map(|value| name("upstream", value)).transpose()?,
            consumer: query.consumer.map(|value| name("consumer", value)).transpose()?,
            status: query.status.as_deref().map(StatusFilter::parse).transpose()?,
            cache: query.cache.as_deref().map(cache_status).transpose()?,
        })
    }

    /// The conditions on the `requests` table. The time bounds come first: `time` is in the
    /// sorting key and the partition key, so ClickHouse prunes parts with them.
    pub fn where_clause(&self) -> WhereClause {
        self.where_clause_on(TimeColumn::Time)
    }

    /// The conditions on a table whose time column is `time_column` (the rollups have `bucket`,
    /// the start of each bucket; callers only use them for ranges aligned to buckets).
    pub fn where_clause_on(&self, time_column: TimeColumn) -> WhereClause {
        let mut clause = WhereClause { sql: String::new(), values: Vec::new() };
        clause.condition(
            match time_column {
                TimeColumn::Time => {
                    "time >= fromUnixTimestamp64Micro(toInt64(?), 'UTC') AND time < fromUnixTimestamp64Micro(toInt64(?), 'UTC')"
                }
                TimeColumn::Bucket => {
                    "bucket >= fromUnixTimestamp64Micro(toInt64(?), 'UTC') AND bucket < fromUnixTimestamp64Micro(toInt64(?), 'UTC')"
                }
            },
            [SqlValue::Int(self.range.from_unix_micros()), SqlValue::Int(self.range.to_unix_micros())],
        );
        for (column_condition, value) in
            [("route = ?", &self.route), ("upstream = ?", &self.upstream), ("consumer = ?", &self.consumer)]
        {
            if let Some(value) = value {
                clause.condition(column_condition, [SqlValue::Text(value.clone())]);
            }
        }
        match self.status {
            Some(StatusFilter::Exact(code)) => clause.condition("status = ?", [SqlValue::UInt(code)]),
            Some(StatusFilter::Class { first, last }) => {
                clause.condition("status >= ? AND status <= ?", [SqlValue::UInt(first), SqlValue::UInt(last)]);
            }
            None => {}
        }
        if let Some(cache) = self.cache {
            clause.condition("cache = ?", [SqlValue::Text(cache.as_str().to_owned())]);
        }
        clause
    }
}

fn name(field: &'static str, value: String) -> Result<String, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not be empty; leave the parameter out to match any"),
        ));
    }
    if value.len() > MAX_NAME_LENGTH || value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be at most {MAX_NAME_LENGTH} bytes without control characters"),
        ));
    }
    Ok(value)
}

fn cache_status(value: &str) -> Result<CacheStatus, ApiError> {
    // Deserialising through the contract's own enum keeps this list in step with the events.
    CacheStatus::deserialize(IntoDeserializer::<serde::de::value::Error>::into_deserializer(value)).map_err(|_| {
        ApiError::invalid(
            "cache",
            format!("{value:?} is not a cache status: use hit, miss, stale, revalidated, bypass or none"),
        )
    })
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;
    use utoipa::openapi::path::ParameterIn;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2025-06-15 12:00:00 UTC);

    fn parse(query: &[(&str, &str)]) -> Result<AnalyticsFilter, ApiError> {
        let pairs: Vec<(String, String)> =
            query.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect();
        AnalyticsFilter::from_pairs(&pairs, NOW)
    }

    /// The field an invalid query is blamed on, or a description of what happened instead.
    fn failing_field(query: &[(&str, &str)]) -> Option<String> {
        match parse(query) {
            Err(ApiError::InvalidParameter { field, .. }) => field,
            other => Some(format!("not an invalid parameter: {other:?}")),
        }
    }

    #[test]
    fn statuses_are_codes_or_classes() -> Result<(), ApiError> {
        assert_eq!(StatusFilter::parse("503")?, StatusFilter::Exact(503));
        assert_eq!(StatusFilter::parse("5xx")?, StatusFilter::Class { first: 500, last: 599 });
        assert_eq!(StatusFilter::parse("2xx")?, StatusFilter::Class { first: 200, last: 299 });
        for bad in ["", "6xx", "0xx", "xx", "5XX", "50x", "99", "600", "0503", "+503", "5xxx", "abc"] {
            assert!(StatusFilter::parse(bad).is_err(), "{bad:?}");
        }
        Ok(())
    }

    #[test]
    fn every_filter_parses() -> Result<(), ApiError> {
        let filter = parse(&[
            ("from", "-2h"),
            ("to", "-1h"),
            ("route", "users"),
            ("upstream", "users-svc"),
            ("consumer", "acme"),
            ("status", "4xx"),
            ("cache", "hit"),
        ])?;
        assert_eq!(filter.range.from(), datetime!(2025-06-15 10:00:00 UTC));
        assert_eq!(filter.range.to(), datetime!(2025-06-15 11:00:00 UTC));
        assert_eq!(filter.route.as_deref(), Some("users"));
        assert_eq!(filter.upstream.as_deref(), Some("users-svc"));
        assert_eq!(filter.consumer.as_deref(), Some("acme"));
        assert_eq!(filter.status, Some(StatusFilter::Class { first: 400, last: 499 }));
        assert_eq!(filter.cache, Some(CacheStatus::Hit));
        Ok(())
    }

    #[test]
    fn invalid_parameters_name_the_field() {
        assert_eq!(failing_field(&[("rout", "users")]).as_deref(), Some("rout"));
        assert_eq!(failing_field(&[("route", "a"), ("route", "b")]).as_deref(), Some("route"));
        assert_eq!(failing_field(&[("route", "")]).as_deref(), Some("route"));
        assert_eq!(failing_field(&[("upstream", &"x".repeat(300))]).as_deref(), Some("upstream"));
        assert_eq!(failing_field(&[("consumer", "a\nb")]).as_deref(), Some("consumer"));
        assert_eq!(failing_field(&[("status", "5xxx")]).as_deref(), Some("status"));
        assert_eq!(failing_field(&[("cache", "warm")]).as_deref(), Some("cache"));
        assert_eq!(failing_field(&[("cache", "Hit")]).as_deref(), Some("cache"));
        assert_eq!(failing_field(&[("from", "yesterday")]).as_deref(), Some("from"));
        assert_eq!(failing_field(&[("to", "-2h")]).as_deref(), Some("from"));
        assert_eq!(failing_field(&[("from", "-500d")]).as_deref(), Some("from"));
    }

    #[test]
    fn values_are_bound_never_spliced() -> Result<(), ApiError> {
        let hostile = "x' OR 1=1 --";
        let filter = parse(&[("route", hostile), ("consumer", "?"), ("status", "503"), ("cache", "miss")])?;
        let clause = filter.where_clause();
        assert!(!clause.sql.contains(hostile));
        assert!(!clause.sql.replace("'UTC'", "").contains('\''), "only constant literals in {}", clause.sql);
        assert_eq!(clause.sql.matches('?').count(), clause.values.len());
        assert_eq!(
            clause.values[2..],
            [
                SqlValue::Text(hostile.to_owned()),
                SqlValue::Text("?".to_owned()),
                SqlValue::UInt(503),
                SqlValue::Text("miss".to_owned())
            ]
        );
        Ok(())
    }

    #[test]
    fn the_time_bounds_are_always_there_and_first() -> Result<(), ApiError> {
        let clause = parse(&[])?.where_clause();
        assert!(clause.sql.starts_with("time >= "));
        assert_eq!(
            clause.values,
            [SqlValue::Int(1_749_985_200_000_000), SqlValue::Int(1_749_988_800_000_000)],
            "-1h to now, in microseconds"
        );
        Ok(())
    }

    #[test]
    fn the_documented_parameters_are_exactly_the_accepted_ones() {
        let documented = AnalyticsQuery::into_params(|| Some(ParameterIn::Query));
        assert_eq!(documented.len(), 7);
        for parameter in documented {
            let value = match parameter.name.as_str() {
                "from" => "-2h",
                "to" => "now",
                "status" => "200",
                "cache" => "hit",
                _ => "name",
            };
            assert!(parse(&[(&parameter.name, value)]).is_ok(), "documented {} is refused", parameter.name);
        }
    }
}
