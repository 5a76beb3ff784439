//! The demo for `stone dev`: an upstream with a few realistic endpoints and a light traffic
//! generator, so a new user sees analytics within a minute.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use stone_kit::Shutdown;

/// Answers like a small API: `/api/users/{id}`, `/api/orders`, `/api/slow`, `/api/flaky`,
/// `/healthz`. Deterministic (no randomness) so the demo numbers are explainable.
async fn demo_response(request: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let (status, body) = if path == "/healthz" {
        (StatusCode::OK, "ok".to_owned())
    } else if let Some(id) = path.strip_prefix("/api/users/") {
        (StatusCode::OK, format!("{{\"id\":\"{id}\",\"name\":\"user {id}\"}}"))
    } else if path == "/api/orders" {
        (StatusCode::OK, "[{\"id\":1,\"total\":42.5},{\"id\":2,\"total\":7.0}]".to_owned())
    } else if path == "/api/slow" {
        tokio::time::sleep(Duration::from_millis(120)).await;
        (StatusCode::OK, "{\"slow\":true}".to_owned())
    } else if path == "/api/flaky" {
        // Every third call fails, by the sub-second clock: a steady, visible error rate.
        let failing = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_millis() % 3 == 0)
            .unwrap_or(false);
        if failing {
            (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"try again\"}".to_owned())
        } else {
            (StatusCode::OK, "{\"flaky\":\"fine\"}".to_owned())
        }
    } else {
        (StatusCode::NOT_FOUND, "{\"error\":\"not found\"}".to_owned())
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Serves the demo upstream until shutdown.
pub async fn serve_upstream(listener: tokio::net::TcpListener, shutdown: Shutdown) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.triggered() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let connection = builder.serve_connection(TokioIo::new(stream), service_fn(demo_response)).into_owned();
        let token = shutdown.token();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = token.cancelled() => {}
            }
        });
    }
}

/// Sends a mix of requests through the proxy, about `per_second` a second, until shutdown.
pub async fn generate_traffic(proxy: SocketAddr, per_second: u32, shutdown: Shutdown) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let paths = ["/api/users/1", "/api/users/2", "/api/orders", "/api/users/3", "/api/flaky", "/api/slow", "/nowhere"];
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_second.max(1))));
    let mut index = 0usize;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.triggered() => return,
        }
        let path = paths[index % paths.len()];
        index += 1;
        let host = if path == "/nowhere" { "unknown.example" } else { "demo.local" };
        let Ok(request) = Request::get(format!("http://{proxy}{path}")).header("host", host).body(Empty::new()) else {
            continue;
        };
        let client = client.clone();
        tokio::spawn(async move {
            if let Ok(response) = client.request(request).await {
                let _ = response.into_body().collect().await;
            }
        });
    }
}
