//! HTTP correctness through real sockets: limits (413, 431), request smuggling rejected, upstream
//! timeouts (504) and connect errors (502), forwarding headers, WebSocket upgrades passed through,
//! and HTTP/2 over cleartext (h2c).

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod proxy_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_support::*;
use stone_kit::testing::{caught, rethrow};
use stone_kit::{Shutdown, StoneConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream with a slow path, an upgrade path that echoes bytes, and a header echo.
async fn start_upstream(shutdown: &Shutdown) -> std::io::Result<SocketAddr> {
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
                let service = service_fn(|mut request: Request<hyper::body::Incoming>| async move {
                    let response = match request.uri().path() {
                        "/slow" => {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            Response::new(Full::new(Bytes::from_static(b"late")))
                        }
                        "/ws" => {
                            let upgrade = hyper::upgrade::on(&mut request);
                            tokio::spawn(async move {
                                if let Ok(upgraded) = upgrade.await {
                                    let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                                }
                            });
                            Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .body(Full::new(Bytes::new()))
                                .unwrap()
                        }
                        _ => {
                            let headers = request.headers();
                            let echo = serde_json::json!({
                                "x-forwarded-for": headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()),
                                "x-forwarded-host": headers.get("x-forwarded-host").and_then(|v| v.to_str().ok()),
                                "x-request-id": headers.get("x-request-id").and_then(|v| v.to_str().ok()),
                                "via": headers.get("via").and_then(|v| v.to_str().ok()),
                                "connection": headers.get("connection").and_then(|v| v.to_str().ok()),
                            });
                            let body = request.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                            let mut response = Response::new(Full::new(Bytes::from(echo.to_string())));
                            response.headers_mut().insert("x-body-bytes", body.into());
                            response
                        }
                    };
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(address)
}

async fn with_proxy<F, Fut>(body: F) -> TestResult
where
    F: FnOnce(StoneConfig, stone_proxy::RunningProxy) -> Fut,
    Fut: std::future::Future<Output = TestResult>,
{
    let shutdown = Shutdown::new();
    let upstream = start_upstream(&shutdown).await?;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let mut config = isolated_config();
    config.proxy.upstreams = vec![upstream_spec("app", &[(upstream, 1)]), upstream_spec("gone", &[(dead, 1)])];
    let mut app = route_spec("app", &["/*"], "app");
    app.timeout_ms = Some(300);
    app.max_body_bytes = Some(1000);
    config.proxy.routes = vec![app, route_spec("gone", &["/gone/*"], "gone")];
    // Caught, so that a failed assertion still drains the proxy and removes the test's streams.
    let outcome = caught(async {
        let proxy = stone_proxy::build(&config, &shutdown).await?;
        body(config.clone(), proxy).await
    })
    .await;
    let _ = shutdown.drain(Duration::from_secs(10)).await;
    cleanup(&config).await;
    rethrow(outcome)
}

/// Sends raw bytes and returns what came back until the server closed or went quiet.
async fn raw(address: SocketAddr, request: &[u8]) -> Result<String, BoxError> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(request).await?;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(Ok(read)) = tokio::time::timeout(Duration::from_millis(1500), stream.read(&mut buffer)).await {
        if read == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..read]);
    }
    Ok(String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_smuggling_and_upstream_failures_get_the_right_status() -> TestResult {
    with_proxy(|_config, proxy| async move {
        let address = proxy.listen_addr;
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let post = |size: usize| {
            Request::post(format!("http://{address}/upload")).body(Full::new(Bytes::from(vec![b'a'; size]))).unwrap()
        };
        let accepted = client.request(post(1000)).await?;
        assert_eq!(accepted.status(), 200);
        assert_eq!(accepted.headers()["x-body-bytes"], "1000");
        assert_eq!(client.request(post(1001)).await?.status(), 413, "Content-Length over the route's limit");

        let chunked = raw(
            address,
            format!(
                "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n{}\r\n3e8\r\n{}\r\n0\r\n\r\n",
                "b".repeat(1000),
                "b".repeat(1000)
            )
            .as_bytes(),
        )
        .await?;
        assert!(chunked.starts_with("HTTP/1.1 413"), "a chunked body over the limit: {chunked}");

        // Conflicting framing: the Content-Length is discarded, chunked wins, and the connection
        // closes after the response, so a request hidden in the body is never read.
        let smuggled = raw(
            address,
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await?;
        assert_eq!(smuggled.matches("HTTP/1.1 ").count(), 1, "one request answered: {smuggled}");
        assert!(smuggled.to_ascii_lowercase().contains("x-body-bytes: 0"), "{smuggled}");
        for (case, request) in [
            ("non-chunked transfer coding", "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
            ("differing lengths", "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
            ("HTTP/1.0 with chunked", "POST /upload HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ] {
            let answer = raw(address, request.as_bytes()).await?;
            assert!(answer.starts_with("HTTP/1.1 400"), "{case}: {answer}");
        }

        let huge_header = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "h".repeat(100 * 1024));
        let too_large = raw(address, huge_header.as_bytes()).await?;
        assert!(too_large.starts_with("HTTP/1.1 431"), "oversized head: {}", &too_large[..too_large.len().min(200)]);

        let plain: Client<_, Empty<Bytes>> = client_plain();
        let slow = plain.request(Request::get(format!("http://{address}/slow")).body(Empty::new())?).await?;
        assert_eq!(slow.status(), 504, "route timeout");
        let gone = plain.request(Request::get(format!("http://{address}/gone/x")).body(Empty::new())?).await?;
        assert_eq!(gone.status(), 502, "connect refused");
        Ok(())
    })
    .await
}

/// Reads until the server closes the connection; `None` if it is still open after a minute.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&received).into_owned()),
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
            Err(_) => return None,
        }
    }
}

/// Slowloris: a client that never finishes its request head is disconnected by the header-read
/// timeout, on a new connection and on a kept-alive one after a full exchange (the timeout is
/// armed for every head a connection waits for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_head_is_disconnected() -> TestResult {
    with_proxy(|_config, proxy| async move {
        let address = proxy.listen_addr;
        let fresh = async {
            let mut stream = tokio::net::TcpStream::connect(address).await?;
            stream.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Slow: ").await?;
            Ok::<_, BoxError>(until_closed(&mut stream).await)
        };
        let kept_alive = async {
            let mut stream = tokio::net::TcpStream::connect(address).await?;
            stream.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n").await?;
            let mut first = [0u8; 4096];
            let read = stream.read(&mut first).await?;
            let first = String::from_utf8_lossy(&first[..read]).into_owned();
            stream.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n").await?;
            Ok::<_, BoxError>((first, until_closed(&mut stream).await))
        };
        let (fresh, kept_alive) = tokio::join!(fresh, kept_alive);
        let fresh = fresh?.expect("a connection that never finished its head stayed open for a minute");
        assert!(!fresh.contains("HTTP/1.1 "), "no answer to an unfinished head: {fresh}");
        let (first, rest) = kept_alive?;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let rest = rest.expect("a kept-alive connection that never finished its second head stayed open");
        assert!(!rest.contains("HTTP/1.1 "), "no answer to the unfinished second head: {rest}");
        Ok(())
    })
    .await
}

fn client_plain() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_websockets_and_h2c() -> TestResult {
    with_proxy(|_config, proxy| async move {
        let address = proxy.listen_addr;
        let response = client_plain()
            .request(
                Request::get(format!("http://{address}/echo"))
                    .header("x-forwarded-for", "10.1.1.1")
                    .header("connection", "x-secret")
                    .header("x-secret", "hop")
                    .body(Empty::new())?,
            )
            .await?;
        let request_id = response.headers()["x-request-id"].to_str()?.to_owned();
        let echo: serde_json::Value = serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
        assert_eq!(echo["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(echo["x-request-id"], request_id.as_str(), "the generated id goes upstream and back");
        assert_eq!(echo["via"], "1.1 proxy-stone");
        assert!(echo["connection"].is_null() || echo["connection"] != "x-secret", "hop-by-hop removed: {echo}");

        // WebSocket: the upgrade passes through and bytes flow both ways.
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            .await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        stream.write_all(b"ping-through-proxy").await?;
        let mut echoed = [0u8; 18];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed)).await??;
        assert_eq!(&echoed, b"ping-through-proxy");

        // h2c with prior knowledge.
        let h2: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
        let response = h2.request(Request::get(format!("http://{address}/echo")).body(Empty::new())?).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        Ok(())
    })
    .await
}
