//! Authentication per route: API keys (stored as SHA-256 hashes on consumers, presented in a
//! header or a query parameter) and JWT bearer tokens (HS256, RS256, ES256; `exp`, `nbf`, `iss`
//! and `aud` checked; keys inline, or from a JWKS file or URL that is refreshed).
//!
//! 401 means "who are you?": credentials are missing or invalid, and the answer carries a
//! `WWW-Authenticate` challenge. 403 means "you may not": the consumer is known but not among the
//! route's allowed consumers. The consumer's name goes into the request event.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use stone_events::config::{AuthSpec, JwtSpec};

/// API key hashes of every consumer: SHA-256 hex → consumer name.
#[derive(Debug, Default)]
pub struct KeyRing {
    by_hash: HashMap<String, String>,
}

impl KeyRing {
    pub fn insert(&mut self, sha256_hex: &str, consumer: &str) {
        self.by_hash.insert(sha256_hex.to_ascii_lowercase(), consumer.to_owned());
    }

    fn consumer_of(&self, key: &str) -> Option<&str> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        self.by_hash.get(&hex).map(String::as_str)
    }
}

/// The outcome of authenticating a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// The consumer's name.
    Authenticated(String),
    /// 401 with this `WWW-Authenticate` challenge.
    Unauthenticated { challenge: String, reason: &'static str },
    /// 403: known consumer, not allowed here.
    Forbidden(String),
}

/// Keys a JWT may be signed with; shared with the refresher of a JWKS.
#[derive(Default)]
pub struct JwtKeys {
    /// `(kid, algorithm, key)`; a `None` kid matches any token.
    keys: RwLock<Vec<(Option<String>, Algorithm, DecodingKey)>>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key material stays out of logs; the count is what matters when debugging.
        let count = self.keys.read().map(|keys| keys.len()).unwrap_or(0);
        formatter.debug_struct("JwtKeys").field("keys", &count).finish()
    }
}

impl JwtKeys {
    fn replace(&self, keys: Vec<(Option<String>, Algorithm, DecodingKey)>) {
        if let Ok(mut current) = self.keys.write() {
            *current = keys;
        }
    }

    /// Loads a JWKS document; keys whose algorithm is not accepted are left out.
    pub fn load_jwks(&self, document: &[u8], accepted: &[Algorithm]) -> Result<usize, String> {
        let set: JwkSet = serde_json::from_slice(document).map_err(|error| format!("JWKS: {error}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
            let algorithm = jwk
                .common
                .key_algorithm
                .and_then(|algorithm| algorithm.to_string().parse::<Algorithm>().ok())
                .or_else(|| accepted.first().copied());
            if let Some(algorithm) = algorithm.filter(|algorithm| accepted.contains(algorithm)) {
                keys.push((jwk.common.key_id.clone(), algorithm, key));
            }
        }
        let count = keys.len();
        self.replace(keys);
        Ok(count)
    }
}

/// Where a JWKS comes from, for the refresher.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(String),
    Url(String),
}

/// A compiled JWT rule.
#[derive(Debug)]
pub struct JwtRule {
    pub keys: Arc<JwtKeys>,
    pub algorithms: Vec<Algorithm>,
    pub jwks: Option<JwksSource>,
    issuer: Option<String>,
    audience: Option<String>,
    consumer_claim: String,
}

/// A compiled route authentication rule.
#[derive(Debug)]
pub enum AuthRule {
    ApiKey { header: HeaderName, query: Option<String>, consumers: Vec<String> },
    Jwt { rule: JwtRule, consumers: Vec<String> },
}

impl AuthRule {
    /// Compiles a route's `auth`; errors name the field.
    pub fn compile(spec: &AuthSpec) -> Result<Self, String> {
        match spec {
            AuthSpec::ApiKey { header, query, consumers } => {
                let header = header.as_deref().unwrap_or("x-api-key");
                let header = HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| format!("auth.header: {header:?} is not a header name"))?;
                Ok(Self::ApiKey { header, query: query.clone(), consumers: consumers.clone() })
            }
            AuthSpec::Jwt(jwt) => Ok(Self::Jwt { rule: compile_jwt(jwt)?, consumers: jwt.consumers.clone() }),
        }
    }

    /// An `api_key` auth policy: `{type: "api_key", header?}`.
    pub fn from_policy_settings(
        settings: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Result<Self, String> {
        match settings.get("type").and_then(serde_json::Value::as_str) {
            Some("api_key") | None => {}
            Some(other) => return Err(format!("settings.type: {other:?} is not supported by auth policies")),
        }
        let header = settings.get("header").and_then(serde_json::Value::as_str).map(str::to_owned);
        Self::compile(&AuthSpec::ApiKey { header, query: None, consumers: Vec::new() })
    }

    /// Authenticates a request with this rule.
    pub fn authenticate(&self, headers: &HeaderMap, query: Option<&str>, keys: &KeyRing) -> AuthOutcome {
        match self {
            Self::ApiKey { header, query: query_name, consumers } => {
                let challenge = format!("ApiKey header=\"{header}\"");
                let presented =
                    headers.get(header).and_then(|value| value.to_str().ok()).map(str::to_owned).or_else(|| {
                        let name = query_name.as_deref()?;
                        query_parameter(query?, name)
                    });
                let Some(presented) = presented else {
                    return AuthOutcome::Unauthenticated { challenge, reason: "missing_credentials" };
                };
                match keys.consumer_of(&presented) {
                    None => AuthOutcome::Unauthenticated { challenge, reason: "invalid_key" },
                    Some(consumer) => allow(consumer, consumers),
                }
            }
            Self::Jwt { rule, consumers } => {
                let challenge = "Bearer realm=\"proxy-stone\"".to_owned();
                let token = headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")));
                let Some(token) = token else {
                    return AuthOutcome::Unauthenticated { challenge, reason: "missing_credentials" };
                };
                match rule.verify(token.trim()) {
                    Ok(consumer) => allow(&consumer, consumers),
                    Err(reason) => AuthOutcome::Unauthenticated {
                        challenge: format!(
                            "Bearer realm=\"proxy-stone\", error=\"invalid_token\", error_description=\"{reason}\""
                        ),
                        reason: "invalid_token",
                    },
                }
            }
        }
    }
}

fn allow(consumer: &str, allowed: &[String]) -> AuthOutcome {
    if allowed.is_empty() || allowed.iter().any(|name| name == consumer) {
        AuthOutcome::Authenticated(consumer.to_owned())
    } else {
        AuthOutcome::Forbidden(consumer.to_owned())
    }
}

fn query_parameter(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

fn compile_jwt(spec: &JwtSpec) -> Result<JwtRule, String> {
    let algorithms = spec
        .algorithms
        .iter()
        .map(|name| match name.as_str() {
            "HS256" => Ok(Algorithm::HS256),
            "RS256" => Ok(Algorithm::RS256),
            "ES256" => Ok(Algorithm::ES256),
            other => Err(format!("auth.algorithms: {other:?} is not HS256, RS256 or ES256")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if algorithms.is_empty() {
        return Err("auth.algorithms: at least one algorithm is required".to_owned());
    }
    let mut keys = Vec::new();
    if let Some(secret) = &spec.secret {
        keys.push((None, Algorithm::HS256, DecodingKey::from_secret(secret.as_bytes())));
    }
    if let Some(pem) = &spec.public_key_pem {
        for algorithm in algorithms.iter().filter(|algorithm| **algorithm != Algorithm::HS256) {
            let key = match algorithm {
                Algorithm::ES256 => DecodingKey::from_ec_pem(pem.as_bytes()),
                _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
            };
            if let Ok(key) = key {
                keys.push((None, *algorithm, key));
            }
        }
        if keys.iter().all(|(_, algorithm, _)| *algorithm == Algorithm::HS256) {
            return Err("auth.public_key_pem: not an RSA or EC public key for the listed algorithms".to_owned());
        }
    }
    let jwks = match (&spec.jwks_file, &spec.jwks_url) {
        (Some(file), _) => Some(JwksSource::File(file.clone())),
        (None, Some(url)) => Some(JwksSource::Url(url.clone())),
        (None, None) => None,
    };
    if keys.is_empty() && jwks.is_none() {
        return Err("auth: a JWT route needs secret, public_key_pem, jwks_file or jwks_url".to_owned());
    }
    let shared = Arc::new(JwtKeys::default());
    shared.replace(keys);
    if let Some(JwksSource::File(path)) = &jwks {
        let document = std::fs::read(path).map_err(|error| format!("auth.jwks_file: {path}: {error}"))?;
        shared.load_jwks(&document, &algorithms).map_err(|message| format!("auth.jwks_file: {message}"))?;
    }
    Ok(JwtRule {
        keys: shared,
        algorithms,
        jwks,
        issuer: spec.issuer.clone(),
        audience: spec.audience.clone(),
        consumer_claim: spec.consumer_claim.clone().unwrap_or_else(|| "sub".to_owned()),
    })
}

impl JwtRule {
    /// Verifies signature, `exp`, `nbf`, `iss` and `aud`; returns the consumer claim.
    fn verify(&self, token: &str) -> Result<String, &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        if !self.algorithms.contains(&header.alg) {
            return Err("algorithm not accepted");
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp"]);
        match &self.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let keys = self.keys.keys.read().map_err(|_| "keys unavailable")?;
        let candidates = keys.iter().filter(|(kid, algorithm, _)| {
            *algorithm == header.alg && (kid.is_none() || header.kid.is_none() || *kid == header.kid)
        });
        let mut last = "no key for this token";
        for (_, _, key) in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &validation) {
                Ok(data) => {
                    return data
                        .claims
                        .get(&self.consumer_claim)
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_owned)
                        .ok_or("consumer claim missing");
                }
                Err(error) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match error.kind() {
                        ErrorKind::ExpiredSignature => "token expired",
                        ErrorKind::ImmatureSignature => "token not yet valid",
                        ErrorKind::InvalidIssuer => "wrong issuer",
                        ErrorKind::InvalidAudience => "wrong audience",
                        ErrorKind::InvalidSignature => "bad signature",
                        _ => "invalid token",
                    };
                }
            }
        }
        Err(last)
    }
}

/// Keeps a JWKS fresh: re-reads the file or re-fetches the URL at once and then `every`
/// (`proxy.jwks_refresh_secs`) until `token` is cancelled. A failed refresh keeps the keys it had.
pub async fn refresh_jwks(
    keys: Arc<JwtKeys>,
    source: JwksSource,
    algorithms: Vec<Algorithm>,
    every: Duration,
    token: tokio_util::sync::CancellationToken,
) {
    loop {
        let document = match &source {
            JwksSource::File(path) => tokio::task::spawn_blocking({
                let path = path.clone();
                move || std::fs::read(path).map_err(|error| error.to_string())
            })
            .await
            .unwrap_or_else(|error| Err(error.to_string())),
            JwksSource::Url(url) => fetch(url).await,
        };
        match document.and_then(|document| keys.load_jwks(&document, &algorithms)) {
            Ok(count) => tracing::debug!(count, "jwks refreshed"),
            Err(error) => {
                metrics::counter!("stone_proxy_jwks_refresh_failures_total").increment(1);
                tracing::warn!(%error, "jwks refresh failed; keeping the previous keys");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = token.cancelled() => return,
        }
    }
}

async fn fetch(url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let request = http::Request::get(uri).body(http_body_util::Empty::new()).map_err(|error| error.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|error| error.to_string())?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let body = response.into_body().collect().await.map_err(|error| error.to_string())?;
    Ok(body.to_bytes().to_vec())
}

/// The `WWW-Authenticate` header value for a challenge.
pub fn challenge_header(challenge: &str) -> HeaderValue {
    HeaderValue::from_str(challenge).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
}
