//! `stone bench hyper-baseline` (hidden; started by `stone bench proxy` and `stone bench cache`):
//! the least any proxy built on this HTTP stack can do, as a reference row beside nginx.
//!
//! `static` answers every request with a stored 1 KiB body and the headers a cache hit carries
//! (what an in-process cache hit cannot do with less: parse, one lookup-free response, write);
//! `forward` passes every request to the upstream through the same hyper server and hyper-util
//! pooled client the proxy uses, with nothing else (no routing, events, metrics or header
//! rewriting). Same runtime as `stone proxy` (tokio multi-thread, one worker per CPU), same
//! allocator, same server builder. The gap between a baseline and nginx is the stack's; the gap
//! between the proxy and its baseline is ours.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::http::header::{self, HeaderValue};
use hyper::http::{Request, Response, StatusCode, Uri, Version};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// A stored 1 KiB response for every request.
    Static,
    /// Every request forwarded to `--upstream`.
    Forward,
}

#[derive(Debug, Args)]
pub struct BaselineArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    listen: SocketAddr,
    /// The upstream of `forward`.
    #[arg(long)]
    upstream: Option<SocketAddr>,
    /// One single-threaded runtime per CPU, each with its own `SO_REUSEPORT` listener (the
    /// kernel spreads connections), instead of one work-stealing runtime.
    #[arg(long)]
    per_core: bool,
}

type Body = BoxBody<Bytes, hyper::Error>;

pub fn run(runtime: &tokio::runtime::Runtime, args: BaselineArgs) -> anyhow::Result<()> {
    if !args.per_core {
        let listener = runtime.block_on(async { reuse_port_listener(args.listen) })?;
        return runtime.block_on(serve(listener, args.mode, args.upstream));
    }
    let threads = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (listen, mode, upstream) = (args.listen, args.mode, args.upstream);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let listener = runtime.block_on(async { reuse_port_listener(listen) })?;
                runtime.block_on(serve(listener, mode, upstream))
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| anyhow::anyhow!("a baseline thread panicked"))??;
    }
    Ok(())
}

fn reuse_port_listener(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    Ok(socket.listen(4096)?)
}

async fn serve(listener: tokio::net::TcpListener, mode: Mode, upstream: Option<SocketAddr>) -> anyhow::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector);
    let upstream = match (mode, upstream) {
        (Mode::Forward, None) => anyhow::bail!("--mode forward needs --upstream"),
        (_, upstream) => upstream.map(|address| address.to_string()),
    };
    let stored = Bytes::from(vec![b'x'; 1024]);
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, upstream, stored) = (client.clone(), upstream.clone(), stored.clone());
        let handler = service_fn(move |request: Request<Incoming>| {
            let (client, upstream, stored) = (client.clone(), upstream.clone(), stored.clone());
            async move {
                let response: Response<Body> = match (mode, upstream) {
                    (Mode::Forward, Some(authority)) => forward(&client, &authority, request).await,
                    _ => {
                        let mut response = Response::new(Full::new(stored).map_err(|never| match never {}).boxed());
                        let headers = response.headers_mut();
                        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
                        headers.insert(header::AGE, HeaderValue::from_static("1"));
                        response
                    }
                };
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), handler).into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Empty<Bytes>>,
    authority: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, _) = request.into_parts();
    let path = parts.uri.path_and_query().map(|path| path.as_str()).unwrap_or("/");
    let Ok(uri) = Uri::builder().scheme("http").authority(authority).path_and_query(path).build() else {
        return bad_gateway();
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    match client.request(Request::from_parts(parts, Empty::new())).await {
        Ok(response) => response.map(BodyExt::boxed),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    response
}
