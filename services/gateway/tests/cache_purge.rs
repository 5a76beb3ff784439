//! `POST /v1/cache/purge`: a write token publishes the command every proxy worker listens to,
//! with the caller as actor; bad input is a 400 naming the field, and nothing is published.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod config_support;

use std::time::Duration;

use config_support::{ConfigApp, TestResult};
use futures::StreamExt;
use hyper::{Method, StatusCode};
use serde_json::json;
use stone_events::cache::{PurgeBy, PurgeCommand, purge_subject};
use stone_gateway::auth::Scope;

#[tokio::test]
async fn purge_is_published_to_the_workers_with_the_actor() -> TestResult {
    let app = ConfigApp::spawn().await?;
    let client = async_nats::connect(app.config.nats_url.as_str()).await?;
    let mut commands = client.subscribe(purge_subject(&app.config.namespace())).await?;
    client.flush().await?;
    let writer = app.token("ops-bot", Scope::Write).await?;
    let reader = app.token("dashboards", Scope::Read).await?;

    let body = json!({ "by": "prefix", "value": "api.example.com/users/" });
    let path = "/v1/cache/purge";
    assert_eq!(app.call(Method::POST, path, None, Some(body.clone()), &[]).await?.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.call(Method::POST, path, Some(&reader), Some(body.clone()), &[]).await?.status,
        StatusCode::FORBIDDEN
    );
    let bad_by =
        app.call(Method::POST, path, Some(&writer), Some(json!({ "by": "everything", "value": "x" })), &[]).await?;
    assert_eq!(bad_by.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_by.body["error"]["field"], "by");
    let empty = app.call(Method::POST, path, Some(&writer), Some(json!({ "by": "prefix", "value": " " })), &[]).await?;
    assert_eq!(empty.body["error"]["field"], "value");

    let accepted = app.call(Method::POST, path, Some(&writer), Some(body), &[]).await?;
    assert_eq!(accepted.status, StatusCode::ACCEPTED);
    assert_eq!(accepted.body["actor"], "ops-bot");
    let message = tokio::time::timeout(Duration::from_secs(2), commands.next()).await?.unwrap();
    let command: PurgeCommand = serde_json::from_slice(&message.payload)?;
    assert_eq!(
        command,
        PurgeCommand { by: PurgeBy::Prefix, value: "api.example.com/users/".into(), actor: "ops-bot".into() }
    );
    // The rejected requests published nothing.
    assert!(tokio::time::timeout(Duration::from_millis(200), commands.next()).await.is_err());
    app.finish().await;
    Ok(())
}
