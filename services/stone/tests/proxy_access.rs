//! Auth and rate limits through real sockets, with configuration from the CONFIG stream:
//! API keys (hashed on consumers; header or query), JWT (HS256, RS256, ES256; exp, nbf, iss, aud),
//! 401 with a challenge versus 403, and one rate limit shared by two workers through Redis, with
//! the fail-open and fail-closed behaviours when Redis is away.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod proxy_support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proxy_support::*;
use stone_events::Event;
use stone_events::config::{
    ApiKeyHash, AuthSpec, ConsumerSpec, EntitySpec, JwtSpec, PolicySpec, RateLimitSpec, RouteSpec,
};
use stone_kit::testing::{caught, rethrow};
use stone_kit::{Shutdown, StoneConfig};

/// Publishes `entities` (the upstream `app` first), builds a proxy and waits until it is ready.
async fn start(
    config: &StoneConfig,
    shutdown: &Shutdown,
    upstream: &TestUpstream,
    entities: Vec<EntitySpec>,
) -> Result<stone_proxy::RunningProxy, BoxError> {
    let (_nats, js) = stone_kit::nats::connect_and_provision(config, "proxy-test").await?;
    if js.get_stream(config.namespace().stream_name("CONFIG")).await?.info().await?.state.messages == 0 {
        publish_config(&js, config, EntitySpec::Upstream(upstream_spec("app", &[(upstream.address, 1)])), 1).await?;
        for entity in entities {
            publish_config(&js, config, entity, 1).await?;
        }
    }
    let proxy = stone_proxy::build(config, shutdown).await?;
    let client = client();
    let readyz = format!("http://{}/readyz", proxy.admin_addr);
    assert!(
        eventually(100, || async { get(&client, &readyz).await.ok().map(|(status, _)| status) == Some(200) }).await
    );
    Ok(proxy)
}

fn route(name: &str, path: &str) -> RouteSpec {
    route_spec(name, &[path], "app")
}

/// Status, `WWW-Authenticate` and body of a GET with extra headers.
async fn call(
    client: &TestClient,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, hyper::HeaderMap), BoxError> {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client.request(request.body(Empty::<Bytes>::new())?).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = String::from_utf8_lossy(&response.into_body().collect().await?.to_bytes()).into_owned();
    Ok((status, body, headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_in_header_or_query_with_401_versus_403() -> TestResult {
    let shutdown = Shutdown::new();
    let config = isolated_config();
    let outcome = caught(async {
        let upstream = TestUpstream::start("app", &shutdown).await?;
        let consumer = |name: &str, key: &str| {
            EntitySpec::Consumer(ConsumerSpec {
                name: name.into(),
                metadata: Default::default(),
                api_keys: vec![ApiKeyHash { id: format!("k-{name}"), sha256: stone_events::config::sha256_hex(key) }],
            })
        };
        let keyed = RouteSpec {
            auth: Some(Box::new(AuthSpec::ApiKey {
                header: None,
                query: Some("api_key".into()),
                consumers: vec!["alice".into()],
            })),
            ..route("keyed", "/keyed/*")
        };
        let policy = EntitySpec::Policy(PolicySpec {
            name: "key-required".into(),
            policy_type: "auth".into(),
            routes: vec!["by-policy".into()],
            settings: serde_json::from_value(serde_json::json!({"type": "api_key", "header": "x-key"}))?,
        });
        let entities = vec![
            consumer("alice", "alice-secret-key"),
            consumer("bob", "bob-secret-key"),
            EntitySpec::Route(keyed),
            EntitySpec::Route(route("by-policy", "/policy/*")),
            policy,
        ];
        let proxy = start(&config, &shutdown, &upstream, entities).await?;
        let client = client();
        let keyed_url = format!("http://{}/keyed/x", proxy.listen_addr);

        let (status, _, headers) = call(&client, &keyed_url, &[]).await?;
        assert_eq!(status, 401, "no key");
        assert_eq!(headers["www-authenticate"], "ApiKey header=\"x-api-key\"");
        assert_eq!(call(&client, &keyed_url, &[("x-api-key", "wrong")]).await?.0, 401, "unknown key");
        assert_eq!(call(&client, &keyed_url, &[("x-api-key", "alice-secret-key")]).await?.0, 200);
        assert_eq!(call(&client, &format!("{keyed_url}?api_key=alice-secret-key"), &[]).await?.0, 200, "query");
        assert_eq!(call(&client, &keyed_url, &[("x-api-key", "bob-secret-key")]).await?.0, 403, "known, not allowed");

        let policy_url = format!("http://{}/policy/x", proxy.listen_addr);
        assert_eq!(call(&client, &policy_url, &[]).await?.0, 401, "policy attached to the route");
        assert_eq!(call(&client, &policy_url, &[("x-key", "bob-secret-key")]).await?.0, 200);

        // The consumer is in the events: alice twice, bob once allowed and once refused.
        let js = jetstream(&config).await?;
        let mut consumers = Vec::new();
        for _ in 0..50 {
            consumers = read_events(&js, &config, "request.>")
                .await?
                .into_iter()
                .filter_map(|event| match event {
                    Event::RequestCompleted(envelope) => Some((envelope.data.status, envelope.data.consumer)),
                    _ => None,
                })
                .collect();
            if consumers.len() == 7 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let alice = Some("alice".to_owned());
        let bob = Some("bob".to_owned());
        assert_eq!(
            consumers,
            vec![
                (401, None),
                (401, None),
                (200, alice.clone()),
                (200, alice),
                (403, bob.clone()),
                (401, None),
                (200, bob),
            ]
        );
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}

/// An RSA and an EC key pair from the openssl command, as (private PEM, public PEM).
fn key_pair(kind: &str) -> (Vec<u8>, String) {
    let dir = std::env::temp_dir().join(format!("stone-jwt-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let generate: &[&str] = match kind {
        "rsa" => &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"],
        _ => &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out"],
    };
    assert!(std::process::Command::new("openssl").args(generate).arg(&private).status().unwrap().success());
    assert!(
        std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success()
    );
    let pair = (std::fs::read(&private).unwrap(), std::fs::read_to_string(&public).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    pair
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), &claims, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_hs256_rs256_es256_with_claims_checked() -> TestResult {
    let shutdown = Shutdown::new();
    let config = isolated_config();
    let (rsa_private, rsa_public) = key_pair("rsa");
    let (ec_private, ec_public) = key_pair("ec");
    let outcome = caught(async {
        let upstream = TestUpstream::start("app", &shutdown).await?;
        let jwt = |algorithms: &[&str], secret: Option<&str>, pem: Option<&str>| JwtSpec {
            algorithms: algorithms.iter().map(|a| (*a).to_owned()).collect(),
            secret: secret.map(str::to_owned),
            public_key_pem: pem.map(str::to_owned),
            jwks_file: None,
            jwks_url: None,
            issuer: Some("https://issuer.test".into()),
            audience: Some("proxy-stone".into()),
            consumer_claim: None,
            consumers: vec![],
        };
        let routes = vec![
            RouteSpec { auth: Some(Box::new(AuthSpec::Jwt(jwt(&["HS256"], Some("shared-secret"), None)))), ..route("hs", "/hs/*") },
            RouteSpec { auth: Some(Box::new(AuthSpec::Jwt(jwt(&["RS256"], None, Some(&rsa_public))))), ..route("rs", "/rs/*") },
            RouteSpec {
                auth: Some(Box::new(AuthSpec::Jwt(JwtSpec { consumers: vec!["carol".into()], ..jwt(&["ES256"], None, Some(&ec_public)) }))),
                ..route("es", "/es/*")
            },
        ];
        let proxy = start(&config, &shutdown, &upstream, routes.into_iter().map(EntitySpec::Route).collect()).await?;
        let client = client();
        let url = |path: &str| format!("http://{}{path}", proxy.listen_addr);
        let claims = |sub: &str| {
            serde_json::json!({"sub": sub, "iss": "https://issuer.test", "aud": "proxy-stone", "exp": now() + 600, "nbf": now() - 10})
        };
        let hs = EncodingKey::from_secret(b"shared-secret");
        let rs = EncodingKey::from_rsa_pem(&rsa_private)?;
        let es = EncodingKey::from_ec_pem(&ec_private)?;
        let bearer = |token: String| format!("Bearer {token}");

        let (status, _, headers) = call(&client, &url("/hs/a"), &[]).await?;
        assert_eq!(status, 401);
        assert!(headers["www-authenticate"].to_str()?.starts_with("Bearer"), "{headers:?}");
        for (path, algorithm, key) in [("/hs/a", Algorithm::HS256, &hs), ("/rs/a", Algorithm::RS256, &rs), ("/es/a", Algorithm::ES256, &es)] {
            let token = bearer(sign(algorithm, key, claims("carol")));
            assert_eq!(call(&client, &url(path), &[("authorization", &token)]).await?.0, 200, "{path}");
        }
        let mut expired = claims("carol");
        expired["exp"] = serde_json::json!(now() - 3600);
        let mut early = claims("carol");
        early["nbf"] = serde_json::json!(now() + 3600);
        let mut foreign = claims("carol");
        foreign["iss"] = serde_json::json!("https://elsewhere.test");
        let mut other_audience = claims("carol");
        other_audience["aud"] = serde_json::json!("someone-else");
        for (case, token) in [
            ("expired", sign(Algorithm::HS256, &hs, expired)),
            ("not yet valid", sign(Algorithm::HS256, &hs, early)),
            ("wrong issuer", sign(Algorithm::HS256, &hs, foreign)),
            ("wrong audience", sign(Algorithm::HS256, &hs, other_audience)),
            ("wrong secret", sign(Algorithm::HS256, &EncodingKey::from_secret(b"guess"), claims("carol"))),
            ("algorithm not accepted", sign(Algorithm::RS256, &rs, claims("carol"))),
        ] {
            let (status, _, headers) = call(&client, &url("/hs/a"), &[("authorization", &bearer(token))]).await?;
            assert_eq!(status, 401, "{case}");
            assert!(headers["www-authenticate"].to_str()?.contains("invalid_token"), "{case}: {headers:?}");
        }
        let dave = bearer(sign(Algorithm::ES256, &es, claims("dave")));
        assert_eq!(call(&client, &url("/es/a"), &[("authorization", &dave)]).await?.0, 403, "valid token, consumer not allowed");
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rate_limit_is_shared_by_two_workers_through_redis() -> TestResult {
    let shutdown = Shutdown::new();
    let config = isolated_config();
    let outcome = caught(async {
        let upstream = TestUpstream::start("app", &shutdown).await?;
        let limited = RouteSpec {
            rate_limit: Some(RateLimitSpec { requests: 10, window_secs: 3600, by: Some("route".into()) }),
            ..route("limited", "/limited/*")
        };
        let first = start(&config, &shutdown, &upstream, vec![EntitySpec::Route(limited)]).await?;
        let mut second_config = config.clone();
        second_config.proxy.worker_id = format!("{}-b", config.proxy.worker_id);
        second_config.proxy.spool_dir = config.proxy.spool_dir.join("b");
        let second = start(&second_config, &shutdown, &upstream, vec![]).await?;
        let client = client();
        let mut statuses = Vec::new();
        for index in 0..16 {
            let worker = if index % 2 == 0 { &first } else { &second };
            let (status, _, headers) =
                call(&client, &format!("http://{}/limited/{index}", worker.listen_addr), &[]).await?;
            // Every response of the limited route carries the limit, what is left across both
            // workers, and when the whole budget is back (10 per hour: 360 s per request used).
            assert_eq!(headers["ratelimit-limit"], "10", "{index}: {headers:?}");
            let reset: u64 = headers["ratelimit-reset"].to_str()?.parse()?;
            if status == 429 {
                assert!(headers.contains_key("retry-after"), "{headers:?}");
                assert_eq!(headers["ratelimit-remaining"], "0");
                assert!((3240..=3600).contains(&reset), "{index}: reset {reset}");
            } else {
                let remaining: u64 = headers["ratelimit-remaining"].to_str()?.parse()?;
                assert_eq!(remaining, 9 - index, "{headers:?}");
                let used = index + 1;
                assert!(((used - 1) * 360..=used * 360).contains(&reset), "{index}: reset {reset}");
            }
            statuses.push(status);
        }
        assert_eq!(statuses.iter().filter(|status| **status == 200).count(), 10, "{statuses:?}");
        assert_eq!(statuses.iter().filter(|status| **status == 429).count(), 6, "{statuses:?}");
        assert!(
            statuses[..10].iter().all(|status| *status == 200),
            "the first 10 across both workers pass: {statuses:?}"
        );
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_limits_fail_open_by_default_or_closed_when_configured() -> TestResult {
    for (mode, expected) in
        [(stone_kit::config::RateLimitFailureMode::Open, 200), (stone_kit::config::RateLimitFailureMode::Closed, 503)]
    {
        let shutdown = Shutdown::new();
        let mut config = isolated_config();
        config.redis_url = "redis://127.0.0.1:9".into();
        config.proxy.rate_limit_failure = mode;
        let outcome = caught(async {
            let upstream = TestUpstream::start("app", &shutdown).await?;
            let limited = RouteSpec {
                rate_limit: Some(RateLimitSpec { requests: 1, window_secs: 3600, by: Some("ip".into()) }),
                ..route("limited", "/limited/*")
            };
            let proxy = start(&config, &shutdown, &upstream, vec![EntitySpec::Route(limited)]).await?;
            let client = client();
            for _ in 0..3 {
                let (status, _, headers) =
                    call(&client, &format!("http://{}/limited/x", proxy.listen_addr), &[]).await?;
                assert_eq!(status, expected, "{mode:?}");
                assert!(
                    !headers.contains_key("ratelimit-remaining"),
                    "no figures from a limit not checked: {headers:?}"
                );
            }
            // The event says the limit was not checked, and what the failure mode decided.
            let js = jetstream(&config).await?;
            let mut decisions = Vec::new();
            for _ in 0..100 {
                decisions = read_events(&js, &config, "request.>")
                    .await?
                    .into_iter()
                    .filter_map(|event| match event {
                        Event::RequestCompleted(envelope) => Some((envelope.data.status, envelope.data.rate_limit)),
                        _ => None,
                    })
                    .collect();
                if decisions.len() >= 3 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(decisions.len(), 3, "{decisions:?}");
            for (status, decision) in &decisions {
                let decision = decision.as_ref().unwrap_or_else(|| panic!("{mode:?}: no decision: {decisions:?}"));
                assert_eq!(*status, expected);
                assert!(decision.store_unavailable, "{mode:?}: {decision:?}");
                assert_eq!(decision.limited, expected == 503, "{mode:?}: {decision:?}");
            }
            Ok::<(), BoxError>(())
        })
        .await;
        let _ = shutdown.drain(Duration::from_secs(10)).await;
        cleanup(&config).await;
        rethrow(outcome)?;
    }
    Ok(())
}
