//! Each query runs with exactly its own database and settings, whatever ran before it on the
//! server. Trivially true of a real ClickHouse server; the embedded chDB endpoint
//! (`infra/chdb/server.py`) pools connections and leaves each with the last request's database
//! and settings, changing only what the next request needs, so this is what keeps one client's
//! settings (a projector's deduplication token, the gateway's `max_execution_time`) from leaking
//! into another's query.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, PartialEq, clickhouse::Row, serde::Deserialize)]
struct Seen {
    database: String,
    max_execution_time: String,
    max_threads: String,
}

const QUERY: &str = "SELECT currentDatabase() AS database, \
                     toString(getSetting('max_execution_time')) AS max_execution_time, \
                     toString(getSetting('max_threads')) AS max_threads";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_sees_its_own_database_and_settings_only() -> TestResult {
    let config = stone_kit::testing::isolated("iso");
    let server = clickhouse::Client::default().with_url(&config.clickhouse_url);
    let plain: Seen = server.query(QUERY).fetch_one().await?;
    assert_eq!(plain.database, "default");
    let default_threads = plain.max_threads.clone();

    let mut tasks = Vec::new();
    for task in 0..4u64 {
        let server = server.clone();
        let default_threads = default_threads.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..40u64 {
                let variant = (task * 7 + round * 3) % 6;
                let mut client = server.clone();
                let database = match variant % 3 {
                    0 => "default",
                    1 => "system",
                    _ => "information_schema",
                };
                if variant != 0 {
                    client = client.with_database(database);
                }
                let timeout = (variant % 2 == 0).then(|| (round % 9 + 1).to_string());
                if let Some(seconds) = &timeout {
                    client = client.with_setting("max_execution_time", seconds.as_str());
                }
                let threads = (variant >= 3).then(|| (task + 1).to_string());
                if let Some(threads) = &threads {
                    client = client.with_setting("max_threads", threads.as_str());
                }
                let seen: Seen = client.query(QUERY).fetch_one().await.expect("query");
                let expected = Seen {
                    database: if variant == 0 { "default".to_owned() } else { database.to_owned() },
                    max_execution_time: timeout.clone().unwrap_or_else(|| "0".to_owned()),
                    max_threads: threads.clone().unwrap_or_else(|| default_threads.clone()),
                };
                assert_eq!(seen, expected, "task {task}, round {round}");
            }
        }));
    }
    for task in tasks {
        task.await?;
    }

    // A query that fails on a setting changes nothing for the next one.
    let refused =
        server.clone().with_setting("max_execution_time", "not a number").query(QUERY).fetch_one::<Seen>().await;
    assert!(refused.is_err(), "{refused:?}");
    let after: Seen = server.query(QUERY).fetch_one().await?;
    assert_eq!(after, plain);
    Ok(())
}
