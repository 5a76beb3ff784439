//! The Postgres projection against the fold of the CONFIG stream, through the real API:
//! random command sequences (with projector crashes and restarts in between) give a projection
//! equal to `ConfigState`'s fold, and a projection rebuilt from the stream equals the live one.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod config_support;

use config_support::{ConfigApp, TestResult};
use hyper::Method;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use sqlx::PgPool;

#[derive(Debug, Clone)]
enum Command {
    PutUpstream { upstream: u8, port: u8 },
    DeleteUpstream { upstream: u8 },
    PutRoute { route: u8, path: u8, upstream: u8 },
    PatchRoute { route: u8, path: u8 },
    DeleteRoute { route: u8 },
    PutConsumer { consumer: u8 },
    CreateKey { consumer: u8 },
    DeleteConsumer { consumer: u8 },
    Apply { upstreams: u8, routes: u8, prune: bool },
    RevertBack { events: u8 },
    RestartProjector,
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (0..3u8, 0..3u8).prop_map(|(upstream, port)| Command::PutUpstream { upstream, port }),
        1 => (0..3u8).prop_map(|upstream| Command::DeleteUpstream { upstream }),
        3 => (0..3u8, 0..4u8, 0..3u8).prop_map(|(route, path, upstream)| Command::PutRoute { route, path, upstream }),
        1 => (0..3u8, 0..4u8).prop_map(|(route, path)| Command::PatchRoute { route, path }),
        1 => (0..3u8).prop_map(|route| Command::DeleteRoute { route }),
        1 => (0..2u8).prop_map(|consumer| Command::PutConsumer { consumer }),
        1 => (0..2u8).prop_map(|consumer| Command::CreateKey { consumer }),
        1 => (0..2u8).prop_map(|consumer| Command::DeleteConsumer { consumer }),
        2 => (0..8u8, 0..8u8, any::<bool>()).prop_map(|(upstreams, routes, prune)| Command::Apply { upstreams, routes, prune }),
        1 => (1..6u8).prop_map(|events| Command::RevertBack { events }),
        1 => Just(Command::RestartProjector),
    ]
}

fn upstream_body(upstream: u8, port: u8) -> Value {
    json!({"name": format!("u{upstream}"), "targets": [{"url": format!("http://10.0.0.{upstream}:{}", 8000 + u16::from(port))}]})
}

fn path(index: u8) -> &'static str {
    ["/a", "/b/{id}", "/c/*", "/a"][usize::from(index % 4)]
}

fn route_body(route: u8, path_index: u8, upstream: u8) -> Value {
    json!({"name": format!("r{route}"), "paths": [path(path_index)], "upstream": format!("u{upstream}")})
}

/// Runs one command; refusals (validation, conflicts, missing entities) are part of the game.
async fn run(app: &mut ConfigApp, command: &Command) -> TestResult {
    match command {
        Command::PutUpstream { upstream, port } => {
            app.admin(Method::PUT, &format!("/v1/config/upstreams/u{upstream}"), Some(upstream_body(*upstream, *port)))
                .await?;
        }
        Command::DeleteUpstream { upstream } => {
            app.admin(Method::DELETE, &format!("/v1/config/upstreams/u{upstream}"), None).await?;
        }
        Command::PutRoute { route, path, upstream } => {
            app.admin(Method::PUT, &format!("/v1/config/routes/r{route}"), Some(route_body(*route, *path, *upstream)))
                .await?;
        }
        Command::PatchRoute { route, path: path_index } => {
            let patch = json!({"paths": [path(*path_index)], "methods": ["GET"]});
            app.admin(Method::PATCH, &format!("/v1/config/routes/r{route}"), Some(patch)).await?;
        }
        Command::DeleteRoute { route } => {
            app.admin(Method::DELETE, &format!("/v1/config/routes/r{route}"), None).await?;
        }
        Command::PutConsumer { consumer } => {
            app.admin(Method::PUT, &format!("/v1/config/consumers/k{consumer}"), Some(json!({"metadata": {"n": "1"}})))
                .await?;
        }
        Command::CreateKey { consumer } => {
            app.admin(Method::POST, &format!("/v1/config/consumers/k{consumer}/keys"), None).await?;
        }
        Command::DeleteConsumer { consumer } => {
            app.admin(Method::DELETE, &format!("/v1/config/consumers/k{consumer}"), None).await?;
        }
        Command::Apply { upstreams, routes, prune } => {
            let upstream_list: Vec<Value> =
                (0..3u8).filter(|index| upstreams & (1 << index) != 0).map(|index| upstream_body(index, 1)).collect();
            let route_list: Vec<Value> = (0..3u8)
                .filter(|index| routes & (1 << index) != 0)
                .map(|index| route_body(index, index, index))
                .collect();
            let document = json!({"upstreams": upstream_list, "routes": route_list});
            app.admin(Method::POST, "/v1/config/apply", Some(json!({"document": document, "prune": prune}))).await?;
        }
        Command::RevertBack { events } => {
            let target = app.last_seq().await?.saturating_sub(u64::from(*events));
            app.admin(Method::POST, "/v1/config/revert", Some(json!({"to_seq": target}))).await?;
        }
        Command::RestartProjector => app.restart_projector().await?,
    }
    Ok(())
}

/// The projection in `pool` equals the fold of the stream.
async fn assert_projection_is_the_fold(app: &ConfigApp, pool: &PgPool) -> TestResult {
    let last = app.last_seq().await?;
    app.wait_projected(pool, last).await?;
    let folded = stone_config_projector::folded_entities(&app.fold().await?)?;
    let projected = stone_config_projector::projected_entities(pool).await?;
    assert_eq!(projected, folded);
    Ok(())
}

#[test]
fn random_command_sequences_give_a_projection_equal_to_the_fold_of_the_stream() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut runner = TestRunner::new(ProptestConfig { cases: 6, max_shrink_iters: 16, ..ProptestConfig::default() });
    let outcome = runner.run(&proptest::collection::vec(command(), 5..25), |commands| {
        runtime.block_on(async {
            let mut app = ConfigApp::spawn().await.map_err(|error| TestCaseError::fail(error.to_string()))?;
            let mut result = Ok(());
            for command in &commands {
                if let Err(error) = run(&mut app, command).await {
                    result = Err(TestCaseError::fail(format!("{command:?}: {error}")));
                    break;
                }
            }
            if result.is_ok() {
                let compared = assert_projection_is_the_fold(&app, &app.pool);
                result = match tokio::time::timeout(std::time::Duration::from_secs(30), compared).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(TestCaseError::fail(error.to_string())),
                    Err(_) => Err(TestCaseError::fail("timed out comparing")),
                };
            }
            app.finish().await;
            result
        })
    });
    if let Err(error) = outcome {
        panic!("{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_rebuilt_from_the_stream_equals_the_live_one() -> TestResult {
    let mut app = ConfigApp::spawn().await?;
    for command in [
        Command::PutUpstream { upstream: 0, port: 0 },
        Command::PutRoute { route: 0, path: 0, upstream: 0 },
        Command::Apply { upstreams: 0b111, routes: 0b110, prune: false },
        Command::RestartProjector,
        Command::PatchRoute { route: 1, path: 3 },
        Command::PutConsumer { consumer: 0 },
        Command::CreateKey { consumer: 0 },
        Command::DeleteRoute { route: 2 },
        Command::RevertBack { events: 2 },
    ] {
        run(&mut app, &command).await?;
    }
    assert_projection_is_the_fold(&app, &app.pool).await?;

    // A second projector on an empty database, from the same stream.
    let rebuilt_config = stone_kit::testing::isolated("cfgrb");
    stone_kit::testing::create_database(&rebuilt_config).await?;
    // Its own database, the live stream.
    let projector_config = stone_kit::StoneConfig { namespace: app.config.namespace.clone(), ..rebuilt_config.clone() };
    let rebuilt_shutdown = stone_kit::Shutdown::new();
    // `ConfigApp`'s drop removes only the app's own streams and database, not this one: caught,
    // so that a failed assertion below still stops this projector and drops its database.
    let outcome: std::thread::Result<TestResult> = stone_kit::testing::caught(async {
        stone_config_projector::build(&projector_config, &rebuilt_shutdown).await?;
        let rebuilt = PgPool::connect(&rebuilt_config.database_url).await?;
        app.wait_projected(&rebuilt, app.last_seq().await?).await?;
        assert_eq!(
            stone_config_projector::projected_entities(&rebuilt).await?,
            stone_config_projector::projected_entities(&app.pool).await?
        );
        let history = "SELECT to_jsonb(h) FROM config_history h ORDER BY stream_seq";
        let live_history: Vec<Value> = sqlx::query_scalar(history).fetch_all(&app.pool).await?;
        let rebuilt_history: Vec<Value> = sqlx::query_scalar(history).fetch_all(&rebuilt).await?;
        assert!(!live_history.is_empty());
        assert_eq!(rebuilt_history, live_history, "history, with who and when, is rebuilt exactly");

        // Resetting the live projection and restarting rebuilds it in place, to the same rows.
        let before_reset = stone_config_projector::projected_entities(&app.pool).await?;
        let _ = app.projector.drain(std::time::Duration::from_secs(5)).await;
        stone_config_projector::reset(&app.pool).await?;
        assert_eq!(stone_config_projector::checkpoint(&app.pool).await?, 0);
        app.restart_projector().await?;
        app.wait_projected(&app.pool, app.last_seq().await?).await?;
        assert_eq!(stone_config_projector::projected_entities(&app.pool).await?, before_reset);
        rebuilt.close().await;
        Ok(())
    })
    .await;
    let _ = rebuilt_shutdown.drain(std::time::Duration::from_secs(5)).await;
    // Its namespace has no streams: this drops only the rebuilt database.
    stone_kit::testing::cleanup(&rebuilt_config).await;
    app.finish().await;
    stone_kit::testing::rethrow(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_config_event_is_dead_lettered_and_blocks_nobody() -> TestResult {
    let app = ConfigApp::spawn().await?;
    let junk_subject = app.config.namespace().config_subject("route", "junk");
    app.js.publish(junk_subject.clone(), "not an event".into()).await?.await?;
    let future = json!({"id": uuid::Uuid::now_v7(), "type": "config.route.upserted", "version": 99,
        "time": "2026-11-21T10:00:00.000000Z", "source": "future", "config_seq": 0, "data": {}});
    app.js.publish(junk_subject, serde_json::to_vec(&future)?.into()).await?.await?;

    // The write side and the projection both move past them.
    let created = app.admin(Method::POST, "/v1/config/upstreams", Some(upstream_body(0, 0))).await?;
    assert_eq!(created.status, hyper::StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.seq(), 3);
    let read = app.admin(Method::GET, "/v1/config/upstreams/u0?min_seq=3", None).await?;
    assert_eq!(read.status, hyper::StatusCode::OK, "{}", read.body);

    let dead_letters = app.js.get_stream(app.config.namespace().stream_name("DEADLETTER")).await?;
    let mut reasons = Vec::new();
    for sequence in 1..=2 {
        let message = dead_letters.get_raw_message(sequence).await?;
        let reason =
            message.headers.get(stone_events::streams::headers::DEAD_LETTER_REASON).map(|value| value.to_string());
        reasons.push(reason.unwrap_or_default());
    }
    assert!(reasons[0].contains("malformed"), "{reasons:?}");
    assert!(reasons[1].contains("newer"), "{reasons:?}");
    app.finish().await;
    Ok(())
}
