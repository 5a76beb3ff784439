//! The TLS listener through real sockets: a self-signed certificate made by the test, a rustls
//! client offering `h2` or `http/1.1` in ALPN, the protocol the proxy serves and the upstream's
//! `X-Forwarded-Proto`, the plain listener beside it, and `request.completed` for each request.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod proxy_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_support::*;
use stone_events::Event;
use stone_kit::testing::{caught, rethrow};
use stone_kit::{Shutdown, StoneConfig};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// An upstream that answers with the `X-Forwarded-Proto` and `Via` it received and the HTTP
/// version it was spoken to in.
async fn echo_upstream(shutdown: &Shutdown) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let token = shutdown.token();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = token.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            tokio::spawn(async move {
                let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let header =
                        |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let echo = serde_json::json!({
                        "x-forwarded-proto": header("x-forwarded-proto"),
                        "via": header("via"),
                        "version": format!("{:?}", request.version()),
                    });
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(echo.to_string()))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(address)
}

/// A self-signed certificate for `localhost`, written as PEM files; returns (cert, key, DER).
fn self_signed(dir: &std::path::Path) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    std::fs::create_dir_all(dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    (cert_path, key_path, cert.der().clone())
}

/// A TLS connection to the proxy offering `alpn`; returns the stream and the protocol chosen.
async fn connect(
    address: SocketAddr,
    trusted: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Option<Vec<u8>>), BoxError> {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.clone())?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(address).await?;
    let stream = TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost")?, tcp).await?;
    let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    Ok((stream, negotiated))
}

/// GET `path` over `stream` in HTTP/2 or HTTP/1.1; returns the response version and the echo.
async fn get_over(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    h2: bool,
    path: &str,
) -> Result<(Version, serde_json::Value), BoxError> {
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(connection);
        sender.send_request(Request::get(format!("https://localhost{path}")).body(Empty::<Bytes>::new())?).await?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(connection);
        sender.send_request(Request::get(path).header("host", "localhost").body(Empty::<Bytes>::new())?).await?
    };
    assert_eq!(response.status(), 200, "{path}");
    let version = response.version();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((version, serde_json::from_slice(&body)?))
}

/// A proxy routing everything to an echo upstream, with TLS from the given files; returns it and
/// its TLS listener's address.
async fn start_tls_proxy(
    config: &mut StoneConfig,
    shutdown: &Shutdown,
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<(stone_proxy::RunningProxy, SocketAddr), BoxError> {
    let upstream = echo_upstream(shutdown).await?;
    config.proxy.upstreams = vec![upstream_spec("app", &[(upstream, 1)])];
    config.proxy.routes = vec![route_spec("app", &["/*"], "app")];
    config.proxy.tls.cert_path = cert_path.to_path_buf();
    config.proxy.tls.key_path = key_path.to_path_buf();
    let proxy = stone_proxy::build(config, shutdown).await?;
    let tls_addr = proxy.tls_addr.expect("the TLS listener runs when a certificate is configured");
    Ok((proxy, tls_addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_h2_and_http11_by_alpn_with_forwarded_proto_https() -> TestResult {
    let shutdown = Shutdown::new();
    let mut config = isolated_config();
    let certificates = std::env::temp_dir().join(format!("stone-tls-{}", config.namespace));
    let (cert_path, key_path, trusted) = self_signed(&certificates);
    let outcome = caught(async {
        let (proxy, tls_addr) = start_tls_proxy(&mut config, &shutdown, &cert_path, &key_path).await?;
        assert_ne!(tls_addr, proxy.listen_addr);

        // ALPN offers h2 first: the proxy picks it and speaks HTTP/2.
        let (stream, negotiated) = connect(tls_addr, &trusted, &[b"h2", b"http/1.1"]).await?;
        assert_eq!(negotiated.as_deref(), Some(&b"h2"[..]));
        let (version, echo) = get_over(stream, true, "/tls/h2").await?;
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(echo["x-forwarded-proto"], "https", "{echo}");
        assert_eq!(echo["version"], "HTTP/1.1", "the upstream side is HTTP/1.1 whatever the client spoke: {echo}");

        // A client that offers only http/1.1 gets HTTP/1.1.
        let (stream, negotiated) = connect(tls_addr, &trusted, &[b"http/1.1"]).await?;
        assert_eq!(negotiated.as_deref(), Some(&b"http/1.1"[..]));
        let (version, echo) = get_over(stream, false, "/tls/h1").await?;
        assert_eq!(version, Version::HTTP_11);
        assert_eq!(echo["x-forwarded-proto"], "https", "{echo}");

        // The plain listener keeps working beside it, and says http.
        let plain =
            client().request(Request::get(format!("http://{}/plain", proxy.listen_addr)).body(Empty::new())?).await?;
        let echo: serde_json::Value = serde_json::from_slice(&plain.into_body().collect().await?.to_bytes())?;
        assert_eq!(echo["x-forwarded-proto"], "http", "{echo}");

        // The proxy presents the configured certificate: a client trusting only another one refuses it.
        let (_, _, stranger) = self_signed(&certificates.join("other"));
        assert!(connect(tls_addr, &stranger, &[b"h2"]).await.is_err(), "an unknown certificate must not verify");

        // Each request is one request.completed with the protocol the client spoke.
        let js = jetstream(&config).await?;
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen = read_events(&js, &config, "request.>")
                .await?
                .into_iter()
                .filter_map(|event| match event {
                    Event::RequestCompleted(envelope) => {
                        Some((envelope.data.path, envelope.data.protocol, envelope.data.status))
                    }
                    _ => None,
                })
                .collect();
            if seen.len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The route's metric handles count them (this test is its own process under nextest).
        let metrics =
            client().request(Request::get(format!("http://{}/metrics", proxy.admin_addr)).body(Empty::new())?).await?;
        let metrics = String::from_utf8(metrics.into_body().collect().await?.to_bytes().to_vec())?;
        assert!(metrics.contains("stone_proxy_requests_total{route=\"app\",status_class=\"2xx\"} 3"), "{metrics}");
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("/plain".to_owned(), "HTTP/1.1".to_owned(), 200),
                ("/tls/h1".to_owned(), "HTTP/1.1".to_owned(), 200),
                ("/tls/h2".to_owned(), "HTTP/2".to_owned(), 200),
            ]
        );
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    let _ = std::fs::remove_dir_all(&certificates);
    rethrow(outcome)
}

/// Replaces `target` with `source` in one rename, as a renewal tool would.
fn replace_file(source: &std::path::Path, target: &std::path::Path) {
    let staging = target.with_extension("new");
    std::fs::copy(source, &staging).unwrap();
    std::fs::rename(&staging, target).unwrap();
}

async fn metrics_text(proxy: &stone_proxy::RunningProxy) -> String {
    let Ok(request) = Request::get(format!("http://{}/metrics", proxy.admin_addr)).body(Empty::new()) else {
        return String::new();
    };
    match client().request(request).await {
        Ok(response) => response
            .into_body()
            .collect()
            .await
            .map(|body| String::from_utf8_lossy(&body.to_bytes()).into_owned())
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() -> TestResult {
    let shutdown = Shutdown::new();
    let mut config = isolated_config();
    let certificates = std::env::temp_dir().join(format!("stone-tls-{}", config.namespace));
    let (cert_path, key_path, first) = self_signed(&certificates);
    let outcome = caught(async {
        let (proxy, tls_addr) = start_tls_proxy(&mut config, &shutdown, &cert_path, &key_path).await?;
        assert!(connect(tls_addr, &first, &[b"h2"]).await.is_ok());

        // Renewal: a new key and certificate replace the files (key first, as certbot's deploy
        // hooks usually copy them).
        let (renewed_cert, renewed_key, renewed) = self_signed(&certificates.join("renewed"));
        replace_file(&renewed_key, &key_path);
        replace_file(&renewed_cert, &cert_path);
        let served = eventually(200, || async { connect(tls_addr, &renewed, &[b"h2"]).await.is_ok() }).await;
        assert!(served, "the renewed certificate is served after the next check");
        assert!(connect(tls_addr, &first, &[b"h2"]).await.is_err(), "the old certificate is no longer served");
        let (stream, _) = connect(tls_addr, &renewed, &[b"h2"]).await?;
        assert_eq!(get_over(stream, true, "/after-renewal").await?.1["x-forwarded-proto"], "https");

        // A broken write is refused and counted; the renewed certificate stays in force.
        std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\ntruncated\n")?;
        let refused = eventually(200, || async {
            metrics_text(&proxy).await.contains("stone_proxy_tls_reloads_total{outcome=\"failed\"}")
        })
        .await;
        assert!(refused, "{}", metrics_text(&proxy).await);
        assert!(connect(tls_addr, &renewed, &[b"h2"]).await.is_ok(), "the certificate in force stays");
        Ok(())
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    let _ = std::fs::remove_dir_all(&certificates);
    rethrow(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_certificate_stops_the_worker_naming_the_key() -> TestResult {
    let shutdown = Shutdown::new();
    let mut config = isolated_config();
    config.proxy.tls.cert_path = "/nonexistent/stone/cert.pem".into();
    config.proxy.tls.key_path = "/nonexistent/stone/key.pem".into();
    let outcome = stone_proxy::build(&config, &shutdown).await;
    let message = outcome.as_ref().err().map(|error| format!("{error:#}")).unwrap_or_default();
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    assert!(outcome.is_err(), "a worker must not start without its certificate");
    assert!(message.contains("proxy.tls.cert_path") && message.contains("/nonexistent/stone/cert.pem"), "{message}");
    Ok(())
}
