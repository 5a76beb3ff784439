//! JWT routes whose keys come from a JWKS, through real sockets: a JWKS served over HTTP by the
//! test and a JWKS file, each rotated while the proxy runs; the new key is accepted and the old
//! one refused once the refresher has read the set again (`proxy.jwks_refresh_secs`), and a JWKS
//! endpoint that starts failing leaves the keys in force.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod proxy_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proxy_support::*;
use stone_events::config::{AuthSpec, JwtSpec, RouteSpec};
use stone_kit::testing::{caught, rethrow};
use stone_kit::{Shutdown, StoneConfig};

/// An ES256 signing key and its public half as a JWK with `kid`.
struct SigningKey {
    kid: &'static str,
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    fn generate(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // The uncompressed point: 0x04, then x and y of 32 bytes each.
        let point = pair.public_key_raw();
        assert_eq!(point.len(), 65);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": base64_url(&point[1..33]), "y": base64_url(&point[33..]),
        });
        Self { kid, encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(), jwk }
    }

    fn bearer(&self) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({"sub": "carol", "exp": now + 600, "nbf": now - 10});
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.to_owned());
        format!("Bearer {}", jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap())
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::json!({ "keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

/// Unpadded base64url (RFC 4648 §5), as JWK coordinates are written.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let value =
            chunk.iter().enumerate().fold(0u32, |value, (index, byte)| value | u32::from(*byte) << (16 - 8 * index));
        for index in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((value >> (18 - 6 * index)) & 63) as usize]));
        }
    }
    out
}

/// A JWKS endpoint whose document and status the test changes; counts the fetches.
#[derive(Clone)]
struct JwksServer {
    address: SocketAddr,
    document: Arc<RwLock<String>>,
    status: Arc<AtomicU16>,
    fetches: Arc<AtomicU64>,
}

impl JwksServer {
    async fn start(document: String, shutdown: &Shutdown) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = Self {
            address: listener.local_addr()?,
            document: Arc::new(RwLock::new(document)),
            status: Arc::new(AtomicU16::new(200)),
            fetches: Arc::new(AtomicU64::new(0)),
        };
        let (state, token) = (server.clone(), shutdown.token());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = token.cancelled() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            state.fetches.fetch_add(1, Ordering::SeqCst);
                            let document = state.document.read().unwrap().clone();
                            let mut response = Response::new(Full::new(Bytes::from(document)));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(state.status.load(Ordering::SeqCst)).unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(server)
    }

    fn serve(&self, document: String) {
        *self.document.write().unwrap() = document;
    }
}

/// A standalone proxy (file configuration) with one JWT route `/jwt/*` using `jwt`, refreshing
/// its JWKS every second.
async fn start_proxy(
    config: &mut StoneConfig,
    shutdown: &Shutdown,
    jwt: JwtSpec,
) -> Result<stone_proxy::RunningProxy, BoxError> {
    let upstream = TestUpstream::start("app", shutdown).await?;
    config.proxy.jwks_refresh_secs = 1;
    config.proxy.upstreams = vec![upstream_spec("app", &[(upstream.address, 1)])];
    config.proxy.routes =
        vec![RouteSpec { auth: Some(Box::new(AuthSpec::Jwt(jwt))), ..route_spec("jwt", &["/jwt/*"], "app") }];
    Ok(stone_proxy::build(config, shutdown).await?)
}

fn es256(jwks_file: Option<String>, jwks_url: Option<String>) -> JwtSpec {
    JwtSpec {
        algorithms: vec!["ES256".into()],
        secret: None,
        public_key_pem: None,
        jwks_file,
        jwks_url,
        issuer: None,
        audience: None,
        consumer_claim: None,
        consumers: vec![],
    }
}

/// Status of a GET of `/jwt/x` with `authorization`.
async fn status_with(client: &TestClient, proxy: &stone_proxy::RunningProxy, authorization: &str) -> u16 {
    let request = Request::get(format!("http://{}/jwt/x", proxy.listen_addr))
        .header("authorization", authorization)
        .body(Empty::<Bytes>::new())
        .unwrap();
    match client.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => 0,
    }
}

/// Waits (bounded, 20 s) until a request with `key`'s token gets `expected`.
async fn until_status(client: &TestClient, proxy: &stone_proxy::RunningProxy, key: &SigningKey, expected: u16) -> bool {
    let bearer = key.bearer();
    eventually(200, || async { status_with(client, proxy, &bearer).await == expected }).await
}

#[test]
fn base64_url_matches_rfc_4648_vectors() {
    for (input, expected) in
        [("", ""), ("f", "Zg"), ("fo", "Zm8"), ("foo", "Zm9v"), ("foob", "Zm9vYg"), ("fooba", "Zm9vYmE")]
    {
        assert_eq!(base64_url(input.as_bytes()), expected);
    }
    assert_eq!(base64_url(&[0xfb, 0xff]), "-_8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_refreshed_after_rotation_and_kept_when_it_fails() -> TestResult {
    let shutdown = Shutdown::new();
    let mut config = isolated_config();
    let (old, new) = (SigningKey::generate("old"), SigningKey::generate("new"));
    let outcome = caught(async {
        let server = JwksServer::start(jwks(&[&old]), &shutdown).await?;
        let url = format!("http://{}/.well-known/jwks.json", server.address);
        let proxy = start_proxy(&mut config, &shutdown, es256(None, Some(url))).await?;
        let client = client();

        // The first fetch happens at start, in the background.
        assert!(until_status(&client, &proxy, &old, 200).await, "the published key is accepted");
        assert_eq!(status_with(&client, &proxy, &new.bearer()).await, 401, "a key not yet published");

        // Rotation: the identity provider publishes the new key and drops the old one.
        server.serve(jwks(&[&new]));
        assert!(until_status(&client, &proxy, &new, 200).await, "the new key after a refresh");
        assert_eq!(status_with(&client, &proxy, &old.bearer()).await, 401, "the dropped key is refused");

        // The endpoint fails: refreshes fail, and the keys in force stay.
        server.status.store(503, Ordering::SeqCst);
        let fetched = server.fetches.load(Ordering::SeqCst);
        assert!(
            eventually(200, || async { server.fetches.load(Ordering::SeqCst) >= fetched + 2 }).await,
            "the refresher keeps trying"
        );
        assert_eq!(status_with(&client, &proxy, &new.bearer()).await, 200, "a failed refresh keeps the keys");
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_file_is_read_at_start_and_again_after_rotation() -> TestResult {
    let shutdown = Shutdown::new();
    let mut config = isolated_config();
    let dir = std::env::temp_dir().join(format!("stone-jwks-{}", config.namespace));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("jwks.json");
    let (old, new) = (SigningKey::generate("old"), SigningKey::generate("new"));
    std::fs::write(&file, jwks(&[&old]))?;
    let outcome = caught(async {
        let proxy = start_proxy(&mut config, &shutdown, es256(Some(file.display().to_string()), None)).await?;
        let client = client();
        // Read while the table is built: in force before the first request.
        assert_eq!(status_with(&client, &proxy, &old.bearer()).await, 200);
        assert_eq!(status_with(&client, &proxy, &new.bearer()).await, 401);

        // Rotation, written atomically (a reader never sees half a file).
        let staging = dir.join("jwks.json.new");
        std::fs::write(&staging, jwks(&[&new]))?;
        std::fs::rename(&staging, &file)?;
        assert!(until_status(&client, &proxy, &new, 200).await, "the new key after a refresh");
        assert_eq!(status_with(&client, &proxy, &old.bearer()).await, 401, "the dropped key is refused");
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    let _ = std::fs::remove_dir_all(&dir);
    rethrow(outcome)
}
