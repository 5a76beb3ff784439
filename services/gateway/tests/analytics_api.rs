//! The analytics endpoints beyond the summary (timeseries, top, request search, upstream
//! health) against a real ClickHouse (or the embedded chDB endpoint) with the projector's
//! schema: exact numbers from rollups and raw rows alike, stable pagination, 400s naming the field.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::Value;
use stone_analytics::rows::RequestRow;
use stone_gateway::{AppState, router};
use stone_kit::StoneConfig;
use stone_kit::admin::Readiness;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt;
use uuid::Uuid;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

#[derive(Debug, clickhouse::Row, Serialize)]
struct HealthRow {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
    #[serde(with = "clickhouse::serde::time::datetime64::micros")]
    time: OffsetDateTime,
    source: String,
    partition: u16,
    stream_seq: u64,
    event_type: String,
    upstream: String,
    target: String,
    state: String,
    check_kind: String,
    reason: String,
    consecutive: u32,
    worker: String,
    build: String,
    uptime_s: u64,
    in_flight: u64,
    events_pending: u64,
    dropped: u64,
}

fn request(index: u64, time: OffsetDateTime) -> RequestRow {
    let route = ["users", "orders", "search"][(index % 3) as usize];
    let status = if index.is_multiple_of(10) {
        503
    } else if index.is_multiple_of(5) {
        404
    } else {
        200
    };
    RequestRow {
        event_id: Uuid::now_v7(),
        time,
        source: "proxy-test".into(),
        config_seq: 1,
        partition: 0,
        stream_seq: index + 1,
        method: "GET".into(),
        host: "api.example.com".into(),
        route: route.into(),
        path_template: format!("/{route}/{{id}}"),
        path: format!("/{route}/{index}"),
        upstream: format!("{route}-svc"),
        target: "http://10.0.0.5:8000".into(),
        consumer: "acme".into(),
        client_ip: "10.0.0.1".into(),
        protocol: "HTTP/1.1".into(),
        status,
        total_us: 1_000 + index,
        upstream_us: 900,
        ttfb_us: 100,
        bytes_in: 10,
        bytes_out: 100,
        cache: if index.is_multiple_of(2) { "hit".into() } else { "miss".into() },
        error: String::new(),
        rate_limited: 0,
        traceparent: String::new(),
    }
}

fn health(time: OffsetDateTime, target: &str, state: &str, reason: &str) -> HealthRow {
    HealthRow {
        event_id: Uuid::now_v7(),
        time,
        source: "proxy-a".into(),
        partition: 0,
        stream_seq: 0,
        event_type: format!("health.target_{state}"),
        upstream: "users-svc".into(),
        target: target.into(),
        state: state.into(),
        check_kind: "active".into(),
        reason: reason.into(),
        consecutive: 3,
        worker: String::new(),
        build: String::new(),
        uptime_s: 0,
        in_flight: 0,
        events_pending: 0,
        dropped: 0,
    }
}

struct TestApp {
    config: StoneConfig,
    app: Router,
    /// Start of the hour two hours ago: the rows live in `[hour, hour + 1h)`.
    hour: OffsetDateTime,
}

impl TestApp {
    async fn spawn() -> TestResult<Self> {
        let mut config = StoneConfig::default();
        if let Ok(url) = std::env::var("STONE_CLICKHOUSE_URL") {
            config.clickhouse_url = url;
        }
        config.clickhouse_database = format!("gw_analytics_{}", Uuid::now_v7().simple());
        stone_kit::clickhouse::migrate(&config).await?;
        // What the projector does at start (`stone_analytics::layout`); no projector runs here.
        stone_analytics::layout::ensure_unpaused(&stone_kit::clickhouse::client(&config)).await?;
        let client = stone_kit::clickhouse::client(&config);
        let now = OffsetDateTime::now_utc();
        let hour = (now - time::Duration::hours(2)).replace_minute(0)?.replace_second(0)?.replace_nanosecond(0)?;
        // 300 requests, one every 12 seconds over the hour: 5 per minute.
        let mut insert = client.insert::<RequestRow>("requests").await?;
        for index in 0..300u64 {
            insert.write(&request(index, hour + time::Duration::seconds(12 * index as i64))).await?;
        }
        insert.end().await?;
        let mut insert = client.insert::<HealthRow>("health_events").await?;
        for row in [
            health(hour + time::Duration::minutes(1), "http://a:1", "down", "connect refused"),
            health(hour + time::Duration::minutes(2), "http://a:1", "up", "3 consecutive successes"),
            health(hour + time::Duration::minutes(3), "http://b:1", "down", "status 503"),
        ] {
            insert.write(&row).await?;
        }
        insert.end().await?;
        let app = router(AppState::new(
            stone_gateway::analytics::clickhouse_client(&config),
            Readiness::new(&[stone_gateway::CLICKHOUSE_CONDITION]),
        ));
        Ok(Self { config, app, hour })
    }

    fn range(&self, minutes: i64) -> TestResult<String> {
        let from = self.hour.format(&Rfc3339)?;
        let to = (self.hour + time::Duration::minutes(minutes)).format(&Rfc3339)?;
        Ok(format!("from={from}&to={to}"))
    }

    async fn get(&self, uri: &str) -> TestResult<(StatusCode, Value)> {
        let response = self.app.clone().oneshot(Request::get(uri).body(Body::empty())?).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, serde_json::from_slice(&body)?))
    }

    async fn ok(&self, uri: &str) -> TestResult<Value> {
        let (status, body) = self.get(uri).await?;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        Ok(body)
    }

    async fn finish(self) {
        let server = clickhouse::Client::default().with_url(&self.config.clickhouse_url);
        let _ = server.query(&format!("DROP DATABASE IF EXISTS `{}`", self.config.clickhouse_database)).execute().await;
    }
}

#[tokio::test]
async fn rollups_and_raw_rows_give_the_same_exact_numbers() -> TestResult {
    let app = TestApp::spawn().await?;
    let outcome = stone_kit::testing::caught(async {
        let hour = app.ok(&format!("/v1/analytics/summary?{}", app.range(60)?)).await?;
        assert_eq!(hour["source"], "hour");
        assert_eq!(
            (hour["requests"].as_u64(), hour["errors"].as_u64(), hour["client_errors"].as_u64()),
            (Some(300), Some(30), Some(30))
        );
        let minute = app.ok(&format!("/v1/analytics/summary?{}", app.range(30)?)).await?;
        assert_eq!((minute["source"].as_str(), minute["requests"].as_u64()), (Some("minute"), Some(150)));
        let from = (app.hour + time::Duration::seconds(1)).format(&Rfc3339)?;
        let to = (app.hour + time::Duration::minutes(60)).format(&Rfc3339)?;
        // An unaligned hour: whole minutes from the minute rollup, the partial first minute from
        // raw rows, merged — the same exact numbers as raw rows alone. (Longer ranges take their
        // whole hours from the hourly rollup as well; see the unit test in source.rs.)
        let mixed = app.ok(&format!("/v1/analytics/summary?from={from}&to={to}")).await?;
        assert_eq!((mixed["source"].as_str(), mixed["requests"].as_u64()), (Some("mixed"), Some(299)));
        assert_eq!(mixed["cache_hits"].as_u64(), Some(149));
        assert!(mixed["latency_us"]["p99"].as_f64().is_some(), "{mixed}");
        // Both ends unaligned: the two partial minutes are read in one scan of raw rows (their
        // ranges OR-ed), the minutes between in one scan of the minute rollup. Requests at 36 s,
        // 48 s, ... 3504 s of the hour: 290.
        let inner_from = (app.hour + time::Duration::seconds(30)).format(&Rfc3339)?;
        let inner_to = (app.hour + time::Duration::seconds(3_510)).format(&Rfc3339)?;
        let both = app.ok(&format!("/v1/analytics/summary?from={inner_from}&to={inner_to}")).await?;
        assert_eq!((both["source"].as_str(), both["requests"].as_u64()), (Some("mixed"), Some(290)), "{both}");
        // A short unaligned range is raw rows alone; with the aligned rest it adds up again.
        let five = (app.hour + time::Duration::minutes(5)).format(&Rfc3339)?;
        let raw = app.ok(&format!("/v1/analytics/summary?from={from}&to={five}")).await?;
        assert_eq!(raw["source"], "raw");
        let rest = app.ok(&format!("/v1/analytics/summary?from={five}&to={to}")).await?;
        assert_eq!(rest["source"], "minute");
        assert_eq!(raw["requests"].as_u64().unwrap() + rest["requests"].as_u64().unwrap(), 299);
        let top = app.ok(&format!("/v1/analytics/top?from={from}&to={to}&by=status_class")).await?;
        assert_eq!(top["source"], "mixed");
        let top_total: u64 =
            top["entries"].as_array().unwrap().iter().map(|entry| entry["requests"].as_u64().unwrap()).sum();
        assert_eq!(top_total, 299, "{top}");

        // Timeseries: 12 five-minute buckets of 25, split by status class.
        let series =
            app.ok(&format!("/v1/analytics/timeseries?{}&interval=5m&group_by=status_class", app.range(60)?)).await?;
        let points = series["points"].as_array().unwrap();
        let total: u64 = points.iter().map(|point| point["requests"].as_u64().unwrap()).sum();
        assert_eq!(total, 300, "{series}");
        let buckets: std::collections::BTreeSet<&str> =
            points.iter().map(|point| point["time"].as_str().unwrap()).collect();
        assert_eq!(buckets.len(), 12);
        let five_xx: u64 = points
            .iter()
            .filter(|point| point["group"] == "5xx")
            .map(|point| point["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(five_xx, 30);
        let hourly = app.ok(&format!("/v1/analytics/timeseries?{}&interval=1h", app.range(60)?)).await?;
        assert_eq!((hourly["source"].as_str(), hourly["points"][0]["requests"].as_u64()), (Some("hour"), Some(300)));

        // Top: from the rollup and from raw rows, the same ranking.
        let top = app.ok(&format!("/v1/analytics/top?{}&by=route&order=errors&limit=2", app.range(60)?)).await?;
        assert_eq!(top["source"], "hour");
        let entries = top["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        // Index multiples of 10 are 503s: 0, 10, 20 ... → routes users (i%3==0), orders, search in turn.
        assert_eq!(entries.iter().map(|entry| entry["errors"].as_u64().unwrap()).sum::<u64>(), 20);
        let raw_top = app.ok(&format!("/v1/analytics/top?from={from}&to={to}&by=path_template&order=requests")).await?;
        assert_eq!(raw_top["source"], "mixed");
        assert_eq!(raw_top["entries"].as_array().unwrap().len(), 3);
        let p99 = app.ok(&format!("/v1/analytics/top?{}&by=status&order=p99", app.range(60)?)).await?;
        assert!(p99["entries"][0]["p99_us"].as_f64().is_some(), "{p99}");
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    app.finish().await;
    stone_kit::testing::rethrow(outcome)
}

#[tokio::test]
async fn request_search_in_time_slices_returns_what_one_query_over_the_range_does() -> TestResult {
    let app = TestApp::spawn().await?;
    let outcome = stone_kit::testing::caught(async {
        // Every 5xx of the hour across routes, newest first, as one query over the whole range.
        let client = stone_kit::clickhouse::client(&app.config);
        let expected: Vec<String> = client
            .query(
                "SELECT toString(event_id) FROM requests WHERE status >= 500 AND status <= 599 \
                 ORDER BY time DESC, event_id DESC",
            )
            .fetch_all()
            .await?;
        assert_eq!(expected.len(), 30, "the fixture: one 503 every two minutes");
        // Pages of 4 read the last minute, then 15 minutes, then the rest: the first page is
        // filled from three slices, later pages start inside a slice from their cursor.
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut uri = format!("/v1/analytics/requests?{}&status=5xx&limit=4", app.range(60)?);
            if let Some(cursor) = &cursor {
                uri.push_str(&format!("&cursor={cursor}"));
            }
            let page = app.ok(&uri).await?;
            let rows = page["requests"].as_array().unwrap();
            assert!(rows.len() <= 4, "{page}");
            seen.extend(rows.iter().map(|row| row["event_id"].as_str().unwrap().to_owned()));
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, expected);
        // A cursor older than every row: an empty last page.
        let oldest = app.hour - time::Duration::minutes(1);
        let cursor = format!("{}_{}", oldest.unix_timestamp() * 1_000_000, Uuid::nil().simple());
        let page = app.ok(&format!("/v1/analytics/requests?{}&cursor={cursor}", app.range(60)?)).await?;
        assert_eq!((page["requests"].as_array().map(Vec::len), &page["next_cursor"]), (Some(0), &Value::Null));
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    app.finish().await;
    stone_kit::testing::rethrow(outcome)
}

#[tokio::test]
async fn request_search_pages_newest_first_without_gaps_or_repeats() -> TestResult {
    let app = TestApp::spawn().await?;
    let outcome = stone_kit::testing::caught(async {
        let mut seen = std::collections::BTreeSet::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        let mut previous_time = String::from("9999");
        loop {
            let mut uri = format!("/v1/analytics/requests?{}&route=users&status=2xx&limit=30", app.range(60)?);
            if let Some(cursor) = &cursor {
                uri.push_str(&format!("&cursor={cursor}"));
            }
            let page = app.ok(&uri).await?;
            pages += 1;
            for request in page["requests"].as_array().unwrap() {
                assert_eq!(request["route"], "users");
                let time = request["time"].as_str().unwrap().to_owned();
                assert!(time <= previous_time, "newest first");
                previous_time = time;
                assert!(seen.insert(request["event_id"].as_str().unwrap().to_owned()), "no repeats");
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        // users: index % 3 == 0 → 100 rows, of which 2xx: not a multiple of 5 → 80.
        assert_eq!(seen.len(), 80);
        assert_eq!(pages, 3);
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    app.finish().await;
    stone_kit::testing::rethrow(outcome)
}

#[tokio::test]
async fn upstream_health_now_and_over_time() -> TestResult {
    let app = TestApp::spawn().await?;
    let outcome = stone_kit::testing::caught(async {
        let now = app.ok("/v1/health/upstreams?upstream=users-svc").await?;
        let targets = now["targets"].as_array().unwrap();
        assert_eq!(targets.len(), 2, "{now}");
        assert_eq!((targets[0]["target"].as_str(), targets[0]["state"].as_str()), (Some("http://a:1"), Some("up")));
        assert_eq!((targets[1]["state"].as_str(), targets[1]["reason"].as_str()), (Some("down"), Some("status 503")));
        let timeline = app.ok(&format!("/v1/health/timeline?{}&target=http://a:1", app.range(60)?)).await?;
        let states: Vec<&str> =
            timeline["transitions"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap()).collect();
        assert_eq!(states, ["down", "up"]);
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    app.finish().await;
    stone_kit::testing::rethrow(outcome)
}

#[tokio::test]
async fn bad_parameters_are_400_naming_the_field() -> TestResult {
    let app = TestApp::spawn().await?;
    let outcome = stone_kit::testing::caught(async {
        for (uri, field) in [
            ("/v1/analytics/timeseries?interval=2m", "interval"),
            ("/v1/analytics/timeseries?group_by=path", "group_by"),
            ("/v1/analytics/timeseries?from=-30d&interval=1m", "interval"),
            ("/v1/analytics/top?by=host", "by"),
            ("/v1/analytics/top?order=p42", "order"),
            ("/v1/analytics/top?limit=0", "limit"),
            ("/v1/analytics/top?limit=101", "limit"),
            ("/v1/analytics/top?rout=users", "rout"),
            ("/v1/analytics/requests?limit=1001", "limit"),
            ("/v1/analytics/requests?cursor=garbage", "cursor"),
            ("/v1/analytics/requests?status=7xx", "status"),
            ("/v1/health/timeline?limit=0", "limit"),
            ("/v1/health/timeline?from=soon", "from"),
            ("/v1/health/upstreams?route=x", "route"),
        ] {
            let (status, body) = app.get(uri).await?;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
            assert_eq!(body["error"]["field"], field, "{uri}: {body}");
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await;
    app.finish().await;
    stone_kit::testing::rethrow(outcome)
}
