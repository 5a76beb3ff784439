//! Rebuilding the config projection through `POST /v1/projections/config/rebuild` while the live
//! projector runs and changes keep coming: the rebuilt tables equal the fold of the stream (a
//! corruption of the live tables is repaired), history is complete, and the rebuild's record
//! shows progress and the outcome. Also: scopes, 409 while a rebuild runs, 400 for options the
//! config projection cannot honour.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod config_support;

use std::time::Duration;

use config_support::{ConfigApp, TestResult};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use stone_gateway::auth::Scope;

fn upstream(name: &str, port: u16) -> Value {
    json!({"name": name, "targets": [{"url": format!("http://127.0.0.1:{port}"), "weight": 1}]})
}

async fn history_rows(app: &ConfigApp) -> TestResult<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM config_history").fetch_one(&app.pool).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_repairs_the_projection_while_changes_keep_coming() -> TestResult {
    let app = ConfigApp::spawn().await?;
    for index in 0..40u16 {
        let created = app
            .admin(Method::POST, "/v1/config/upstreams", Some(upstream(&format!("pool{index}"), 8000 + index)))
            .await?;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    }
    for index in 0..10u16 {
        let updated = app
            .admin(
                Method::PUT,
                &format!("/v1/config/upstreams/pool{index}"),
                Some(upstream(&format!("pool{index}"), 9000 + index)),
            )
            .await?;
        assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    }
    let deleted = app.admin(Method::DELETE, "/v1/config/upstreams/pool39", None).await?;
    assert!(deleted.status.is_success(), "{}", deleted.body);
    app.wait_projected(&app.pool, app.last_seq().await?).await?;
    let history_before = history_rows(&app).await?;
    assert_eq!(history_before, 51);

    // Damage the live projection the way a bug or a bad manual edit would.
    sqlx::query("DELETE FROM config_entities WHERE name LIKE 'pool1%'").execute(&app.pool).await?;
    sqlx::query("UPDATE config_entities SET spec = '{}'::jsonb WHERE name = 'pool2'").execute(&app.pool).await?;
    sqlx::query("DELETE FROM config_history WHERE stream_seq % 7 = 0").execute(&app.pool).await?;

    // Scopes: admin only.
    let reader = app.token("reader", Scope::Read).await?;
    let forbidden = app.call(Method::POST, "/v1/projections/config/rebuild", Some(&reader), None, &[]).await?;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN, "{}", forbidden.body);
    let anonymous = app.call(Method::POST, "/v1/projections/config/rebuild", None, None, &[]).await?;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let bad = app.admin(Method::POST, "/v1/projections/config/rebuild", Some(json!({"from_seq": 5}))).await?;
    assert_eq!((bad.status, bad.body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("from_seq")));
    let unread = app.call(Method::GET, "/v1/projections/config/rebuild", None, None, &[]).await?;
    assert_eq!(unread.status, StatusCode::UNAUTHORIZED, "the record needs a read token");
    let unknown = app.admin(Method::POST, "/v1/projections/nope/rebuild", None).await?;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let started = app.admin(Method::POST, "/v1/projections/config/rebuild", None).await?;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.body);
    let id = started.body["id"].as_str().unwrap().to_owned();
    // The live projection keeps taking changes meanwhile.
    for index in 40..50u16 {
        let created = app
            .admin(Method::POST, "/v1/config/upstreams", Some(upstream(&format!("pool{index}"), 8000 + index)))
            .await?;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let record = loop {
        let status = app.admin(Method::GET, "/v1/projections/config/rebuild", None).await?;
        assert_eq!(status.status, StatusCode::OK, "{}", status.body);
        if status.body["id"] == id.as_str()
            && !["building", "pausing", "swapping"].contains(&status.body["phase"].as_str().unwrap())
        {
            break status.body;
        }
        assert!(tokio::time::Instant::now() < deadline, "rebuild did not finish: {}", status.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record["phase"], "done", "{record}");
    assert_eq!(record["actor"], "admin");
    assert!(record["done"].as_u64().unwrap() >= 51, "{record}");
    assert_eq!(record["done"], record["total"]);

    let last = app.last_seq().await?;
    app.wait_projected(&app.pool, last).await?;
    let projected = stone_config_projector::projected_entities(&app.pool).await?;
    let folded = stone_config_projector::folded_entities(&app.fold().await?)?;
    assert_eq!(projected, folded, "the rebuilt projection equals the fold of the stream");
    assert_eq!(projected.len(), 49);
    assert_eq!(history_rows(&app).await?, 61, "history is complete again, including changes made during the rebuild");

    // GET /v1/projections shows the config projection caught up and its last rebuild.
    let listed = app.admin(Method::GET, "/v1/projections", None).await?;
    let config = listed.body["projections"].as_array().unwrap().iter().find(|p| p["name"] == "config").unwrap().clone();
    assert_eq!(config["checkpoint"].as_u64(), Some(last), "{config}");
    assert_eq!(config["pending_events"], 0);
    assert_eq!(config["rebuild"]["id"], id.as_str());

    // A second rebuild works too (the shadow tables and their indexes were renamed cleanly).
    let again = app.admin(Method::POST, "/v1/projections/config/rebuild", None).await?;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.body);
    let second = again.body["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = app.admin(Method::GET, "/v1/projections/config/rebuild", None).await?;
        if status.body["id"] == second.as_str() && status.body["phase"] == "done" {
            break;
        }
        assert_ne!(status.body["phase"], "failed", "{}", status.body);
        assert!(tokio::time::Instant::now() < deadline, "second rebuild did not finish: {}", status.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stone_config_projector::projected_entities(&app.pool).await?, folded);
    app.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_rebuild_of_a_projection_runs_at_a_time() -> TestResult {
    let app = ConfigApp::spawn().await?;
    let store = stone_kit::rebuild::open(&app.js, &app.config.namespace(), 1).await?;
    let held = stone_kit::rebuild::Tracker::start(store.clone(), "config", "someone", 1).await?;
    // Writes racing each other (the progress writer and phase changes) never fail each other.
    let writes = (0..20u64).map(|step| {
        let held = held.clone();
        async move {
            held.progress(step, 20, 20, 0);
            held.phase(stone_kit::rebuild::Phase::Building).await
        }
    });
    for written in futures::future::join_all(writes).await {
        written?;
    }
    held.check()?;
    let refused = app.admin(Method::POST, "/v1/projections/config/rebuild", None).await?;
    assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    held.finish(&Ok(())).await?;
    let accepted = app.admin(Method::POST, "/v1/projections/config/rebuild", None).await?;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.body);
    app.finish().await;
    Ok(())
}
