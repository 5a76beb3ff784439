//! The body of a cacheable miss: streams the upstream's response to the client and keeps a copy;
//! when the body ends within the route's size limit the copy is stored, and only then are the
//! coalesced followers released. A body that grows past the limit, fails, or is abandoned by the
//! client is simply not stored.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use stone_events::cache::{CacheAction, CacheTier};

use super::Cache;
use super::coalesce::LeaderGuard;
use super::policy::StoreDecision;
use crate::body::ProxyBody;

/// What is needed to store the response once its body is complete.
pub struct PendingStore {
    pub cache: Cache,
    pub route: String,
    pub primary: String,
    pub secondary: Option<(Vec<String>, String)>,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub decision: StoreDecision,
    pub age_header: u64,
    pub date: Option<u64>,
    pub request_time: u64,
    pub response_time: u64,
    /// Released after the store, so followers find the object.
    pub guard: Option<LeaderGuard>,
}

impl PendingStore {
    fn store(self, body: Bytes) {
        tokio::spawn(async move {
            let object = super::build_object(
                self.status,
                self.headers,
                body,
                self.decision,
                self.age_header,
                self.date,
                self.request_time,
                self.response_time,
            );
            let bytes = object.body.len() as u64;
            let lifetime = object.freshness.lifetime_s;
            let tags = object.tags.clone();
            let tier = if self.cache.has_redis() { CacheTier::Redis } else { CacheTier::Memory };
            self.cache.insert(&self.primary, self.secondary, Arc::new(object), self.response_time).await;
            metrics::counter!("stone_cache_stored_bytes_total", "route" => self.route.clone()).increment(bytes);
            self.cache.emit(CacheAction::Stored, &self.route, &self.primary, Some(tier), bytes, Some(lifetime), tags);
            drop(self.guard);
        });
    }
}

pin_project! {
    pub struct StoreBody {
        #[pin]
        inner: ProxyBody,
        copy: BytesMut,
        limit: u64,
        pending: Option<PendingStore>,
    }
}

impl StoreBody {
    pub fn new(inner: ProxyBody, limit: u64, pending: PendingStore) -> Self {
        if inner.is_end_stream() {
            // hyper never polls a body that is empty up front, so store it now.
            pending.store(Bytes::new());
            return Self { inner, copy: BytesMut::new(), limit, pending: None };
        }
        let hint = usize::try_from(inner.size_hint().exact().unwrap_or(0).min(limit)).unwrap_or(0);
        Self { inner, copy: BytesMut::with_capacity(hint), limit, pending: Some(pending) }
    }
}

impl Body for StoreBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(context);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && this.pending.is_some()
                {
                    if (this.copy.len() + data.len()) as u64 > *this.limit {
                        // Too large to keep: stream the rest without copying.
                        metrics::counter!("stone_cache_oversize_objects_total").increment(1);
                        *this.pending = None;
                        *this.copy = BytesMut::new();
                    } else {
                        this.copy.extend_from_slice(data);
                    }
                }
                // hyper stops polling once a body with a known length says it has ended, so the
                // end may never be seen as `Ready(None)`.
                if inner.is_end_stream()
                    && let Some(pending) = this.pending.take()
                {
                    pending.store(std::mem::take(this.copy).freeze());
                }
            }
            Poll::Ready(None) => {
                if let Some(pending) = this.pending.take() {
                    pending.store(std::mem::take(this.copy).freeze());
                }
            }
            Poll::Ready(Some(Err(_))) => *this.pending = None,
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
