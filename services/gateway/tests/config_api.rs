//! The config API through real sockets, a real CONFIG stream and a real Postgres projection:
//! CRUD with versions and ETags, read-your-writes, optimistic concurrency, validation, tokens and
//! scopes, API keys that never reach the stream, atomic apply, history, snapshots and revert.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod config_support;

use config_support::{ConfigApp, TestResult};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use stone_gateway::auth::Scope;

fn upstream(name: &str, port: u16) -> Value {
    json!({"name": name, "targets": [{"url": format!("http://127.0.0.1:{port}"), "weight": 1}]})
}

fn route(name: &str, path: &str, upstream: &str) -> Value {
    json!({"name": name, "paths": [path], "upstream": upstream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_with_versions_etags_and_read_your_writes() -> TestResult {
    let app = ConfigApp::spawn().await?;
    let created = app.admin(Method::POST, "/v1/config/upstreams", Some(upstream("users", 8000))).await?;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["version"], 1);
    assert_eq!(created.header("etag"), Some("\"1\""));
    let route_created =
        app.admin(Method::POST, "/v1/config/routes", Some(route("users", "/users/{id}", "users"))).await?;
    assert_eq!(route_created.status, StatusCode::CREATED, "{}", route_created.body);

    // Read-your-writes: the read waits for the projection to reach the write's sequence.
    let read =
        app.admin(Method::GET, &format!("/v1/config/routes/users?min_seq={}", route_created.seq()), None).await?;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    assert_eq!(read.body["spec"]["paths"], json!(["/users/{id}"]));
    assert_eq!(read.body["updated_by"], "admin");
    assert_eq!(read.header("etag"), Some("\"1\""));
    let id = read.body["id"].clone();

    let again = app.admin(Method::POST, "/v1/config/routes", Some(route("users", "/other", "users"))).await?;
    assert_eq!((again.status, again.body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("already_exists")));

    let put = app
        .call(
            Method::PUT,
            "/v1/config/routes/users",
            Some(&app.admin),
            Some(route("users", "/people/{id}", "users")),
            &[("if-match", "\"1\"")],
        )
        .await?;
    assert_eq!((put.status, put.body["version"].as_u64()), (StatusCode::OK, Some(2)), "{}", put.body);
    assert_eq!(put.body["id"], id, "the id is stable across versions");
    let stale = app
        .call(
            Method::PUT,
            "/v1/config/routes/users",
            Some(&app.admin),
            Some(route("users", "/stale", "users")),
            &[("if-match", "\"1\"")],
        )
        .await?;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED, "{}", stale.body);

    let patched = app
        .call(
            Method::PATCH,
            "/v1/config/routes/users",
            Some(&app.admin),
            Some(json!({"methods": ["GET"], "strip_prefix": true})),
            &[("if-match", "2")],
        )
        .await?;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(patched.body["version"], 3);
    assert_eq!(patched.body["spec"]["paths"], json!(["/people/{id}"]), "a merge patch keeps other fields");
    assert_eq!(patched.body["spec"]["methods"], json!(["GET"]));

    // A PUT that changes nothing writes nothing.
    let last = app.last_seq().await?;
    let same = app.admin(Method::PUT, "/v1/config/routes/users", Some(patched.body["spec"].clone())).await?;
    assert_eq!((same.status, same.body["version"].as_u64()), (StatusCode::OK, Some(3)), "{}", same.body);
    assert_eq!(app.last_seq().await?, last);

    let in_use = app.admin(Method::DELETE, "/v1/config/upstreams/users", None).await?;
    assert_eq!(
        (in_use.status, in_use.body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("in_use")),
        "{}",
        in_use.body
    );
    let deleted = app.admin(Method::DELETE, "/v1/config/routes/users", None).await?;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.body);
    assert_eq!(deleted.body["version"], 4);
    let gone = app.admin(Method::GET, &format!("/v1/config/routes/users?min_seq={}", deleted.seq()), None).await?;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    // Recreated after a delete, the version keeps counting so an old ETag cannot match.
    let recreated = app.admin(Method::POST, "/v1/config/routes", Some(route("users", "/users/{id}", "users"))).await?;
    assert_eq!(recreated.body["version"], 5, "{}", recreated.body);

    let list = app.admin(Method::GET, &format!("/v1/config/upstreams?min_seq={}", recreated.seq()), None).await?;
    assert_eq!(list.body["items"].as_array().map(Vec::len), Some(1), "{}", list.body);
    let unknown = app.admin(Method::GET, "/v1/config/widgets", None).await?;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    app.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_one_wins_the_other_gets_409_or_412() -> TestResult {
    let app = ConfigApp::spawn().await?;
    // Two creates of one name: exactly one succeeds.
    let (first, second) = tokio::join!(
        app.admin(Method::POST, "/v1/config/upstreams", Some(upstream("pool", 8001))),
        app.admin(Method::POST, "/v1/config/upstreams", Some(upstream("pool", 8002))),
    );
    let mut statuses = [first?.status, second?.status];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);

    // Two updates based on the same version: exactly one succeeds.
    for round in 0..5 {
        let current = app
            .admin(Method::GET, &format!("/v1/config/upstreams/pool?min_seq={}", app.last_seq().await?), None)
            .await?;
        let etag = current.header("etag").unwrap().to_owned();
        let condition = [("if-match", etag.as_str())];
        let (first, second) = tokio::join!(
            app.call(
                Method::PUT,
                "/v1/config/upstreams/pool",
                Some(&app.admin),
                Some(upstream("pool", 9000 + round)),
                &condition
            ),
            app.call(
                Method::PUT,
                "/v1/config/upstreams/pool",
                Some(&app.admin),
                Some(upstream("pool", 9500 + round)),
                &condition
            ),
        );
        let mut statuses = [first?.status, second?.status];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::PRECONDITION_FAILED], "round {round}");
    }
    // Writers of different entities do not fail each other.
    let writes =
        (0..6).map(|index| app.admin(Method::POST, "/v1/config/consumers", Some(json!({"name": format!("c{index}")}))));
    for answer in futures::future::join_all(writes).await {
        assert_eq!(answer?.status, StatusCode::CREATED);
    }
    app.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_name_the_field_and_change_nothing() -> TestResult {
    let app = ConfigApp::spawn().await?;
    app.admin(Method::POST, "/v1/config/upstreams", Some(upstream("u", 8000))).await?;
    app.admin(Method::POST, "/v1/config/routes", Some(route("a", "/users/{id}", "u"))).await?;
    let before = app.last_seq().await?;
    for (collection, body, field) in [
        ("routes", json!({"name": "r", "paths": ["users"], "upstream": "u"}), "routes.paths[0]"),
        ("routes", json!({"name": "r", "paths": ["/x"], "upstream": "nope"}), "routes.upstream"),
        ("routes", json!({"name": "r", "paths": ["/x", "/users/{uid}"], "upstream": "u"}), "routes.paths[1]"),
        ("routes", json!({"name": "r", "paths": ["/x"]}), "routes.upstream"),
        ("routes", json!({"name": "r", "paths": ["/x"], "upstream": "u", "colour": "red"}), "routes.colour"),
        ("routes", json!({"name": "r.s", "paths": ["/x"], "upstream": "u"}), "routes.name"),
        ("routes", json!({"name": "r", "paths": "/x", "upstream": "u"}), "routes.paths"),
        (
            "upstreams",
            json!({"name": "v", "targets": [{"url": "http://a:1", "weight": "heavy"}]}),
            "upstreams.targets[0].weight",
        ),
        ("upstreams", json!({"name": "v", "algorithm": "random", "targets": []}), "upstreams.algorithm"),
        ("upstreams", json!({"name": "v", "targets": [{"url": "localhost:80"}]}), "upstreams.targets[0].url"),
        (
            "upstreams",
            json!({"name": "v", "targets": [{"url": "http://a:80", "weight": 0}]}),
            "upstreams.targets[0].weight",
        ),
        (
            "policies",
            json!({"name": "p", "type": "rate_limit", "settings": {"requests": 10}}),
            "policies.settings.window_secs",
        ),
        (
            "policies",
            json!({"name": "p", "type": "cache", "routes": ["ghost"], "settings": {"ttl_secs": 5}}),
            "policies.routes[0]",
        ),
    ] {
        let answer = app.admin(Method::POST, &format!("/v1/config/{collection}"), Some(body.clone())).await?;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}: {}", answer.body);
        assert_eq!(answer.body["error"]["code"], "invalid_field", "{body}: {}", answer.body);
        assert_eq!(answer.body["error"]["field"], field, "{body}: {}", answer.body);
    }
    let patch = app.admin(Method::PATCH, "/v1/config/routes/a", Some(json!({"timeout_ms": 0}))).await?;
    assert_eq!(patch.body["error"]["field"], "routes.timeout_ms", "{}", patch.body);
    let rename = app.admin(Method::PUT, "/v1/config/routes/a", Some(route("b", "/b", "u"))).await?;
    assert_eq!(rename.body["error"]["field"], "routes.name", "{}", rename.body);
    let bad_apply = app
        .admin(
            Method::POST,
            "/v1/config/apply",
            Some(json!({"document": {"upstreams": [upstream("w", 1)], "routes": [route("z", "nope", "w")]}, "prune": false})),
        )
        .await?;
    assert_eq!(bad_apply.body["error"]["field"], "routes.paths[0]", "{}", bad_apply.body);
    let typo = app
        .admin(
            Method::POST,
            "/v1/config/apply",
            Some(json!({"document": {"routes": [{"name": "z", "upstraem": "w"}]}})),
        )
        .await?;
    assert_eq!(typo.body["error"]["field"], "document.routes[0].upstraem", "{}", typo.body);
    assert_eq!(app.last_seq().await?, before, "a refused write appends nothing");
    app.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_401_without_or_with_a_bad_token_403_with_too_small_a_scope() -> TestResult {
    let app = ConfigApp::spawn().await?;
    let reader = app.token("reader", Scope::Read).await?;
    let writer = app.token("writer", Scope::Write).await?;

    let anonymous = app.call(Method::GET, "/v1/config/routes", None, None, &[]).await?;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert!(anonymous.header("www-authenticate").is_some_and(|value| value.starts_with("Bearer")));
    let forged = app.call(Method::GET, "/v1/config/routes", Some("stn_000000000000_deadbeef"), None, &[]).await?;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    let last = if reader.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &reader[..reader.len() - 1]);
    assert_eq!(
        app.call(Method::GET, "/v1/config/routes", Some(&tampered), None, &[]).await?.status,
        StatusCode::UNAUTHORIZED
    );

    assert_eq!(app.call(Method::GET, "/v1/config/routes", Some(&reader), None, &[]).await?.status, StatusCode::OK);
    let denied = app.call(Method::POST, "/v1/config/upstreams", Some(&reader), Some(upstream("u", 1)), &[]).await?;
    assert_eq!((denied.status, denied.body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
    assert!(denied.header("www-authenticate").is_some_and(|value| value.contains("insufficient_scope")));
    let written = app.call(Method::POST, "/v1/config/upstreams", Some(&writer), Some(upstream("u", 1)), &[]).await?;
    assert_eq!(written.status, StatusCode::CREATED);
    let revert = app.call(Method::POST, "/v1/config/revert", Some(&writer), Some(json!({"to_seq": 0})), &[]).await?;
    assert_eq!(revert.status, StatusCode::FORBIDDEN, "revert needs admin");

    // Tokens are stored hashed.
    let stored: Vec<String> = sqlx::query_scalar("SELECT secret_sha256 FROM api_tokens").fetch_all(&app.pool).await?;
    assert!(stored.iter().all(|hash| hash.len() == 64 && !hash.contains(&reader) && hash != &reader));
    // Tokens through the API: admin only, shown once, listed without secrets, revoked at once.
    let by_reader =
        app.call(Method::POST, "/v1/tokens", Some(&reader), Some(json!({"name": "x", "scope": "read"})), &[]).await?;
    assert_eq!(by_reader.status, StatusCode::FORBIDDEN, "{}", by_reader.body);
    let minted = app.admin(Method::POST, "/v1/tokens", Some(json!({"name": "ci", "scope": "write"}))).await?;
    assert_eq!(minted.status, StatusCode::CREATED, "{}", minted.body);
    let ci = minted.body["token"].as_str().unwrap().to_owned();
    let taken = app.admin(Method::POST, "/v1/tokens", Some(json!({"name": "ci", "scope": "read"}))).await?;
    assert_eq!(taken.status, StatusCode::CONFLICT);
    let bad_scope = app.admin(Method::POST, "/v1/tokens", Some(json!({"name": "y", "scope": "root"}))).await?;
    assert_eq!(bad_scope.body["error"]["field"], "tokens.scope", "{}", bad_scope.body);
    let ci_write =
        app.call(Method::POST, "/v1/config/consumers", Some(&ci), Some(json!({"name": "by-ci"})), &[]).await?;
    assert_eq!(ci_write.status, StatusCode::CREATED);
    let listed = app.admin(Method::GET, "/v1/tokens", None).await?;
    assert!(!listed.body.to_string().contains(&ci) && listed.body.to_string().contains("\"ci\""), "{}", listed.body);
    assert_eq!(app.admin(Method::DELETE, "/v1/tokens/ci", None).await?.status, StatusCode::NO_CONTENT);
    let after = app.call(Method::GET, "/v1/config/routes", Some(&ci), None, &[]).await?;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);

    assert!(stone_gateway::auth::revoke_token(&app.pool, "reader").await?);
    assert_eq!(
        app.call(Method::GET, "/v1/config/routes", Some(&reader), None, &[]).await?.status,
        StatusCode::UNAUTHORIZED
    );
    app.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_shown_once_and_stored_only_as_hashes() -> TestResult {
    let app = ConfigApp::spawn().await?;
    app.admin(Method::POST, "/v1/config/consumers", Some(json!({"name": "acme", "metadata": {"tier": "gold"}})))
        .await?;
    let created = app.admin(Method::POST, "/v1/config/consumers/acme/keys", None).await?;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let key = created.body["key"].as_str().unwrap().to_owned();
    let key_id = created.body["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("sk_{key_id}_")) && key.len() > 60);

    let read = app.admin(Method::GET, &format!("/v1/config/consumers/acme?min_seq={}", created.seq()), None).await?;
    let keys = read.body["spec"]["api_keys"].clone();
    assert_eq!(keys[0]["id"], key_id.as_str());
    assert_eq!(keys[0]["sha256"], stone_events::config::sha256_hex(&key));
    assert!(!read.body.to_string().contains(&key));
    let secret = key.rsplit('_').next().unwrap();
    for payload in app.raw_stream().await? {
        assert!(!payload.contains(secret), "the key's secret reached the stream");
    }
    let history = app.admin(Method::GET, "/v1/config/history?kind=consumer&name=acme", None).await?;
    assert!(!history.body.to_string().contains(secret));

    // Writing the consumer keeps its keys; revoking removes one.
    let kept = app.admin(Method::PUT, "/v1/config/consumers/acme", Some(json!({"name": "acme"}))).await?;
    assert_eq!(kept.body["spec"]["api_keys"][0]["id"], key_id.as_str(), "{}", kept.body);
    let revoked = app.admin(Method::DELETE, &format!("/v1/config/consumers/acme/keys/{key_id}"), None).await?;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    assert!(revoked.body["spec"].get("api_keys").is_none(), "{}", revoked.body);
    let missing = app.admin(Method::DELETE, &format!("/v1/config/consumers/acme/keys/{key_id}"), None).await?;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    app.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_one_change_set_and_export_then_apply_is_a_no_op() -> TestResult {
    let app = ConfigApp::spawn().await?;
    let document = json!({
        "upstreams": [upstream("users", 8000), upstream("orders", 8001)],
        "routes": [route("users", "/users/{id}", "users"), route("orders", "/orders", "orders")],
        "consumers": [{"name": "acme"}],
        "policies": [{"name": "limit", "type": "rate_limit", "routes": ["users"], "settings": {"requests": 100, "window_secs": 60}}],
    });
    let dry = app.admin(Method::POST, "/v1/config/apply", Some(json!({"document": document, "dry_run": true}))).await?;
    assert_eq!(dry.body["changes"].as_array().map(Vec::len), Some(6), "{}", dry.body);
    assert_eq!(app.last_seq().await?, 0, "a dry run writes nothing");
    let applied = app.admin(Method::POST, "/v1/config/apply", Some(json!({"document": document}))).await?;
    assert_eq!(applied.status, StatusCode::OK, "{}", applied.body);
    assert_eq!(applied.body["applied"], true);
    assert_eq!(applied.seq(), 6);
    let history = app.admin(Method::GET, &format!("/v1/config/history?min_seq={}", applied.seq()), None).await?;
    assert_eq!(history.status, StatusCode::OK, "{}", history.body);
    let sets: Vec<&Value> = history.body["items"].as_array().unwrap().iter().map(|item| &item["change_set"]).collect();
    assert_eq!(sets.len(), 6);
    assert!(sets.iter().all(|set| *set == sets[0] && !set.is_null()), "one change set: {sets:?}");
    assert!(history.body["items"].as_array().unwrap().iter().all(|item| item["effective_seq"] == 6));

    let exported = app.admin(Method::GET, "/v1/config/export", None).await?;
    let again = app.admin(Method::POST, "/v1/config/apply", Some(json!({"document": exported.body}))).await?;
    assert_eq!(again.body["changes"], json!([]), "{}", again.body);
    assert_eq!(again.body["applied"], false);
    assert_eq!(app.last_seq().await?, 6);

    // Pruning: a document without the policy and the orders route deletes both, atomically.
    let mut smaller = exported.body.clone();
    smaller["policies"] = json!([]);
    smaller["routes"] = json!([route("users", "/users/{id}", "users")]);
    let pruned = app.admin(Method::POST, "/v1/config/apply", Some(json!({"document": smaller}))).await?;
    assert_eq!(pruned.body["changes"].as_array().map(Vec::len), Some(2), "{}", pruned.body);
    let routes = app.admin(Method::GET, &format!("/v1/config/routes?min_seq={}", pruned.seq()), None).await?;
    assert_eq!(routes.body["items"].as_array().map(Vec::len), Some(1));
    app.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_snapshots_and_revert_with_compensating_events() -> TestResult {
    let app = ConfigApp::spawn().await?;
    app.admin(Method::POST, "/v1/config/upstreams", Some(upstream("u", 8000))).await?;
    let first = app.admin(Method::POST, "/v1/config/routes", Some(route("r", "/one", "u"))).await?;
    app.wait_projected(&app.pool, first.seq()).await?;
    let between = time::OffsetDateTime::now_utc();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    app.admin(Method::PUT, "/v1/config/routes/r", Some(route("r", "/two", "u"))).await?;
    let extra = app.admin(Method::POST, "/v1/config/upstreams", Some(upstream("extra", 8001))).await?;

    let history =
        app.admin(Method::GET, &format!("/v1/config/history?kind=route&name=r&min_seq={}", extra.seq()), None).await?;
    let items = history.body["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2, "{}", history.body);
    assert_eq!(items[0]["before"]["paths"], json!(["/one"]));
    assert_eq!(items[0]["after"]["paths"], json!(["/two"]));
    assert_eq!(items[0]["changed_fields"], json!(["paths"]));
    assert_eq!(items[0]["actor"], "admin");
    assert!(items[1]["before"].is_null());
    let page = app.admin(Method::GET, "/v1/config/history?limit=1", None).await?;
    let cursor = page.body["next_cursor"].as_u64().unwrap();
    let next = app.admin(Method::GET, &format!("/v1/config/history?limit=1&cursor={cursor}"), None).await?;
    assert!(next.body["items"][0]["stream_seq"].as_u64().unwrap() < cursor);
    let bad = app.admin(Method::GET, "/v1/config/history?limit=0", None).await?;
    assert_eq!(bad.body["error"]["field"], "limit");

    let at = stone_events::timestamp::format(between);
    let snapshot = app.admin(Method::GET, &format!("/v1/config/snapshot?at={at}"), None).await?;
    assert_eq!(snapshot.body["as_of_seq"], first.seq(), "{}", snapshot.body);
    assert_eq!(snapshot.body["document"]["routes"][0]["paths"], json!(["/one"]));
    assert_eq!(snapshot.body["document"]["upstreams"].as_array().map(Vec::len), Some(1));
    let by_seq = app.admin(Method::GET, &format!("/v1/config/snapshot?seq={}", first.seq()), None).await?;
    assert_eq!(by_seq.body["document"], snapshot.body["document"]);

    let reverted = app.admin(Method::POST, "/v1/config/revert", Some(json!({"to_seq": first.seq()}))).await?;
    assert_eq!(reverted.status, StatusCode::OK, "{}", reverted.body);
    assert_eq!(reverted.body["changes"].as_array().map(Vec::len), Some(2), "update r, delete extra: {}", reverted.body);
    let now = app.admin(Method::GET, &format!("/v1/config/export?min_seq={}", reverted.seq()), None).await?;
    assert_eq!(now.body, snapshot.body["document"]);
    let route_now = app.admin(Method::GET, "/v1/config/routes/r", None).await?;
    assert_eq!(route_now.body["version"], 3, "a revert is new events, not rewritten history");
    assert!(route_now.body["updated_by"].as_str().unwrap().contains("revert"));
    app.finish().await;
    Ok(())
}
