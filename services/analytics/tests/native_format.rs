//! The projector writes `requests` in Native format with hand-encoded `LowCardinality`
//! dictionaries (`stone_analytics::native`). Against the real ClickHouse (or the embedded chDB
//! endpoint): the same rows inserted through the crate's RowBinary insert and through the
//! projector's sink are stored identically, column for column, including values the encoder
//! treats specially (empty strings, which are the dictionary's key 0; multi-byte text; strings
//! longer than one varint byte; a dictionary too wide for one-byte indexes), and the rollups
//! fed by the Native insert agree with the raw rows.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use stone_analytics::rows::{RequestRow, Rows};
use stone_analytics::sink::Sink;
use stone_analytics::state::PendingBatch;
use time::OffsetDateTime;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test]
async fn native_inserts_store_exactly_what_rowbinary_stores() -> TestResult {
    let config = stone_kit::testing::isolated("native");
    let outcome = async {
        stone_kit::clickhouse::migrate(&config).await?;
        let clickhouse = stone_kit::clickhouse::client(&config);
        clickhouse.query("CREATE TABLE requests_rowbinary AS requests").execute().await?;

        let now = OffsetDateTime::now_utc();
        let mut rows = Rows::default();
        let mut all = Vec::new();
        for index in 0..2_000u64 {
            let mut row = RequestRow::new(stone_analytics::synthetic::request(index, now), 3, index + 1);
            // 700 routes: the dictionary needs two-byte indexes.
            row.route = format!("route-{}", index % 700);
            // Empty strings in dictionary columns, where the synthetic events have none.
            if index % 7 == 0 {
                row.consumer = String::new();
                row.upstream = String::new();
            }
            if index % 11 == 0 {
                row.host = "bücher.example — 例え.jp".to_owned();
                row.path = format!("/{}", "ä".repeat(100 + index as usize % 50));
            }
            row.traceparent = format!("00-{:032x}-{:016x}-01", index * 7919, index);
            rows.push_request(row.clone());
            all.push(row);
        }

        let mut insert = clickhouse.insert::<RequestRow>("requests_rowbinary").await?;
        for row in &all {
            insert.write(row).await?;
        }
        insert.end().await?;
        let sink = Sink { clickhouse: clickhouse.clone(), token_prefix: "native".to_owned(), table_suffix: "" };
        sink.insert(3, PendingBatch { first: 1, last: 2_000 }, &rows).await?;

        for (left, right) in [("requests", "requests_rowbinary"), ("requests_rowbinary", "requests")] {
            let differing: u64 = clickhouse
                .query(&format!("SELECT count() FROM (SELECT * FROM {left} EXCEPT SELECT * FROM {right})"))
                .fetch_one()
                .await?;
            assert_eq!(differing, 0, "rows of {left} missing from {right}");
        }
        let counts: (u64, u64, u64) =
            clickhouse.query("SELECT count(), uniqExact(event_id), uniqExact(route) FROM requests").fetch_one().await?;
        assert_eq!(counts, (2_000, 2_000, 700));
        let empty_consumers: u64 =
            clickhouse.query("SELECT count() FROM requests WHERE consumer = ''").fetch_one().await?;
        assert_eq!(empty_consumers, 2_000u64.div_ceil(7));

        // The views fed by the Native block: every rollup agrees with the raw rows.
        let raw: (u64, u64) = clickhouse
            .query("SELECT count(), sum(bytes_out) FROM requests WHERE route = 'route-5'")
            .fetch_one()
            .await?;
        for rollup in ["requests_1m", "requests_1h"] {
            let rolled: (u64, u64) = clickhouse
                .query(&format!("SELECT sum(requests), sum(bytes_out) FROM {rollup} WHERE route = 'route-5'"))
                .fetch_one()
                .await?;
            assert_eq!(rolled, raw, "{rollup}");
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    stone_kit::testing::cleanup(&config).await;
    outcome
}
