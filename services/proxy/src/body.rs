//! Body wrappers that measure a request while it streams: bytes in, bytes out, and the moment the
//! response finished, when the `request.completed` event is emitted. Nothing is buffered.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use pin_project_lite::pin_project;
use stone_events::Envelope;
use stone_events::request::{ErrorKind, RequestCompleted};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::balancer::TargetHealth;
use crate::emitter::EventSink;
use crate::routing::Route;

/// The response body type of the proxy.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Errors of a request body on its way upstream.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The request body grew past the route's limit while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

pin_project! {
    /// A request body that counts the bytes it passes on, and stops with [`BodyTooLarge`] once
    /// they exceed the limit (a chunked body has no Content-Length to check up front).
    pub struct CountingBody<B> {
        #[pin]
        inner: B,
        counter: Arc<AtomicU64>,
        limit: u64,
    }
}

impl<B> CountingBody<B> {
    pub fn new(inner: B, counter: Arc<AtomicU64>, limit: u64) -> Self {
        Self { inner, counter, limit }
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        match this.inner.poll_frame(context) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = this.counter.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                    if total > *this.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: *this.limit }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A route's request metrics, registered once when the routing table is built: a label lookup
/// (and the label strings it allocates) per request was measurable under load.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// `stone_proxy_requests_total` per status class: 1xx to 5xx, then other.
    requests: [metrics::Counter; 6],
    duration: metrics::Histogram,
}

impl RouteMetrics {
    pub fn new(route: &str) -> Self {
        let requests = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"].map(|class| {
            metrics::counter!("stone_proxy_requests_total", "route" => route.to_owned(), "status_class" => class)
        });
        Self {
            requests,
            duration: metrics::histogram!("stone_proxy_request_duration_seconds", "route" => route.to_owned()),
        }
    }

    fn record(&self, status: u16, total_us: u64) {
        let class = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => 5,
        };
        if let Some(counter) = self.requests.get(class) {
            counter.increment(1);
        }
        self.duration.record(total_us as f64 / 1e6);
    }
}

/// Everything needed to emit `request.completed` once the response is done.
pub struct Completion {
    pub sink: EventSink,
    pub event_id: Uuid,
    pub source: Arc<str>,
    pub config_seq: u64,
    pub started_at: OffsetDateTime,
    pub started: Instant,
    pub upstream_started: Option<Instant>,
    pub ttfb_us: Option<u64>,
    pub bytes_in: Arc<AtomicU64>,
    /// The target's in-flight count, released when the response ends (least-request reads it).
    pub target_health: Option<Arc<TargetHealth>>,
    /// The matched route's metric handles; `None` until a route matched.
    pub metrics: Option<Arc<RouteMetrics>>,
    /// What the event's descriptive fields are made from: they are copied into `data` only when
    /// the event is emitted, so a worker with events off copies no strings per request.
    pub facts: RequestFacts,
    /// The event's outcome fields (status, cache, consumer, error…); the descriptive ones stay
    /// empty until [`Self::finish`].
    pub data: RequestCompleted,
}

/// The request as the event describes it, kept in the shapes the request path already has.
pub struct RequestFacts {
    pub method: http::Method,
    pub host: String,
    pub uri: http::Uri,
    pub version: http::Version,
    pub client: std::net::IpAddr,
    /// The matched route and path template.
    pub route: Option<(Arc<Route>, Arc<str>)>,
}

impl RequestFacts {
    fn describe(self, data: &mut RequestCompleted) {
        data.method = self.method.as_str().to_owned();
        data.path = self.uri.path().to_owned();
        data.host = self.host;
        data.protocol = crate::service::protocol_name(self.version).to_owned();
        data.client_ip = Some(crate::service::format_ip(self.client));
        match self.route {
            Some((route, template)) => {
                data.route = route.name.clone();
                data.upstream = Some(route.upstream.name.clone());
                data.path_template = template.to_string();
            }
            None => data.route = stone_events::subjects::NONE_TOKEN.to_owned(),
        }
    }
}

impl Completion {
    /// Emits the event. `error` overrides the recorded one when the body broke mid-stream.
    pub fn finish(mut self, bytes_out: u64, error: Option<ErrorKind>) {
        if let Some(health) = self.target_health.take() {
            health.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let total_us = micros(self.started.elapsed());
        self.data.total_us = total_us;
        self.data.upstream_us = self.upstream_started.map(|at| micros(at.elapsed()));
        self.data.ttfb_us = self.ttfb_us;
        self.data.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        self.data.bytes_out = bytes_out;
        if error.is_some() {
            self.data.error = error;
        }
        match &self.metrics {
            Some(metrics) => metrics.record(self.data.status, total_us),
            None => {
                // No route matched.
                let route = stone_events::subjects::NONE_TOKEN;
                metrics::counter!(
                    "stone_proxy_requests_total",
                    "route" => route,
                    "status_class" => stone_events::subjects::status_class(self.data.status)
                )
                .increment(1);
                metrics::histogram!("stone_proxy_request_duration_seconds", "route" => route)
                    .record(total_us as f64 / 1e6);
            }
        }
        if !self.sink.enabled() {
            return;
        }
        self.facts.describe(&mut self.data);
        let envelope =
            Envelope::with_id(self.event_id, self.started_at, self.source.as_ref(), self.config_seq, self.data);
        self.sink.emit(&envelope);
    }
}

pub fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

pin_project! {
    /// A response body that emits `request.completed` when it ends, fails, or is dropped early
    /// (the client went away).
    pub struct MeteredBody {
        #[pin]
        inner: ProxyBody,
        completion: Option<Completion>,
        bytes_out: u64,
    }

    impl PinnedDrop for MeteredBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(completion) = this.completion.take() {
                // hyper never polls a body that reports its end up front (empty bodies, HEAD);
                // only a body dropped before its end means the client went away.
                let ended = this.inner.is_end_stream();
                completion.finish(*this.bytes_out, if ended { None } else { Some(ErrorKind::ClientAbort) });
            }
        }
    }
}

impl MeteredBody {
    pub fn new(inner: ProxyBody, completion: Completion) -> Self {
        Self { inner, completion: Some(completion), bytes_out: 0 }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(context);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(completion) = this.completion.take() {
                    completion.finish(*this.bytes_out, Some(ErrorKind::UpstreamReset));
                }
            }
            Poll::Ready(None) => {
                if let Some(completion) = this.completion.take() {
                    completion.finish(*this.bytes_out, None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
