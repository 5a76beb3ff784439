//! The two storage tiers and the entry format they share.
//!
//! The memory tier is a quick_cache cache bounded by bytes; it admits by S3-FIFO, so one-hit
//! wonders do not push out popular objects. The Redis tier is shared by every worker: objects live under
//! `{prefix}:o:{key}` with an expiry, a sorted set `{prefix}:keys` (all scores 0, so `ZRANGEBYLEX`
//! finds a prefix) indexes keys for purge by prefix, with `{prefix}:expiry` (scored by expiry)
//! to sweep it, and a set `{prefix}:tag:{tag}` per tag. The
//! indexes may name keys that have since expired; purges delete those harmlessly.
//!
//! Entries are encoded by hand (a version byte, fixed-width numbers, length-prefixed strings and
//! the raw body) rather than with a general serializer: it is a few dozen lines, has no schema to
//! drift, and decodes without copying the body.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use super::key;
use super::policy::EntryFreshness;

const FORMAT_VERSION: u8 = 1;
const KIND_OBJECT: u8 = 0;
const KIND_VARIANTS: u8 = 1;
/// One write in this many sweeps the index of expired keys.
const SWEEP_EVERY: u64 = 256;
/// How long a Vary marker lives; it is rewritten with every store of a variant.
const VARIANTS_KEEP_S: u64 = 86_400;

/// Headers every answer from a stored object adds (`Age`, `Cache-Status`, `Via`,
/// `X-Request-Id`). A stored map is sized for them: a hit clones the map, and a clone keeps the
/// hash table's size, so adding them does not rehash every header on every hit.
pub const SERVED_EXTRA_HEADERS: usize = 4;

/// One stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub freshness: EntryFreshness,
    /// Unix seconds until which the entry is kept (fresh, stale windows, revalidation).
    pub keep_until: u64,
    pub tags: Vec<String>,
}

impl StoredObject {
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(http::header::ETAG) || self.headers.contains_key(http::header::LAST_MODIFIED)
    }

    fn weight(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum();
        self.body.len() + headers + 128
    }
}

/// What a primary key holds: the object, or for responses with Vary the header names and a
/// generation that variant keys carry (a re-created marker orphans old variants, so an
/// invalidated variant never comes back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Object(Arc<StoredObject>),
    Variants { names: Vec<String>, generation: u64, keep_until: u64 },
}

impl Slot {
    fn keep_until(&self) -> u64 {
        match self {
            Self::Object(object) => object.keep_until,
            Self::Variants { keep_until, .. } => *keep_until,
        }
    }

    fn weight(&self) -> u32 {
        let weight = match self {
            Self::Object(object) => object.weight(),
            Self::Variants { names, .. } => names.iter().map(String::len).sum::<usize>() + 64,
        };
        u32::try_from(weight).unwrap_or(u32::MAX)
    }

    pub fn variants(names: Vec<String>, now: u64) -> Self {
        Self::Variants { names, generation: rand::random(), keep_until: now + VARIANTS_KEEP_S }
    }
}

/// Errors of the entry codec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("entry is truncated")]
    Truncated,
    #[error("unknown entry format {0}")]
    UnknownFormat(u8),
    #[error("entry holds an invalid {0}")]
    Invalid(&'static str),
}

pub fn encode(slot: &Slot) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(FORMAT_VERSION);
    match slot {
        Slot::Object(object) => {
            out.reserve(object.weight() + 64);
            out.put_u8(KIND_OBJECT);
            out.put_u16(object.status.as_u16());
            let freshness = &object.freshness;
            for number in [
                freshness.corrected_initial_age,
                freshness.response_time,
                freshness.lifetime_s,
                freshness.stale_while_revalidate_s,
                freshness.stale_if_error_s,
                object.keep_until,
            ] {
                out.put_u64(number);
            }
            out.put_u8(u8::from(freshness.must_revalidate) | (u8::from(freshness.no_cache) << 1));
            put_len(&mut out, object.tags.len());
            for tag in &object.tags {
                put_bytes(&mut out, tag.as_bytes());
            }
            put_len(&mut out, object.headers.len());
            for (name, value) in &object.headers {
                put_bytes(&mut out, name.as_str().as_bytes());
                put_bytes(&mut out, value.as_bytes());
            }
            put_bytes(&mut out, &object.body);
        }
        Slot::Variants { names, generation, keep_until } => {
            out.put_u8(KIND_VARIANTS);
            out.put_u64(*generation);
            out.put_u64(*keep_until);
            put_len(&mut out, names.len());
            for name in names {
                put_bytes(&mut out, name.as_bytes());
            }
        }
    }
    out.freeze()
}

pub fn decode(mut input: Bytes) -> Result<Slot, DecodeError> {
    let version = get_u8(&mut input)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownFormat(version));
    }
    match get_u8(&mut input)? {
        KIND_OBJECT => {
            need(&input, 2 + 6 * 8 + 1)?;
            let status = StatusCode::from_u16(input.get_u16()).map_err(|_| DecodeError::Invalid("status"))?;
            let mut numbers = [0u64; 6];
            for number in &mut numbers {
                *number = input.get_u64();
            }
            let flags = input.get_u8();
            let [
                corrected_initial_age,
                response_time,
                lifetime_s,
                stale_while_revalidate_s,
                stale_if_error_s,
                keep_until,
            ] = numbers;
            let tag_count = get_len(&mut input)?;
            let mut tags = Vec::with_capacity(tag_count.min(64));
            for _ in 0..tag_count {
                tags.push(get_string(&mut input)?);
            }
            let header_count = get_len(&mut input)?;
            let mut headers = HeaderMap::with_capacity(header_count.min(64) + SERVED_EXTRA_HEADERS);
            for _ in 0..header_count {
                let name =
                    HeaderName::from_bytes(&get_bytes(&mut input)?).map_err(|_| DecodeError::Invalid("header name"))?;
                let value = HeaderValue::from_maybe_shared(get_bytes(&mut input)?)
                    .map_err(|_| DecodeError::Invalid("header value"))?;
                headers.append(name, value);
            }
            let body = get_bytes(&mut input)?;
            Ok(Slot::Object(Arc::new(StoredObject {
                status,
                headers,
                body,
                freshness: EntryFreshness {
                    corrected_initial_age,
                    response_time,
                    lifetime_s,
                    stale_while_revalidate_s,
                    stale_if_error_s,
                    must_revalidate: flags & 1 != 0,
                    no_cache: flags & 2 != 0,
                },
                keep_until,
                tags,
            })))
        }
        KIND_VARIANTS => {
            need(&input, 16)?;
            let generation = input.get_u64();
            let keep_until = input.get_u64();
            let count = get_len(&mut input)?;
            let mut names = Vec::with_capacity(count.min(16));
            for _ in 0..count {
                names.push(get_string(&mut input)?);
            }
            Ok(Slot::Variants { names, generation, keep_until })
        }
        other => Err(DecodeError::UnknownFormat(other)),
    }
}

fn put_len(out: &mut BytesMut, length: usize) {
    out.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.put_slice(bytes);
}

fn need(input: &Bytes, length: usize) -> Result<(), DecodeError> {
    if input.remaining() < length { Err(DecodeError::Truncated) } else { Ok(()) }
}

fn get_u8(input: &mut Bytes) -> Result<u8, DecodeError> {
    need(input, 1)?;
    Ok(input.get_u8())
}

fn get_len(input: &mut Bytes) -> Result<usize, DecodeError> {
    need(input, 4)?;
    Ok(input.get_u32() as usize)
}

fn get_bytes(input: &mut Bytes) -> Result<Bytes, DecodeError> {
    let length = get_len(input)?;
    need(input, length)?;
    Ok(input.split_to(length))
}

fn get_string(input: &mut Bytes) -> Result<String, DecodeError> {
    String::from_utf8(get_bytes(input)?.to_vec()).map_err(|_| DecodeError::Invalid("string"))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

/// Evictions of the memory tier since the last report, by reason: objects and bytes.
#[derive(Debug, Default)]
pub struct EvictionTally {
    size: (AtomicU64, AtomicU64),
    expired: (AtomicU64, AtomicU64),
}

impl EvictionTally {
    fn record(&self, reason: &(AtomicU64, AtomicU64), bytes: u64) {
        reason.0.fetch_add(1, Ordering::Relaxed);
        reason.1.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The counts since the last call, which start again from zero: `(reason, objects, bytes)`.
    pub fn take(&self) -> [(&'static str, u64, u64); 2] {
        [
            ("size", self.size.0.swap(0, Ordering::Relaxed), self.size.1.swap(0, Ordering::Relaxed)),
            ("expired", self.expired.0.swap(0, Ordering::Relaxed), self.expired.1.swap(0, Ordering::Relaxed)),
        ]
    }
}

/// What the memory tier holds per key: the slot and its weight, computed once (the cache reads
/// weights while it evicts).
#[derive(Clone)]
struct Held {
    slot: Slot,
    weight: u32,
}

/// Weighs an entry by its bytes: the slot's plus its key's.
#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<Arc<str>, Held> for ByBytes {
    fn weight(&self, key: &Arc<str>, held: &Held) -> u64 {
        u64::from(held.weight) + key.len() as u64
    }
}

/// Counts what the memory tier evicts to stay within its bytes. Also called for an object
/// larger than a shard, which is never admitted.
#[derive(Clone)]
struct CountEvictions(Arc<EvictionTally>);

impl quick_cache::Lifecycle<Arc<str>, Held> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), key: Arc<str>, held: Held) {
        self.0.record(&self.0.size, u64::from(held.weight) + key.len() as u64);
        metrics::counter!("stone_cache_evictions_total", "tier" => "memory", "reason" => "size").increment(1);
    }
}

type MemoryCache = quick_cache::sync::Cache<Arc<str>, Held, ByBytes, quick_cache::DefaultHashBuilder, CountEvictions>;

/// Bytes each shard of the memory tier holds at least (a tier smaller than this has one shard).
/// An object larger than its shard is not admitted; it is still served from Redis.
const MIN_SHARD_BYTES: u64 = 32 * 1024 * 1024;
/// An entry's size, for the tier's estimate of how many entries it holds.
const TYPICAL_ENTRY_BYTES: u64 = 8 * 1024;

/// The in-process tier; with a bound of 0 bytes there is none and every lookup goes to Redis.
///
/// A quick_cache cache bounded by bytes. It admits by S3-FIFO: a new key enters a small probation
/// queue and reaches the main one only when asked for again, and keys evicted recently are
/// remembered (ghosts), so one-hit wonders do not push out popular objects. A lookup is a shard
/// read lock and a hash probe: at ~1.5k instructions per hit, moka's bookkeeping (a read log
/// drained by housekeeping, epoch-based reclamation) was the largest single item of an
/// in-process hit. Expiry is checked on lookup: an entry past its keep time is removed and
/// counted as expired when it is next asked for; until then it only holds bytes the bound
/// already accounts for.
#[derive(Clone)]
pub struct MemoryTier {
    cache: Option<Arc<MemoryCache>>,
    evictions: Arc<EvictionTally>,
}

impl MemoryTier {
    /// A tier bounded by `max_bytes`; evictions by size and expiry are counted in `evictions`
    /// (purges and replacements are not evictions).
    pub fn new(max_bytes: u64, evictions: Arc<EvictionTally>) -> Self {
        if max_bytes == 0 {
            return Self { cache: None, evictions };
        }
        let parallelism = std::thread::available_parallelism().map_or(1, usize::from);
        let shards = usize::try_from(max_bytes / MIN_SHARD_BYTES).unwrap_or(usize::MAX).clamp(1, parallelism * 4);
        let options = quick_cache::OptionsBuilder::new()
            .shards(shards)
            .weight_capacity(max_bytes)
            .estimated_items_capacity(usize::try_from(max_bytes / TYPICAL_ENTRY_BYTES).unwrap_or(usize::MAX).max(1))
            .build();
        let cache = match options {
            Ok(options) => MemoryCache::with_options(
                options,
                ByBytes,
                quick_cache::DefaultHashBuilder::default(),
                CountEvictions(Arc::clone(&evictions)),
            ),
            Err(error) => {
                tracing::warn!(%error, "memory cache tier could not be built; lookups go to Redis");
                return Self { cache: None, evictions };
            }
        };
        Self { cache: Some(Arc::new(cache)), evictions }
    }

    pub fn get(&self, key: &str) -> Option<Slot> {
        let cache = self.cache.as_ref()?;
        let held = cache.get(key)?;
        if held.slot.keep_until() > unix_now() {
            return Some(held.slot);
        }
        // Past its keep time. Removed only if it is still the entry just read: a fresh one may
        // have replaced it meanwhile.
        let removed = cache.remove_if(key, |current| current.slot == held.slot);
        if let Some((key, held)) = removed {
            self.evictions.record(&self.evictions.expired, u64::from(held.weight) + key.len() as u64);
            metrics::counter!("stone_cache_evictions_total", "tier" => "memory", "reason" => "expired").increment(1);
        }
        None
    }

    pub fn insert(&self, key: &str, slot: Slot) {
        if let Some(cache) = &self.cache {
            let weight = slot.weight();
            cache.insert(Arc::from(key), Held { slot, weight });
        }
    }

    /// Drops every entry whose key matches; later lookups never see them.
    pub fn remove_where(&self, predicate: impl Fn(&str, &Slot) -> bool + Send + Sync + 'static) {
        let Some(cache) = &self.cache else { return };
        let purged = AtomicU64::new(0);
        cache.retain(|key, held| {
            let matches = predicate(key, &held.slot);
            if matches {
                purged.fetch_add(1, Ordering::Relaxed);
            }
            !matches
        });
        let purged = purged.into_inner();
        if purged > 0 {
            metrics::counter!("stone_cache_evictions_total", "tier" => "memory", "reason" => "purged")
                .increment(purged);
        }
    }

    /// Bytes held.
    pub fn weighted_size(&self) -> u64 {
        self.cache.as_ref().map_or(0, |cache| cache.weight())
    }
}

/// The Redis tier. Every call is bounded by `timeout`: a slow or absent Redis makes a lookup a
/// miss, never a slow request.
#[derive(Clone)]
pub struct RedisTier {
    connection: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
    writes: Arc<std::sync::atomic::AtomicU64>,
}

/// Errors of the Redis tier; callers log and count them, and carry on without the tier.
#[derive(Debug, thiserror::Error)]
pub enum RedisTierError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

impl RedisTier {
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, RedisTierError> {
        let client = redis::Client::open(url)?;
        let connecting = ConnectionManager::new(client);
        let connection = tokio::time::timeout(connect_timeout, connecting)
            .await
            .map_err(|_| RedisTierError::Timeout(connect_timeout))??;
        Ok(Self { connection, prefix: Arc::from(prefix), timeout, writes: Arc::default() })
    }

    fn object_key(&self, key: &str) -> String {
        format!("{}:o:{key}", self.prefix)
    }

    fn index_key(&self) -> String {
        format!("{}:keys", self.prefix)
    }

    fn expiry_key(&self) -> String {
        format!("{}:expiry", self.prefix)
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}:tag:{tag}", self.prefix)
    }

    async fn bounded<T>(&self, work: impl Future<Output = redis::RedisResult<T>>) -> Result<T, RedisTierError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| RedisTierError::Timeout(self.timeout))?
            .map_err(Into::into)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Slot>, RedisTierError> {
        let Some(raw) = self.get_encoded(key).await? else { return Ok(None) };
        match decode(raw) {
            Ok(slot) => Ok(Some(slot)),
            Err(error) => {
                // A foreign or older format is a miss; the next store overwrites it.
                tracing::warn!(%error, "undecodable redis cache entry");
                Ok(None)
            }
        }
    }

    /// The stored entry as Redis holds it, undecoded: one `GET` on the multiplexed connection
    /// (the benchmark times it apart from decoding).
    pub async fn get_encoded(&self, key: &str) -> Result<Option<Bytes>, RedisTierError> {
        let mut connection = self.connection.clone();
        let raw: Option<Vec<u8>> = self.bounded(connection.get(self.object_key(key))).await?;
        Ok(raw.map(Bytes::from))
    }

    /// Writes the slot with its expiry and indexes its key and tags, in one round trip. Every
    /// few hundred writes also sweeps index members whose objects have expired, so the indexes
    /// stay as large as the live set rather than growing with every key ever stored.
    pub async fn put(&self, key: &str, slot: &Slot, now: u64) -> Result<(), RedisTierError> {
        let keep_s = slot.keep_until().saturating_sub(now).max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.object_key(key)).arg(encode(slot).as_ref()).arg("PX").arg(keep_s * 1000).ignore();
        pipe.cmd("ZADD").arg(self.index_key()).arg(0).arg(key).ignore();
        pipe.cmd("ZADD").arg(self.expiry_key()).arg(slot.keep_until()).arg(key).ignore();
        for index in [self.index_key(), self.expiry_key()] {
            // An idle cache's indexes go away with its last object.
            pipe.cmd("EXPIRE").arg(&index).arg(keep_s + 1).arg("GT").ignore();
            pipe.cmd("EXPIRE").arg(&index).arg(keep_s + 1).arg("NX").ignore();
        }
        if let Slot::Object(object) = slot {
            for tag in &object.tags {
                let tag_key = self.tag_key(tag);
                pipe.cmd("SADD").arg(&tag_key).arg(key).ignore();
                // The set lives at least as long as its longest-lived member.
                pipe.cmd("EXPIRE").arg(&tag_key).arg(keep_s + 1).arg("GT").ignore();
                pipe.cmd("EXPIRE").arg(&tag_key).arg(keep_s + 1).arg("NX").ignore();
            }
        }
        let mut connection = self.connection.clone();
        self.bounded(pipe.query_async::<()>(&mut connection)).await?;
        if self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed).is_multiple_of(SWEEP_EVERY) {
            self.sweep(now).await?;
        }
        Ok(())
    }

    /// Removes expired keys from the prefix index.
    async fn sweep(&self, now: u64) -> Result<(), RedisTierError> {
        let mut connection = self.connection.clone();
        let command = redis::cmd("ZRANGEBYSCORE")
            .arg(self.expiry_key())
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .to_owned();
        let expired: Vec<String> = self.bounded(command.query_async(&mut connection)).await?;
        if expired.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM").arg(self.index_key()).arg(&expired).ignore();
        pipe.cmd("ZREM").arg(self.expiry_key()).arg(&expired).ignore();
        self.bounded(pipe.query_async::<()>(&mut connection)).await
    }

    /// Deletes `key` and its variants. Returns the number of objects deleted.
    pub async fn remove_key(&self, key: &str) -> Result<u64, RedisTierError> {
        let mut members = self.range(&format!("{key}{}", key::EXTRA_SEPARATOR)).await?;
        members.extend(self.range(&format!("{key}{}", key::VARIANT_SEPARATOR)).await?);
        members.push(key.to_owned());
        self.delete(&members).await
    }

    /// Deletes every object whose key starts with `prefix`.
    pub async fn remove_prefix(&self, prefix: &str) -> Result<u64, RedisTierError> {
        let members = self.range(prefix).await?;
        self.delete(&members).await
    }

    /// Deletes every object tagged `tag`.
    pub async fn remove_tag(&self, tag: &str) -> Result<u64, RedisTierError> {
        let mut connection = self.connection.clone();
        let tag_key = self.tag_key(tag);
        let members: Vec<String> = self.bounded(connection.smembers(&tag_key)).await?;
        let deleted = self.delete(&members).await?;
        let _: () = self.bounded(connection.del(&tag_key)).await?;
        Ok(deleted)
    }

    async fn range(&self, prefix: &str) -> Result<Vec<String>, RedisTierError> {
        let mut connection = self.connection.clone();
        // `[prefix` .. `[prefix\xff`: every member starting with the prefix (keys are UTF-8, so
        // no key byte is 0xff).
        let mut upper = format!("[{prefix}").into_bytes();
        upper.push(0xff);
        let command = redis::cmd("ZRANGEBYLEX").arg(self.index_key()).arg(format!("[{prefix}")).arg(upper).to_owned();
        self.bounded(command.query_async(&mut connection)).await
    }

    async fn delete(&self, members: &[String]) -> Result<u64, RedisTierError> {
        if members.is_empty() {
            return Ok(0);
        }
        let mut deleted = 0;
        for chunk in members.chunks(500) {
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(chunk.iter().map(|member| self.object_key(member)).collect::<Vec<_>>());
            pipe.cmd("ZREM").arg(self.index_key()).arg(chunk).ignore();
            pipe.cmd("ZREM").arg(self.expiry_key()).arg(chunk).ignore();
            let mut connection = self.connection.clone();
            let (count,): (u64,) = self.bounded(pipe.query_async(&mut connection)).await?;
            deleted += count;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn object(body: Vec<u8>, tags: Vec<String>, lifetime: u64, flags: (bool, bool)) -> Slot {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.append(http::header::VARY, HeaderValue::from_static("accept"));
        headers.append(http::header::VARY, HeaderValue::from_static("accept-encoding"));
        Slot::Object(Arc::new(StoredObject {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(body),
            freshness: EntryFreshness {
                corrected_initial_age: 3,
                response_time: 1_700_000_000,
                lifetime_s: lifetime,
                stale_while_revalidate_s: 5,
                stale_if_error_s: 6,
                must_revalidate: flags.0,
                no_cache: flags.1,
            },
            keep_until: 1_700_000_100,
            tags,
        }))
    }

    proptest! {
        #[test]
        fn entries_survive_the_round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            tags in proptest::collection::vec("[a-z0-9:-]{1,12}", 0..4),
            lifetime in any::<u64>(),
            must_revalidate in any::<bool>(),
            no_cache in any::<bool>(),
        ) {
            let slot = object(body, tags, lifetime, (must_revalidate, no_cache));
            prop_assert_eq!(decode(encode(&slot)).unwrap(), slot);
        }

        #[test]
        fn truncated_entries_are_errors_not_panics(cut in 0usize..200) {
            let encoded = encode(&object(vec![1; 100], vec!["t".into()], 9, (false, false)));
            let cut = cut.min(encoded.len() - 1);
            prop_assert!(decode(encoded.slice(..cut)).is_err());
        }
    }

    #[test]
    fn variant_markers_round_trip() {
        let slot = Slot::Variants { names: vec!["accept".into()], generation: 7, keep_until: 9 };
        assert_eq!(decode(encode(&slot)).unwrap(), slot);
        assert_eq!(decode(Bytes::from_static(&[9])), Err(DecodeError::UnknownFormat(9)));
    }
}
