-- Cache and health event tables, per-minute and per-hour rollups of `requests`, and insert
-- deduplication on every table the projector writes.
--
-- Exactly once: the projector gives every insert an `insert_deduplication_token` derived from the
-- partition and the stream-sequence range of its batch, and retries a batch with the same token.
-- A retried block that already landed is dropped by each table's deduplication log, in the raw
-- table and (with `deduplicate_blocks_in_dependent_materialized_views`) in every rollup, so a
-- batch that committed partly (raw rows but not a rollup, one day but not the next) is completed
-- by the retry without counting anything twice. Plain MergeTree keeps no such log unless
-- `non_replicated_deduplication_window` is set; Replicated tables keep one by default.
--
-- Retention: the TTLs below are the defaults; the projector applies `analytics.retention_days`
-- and `analytics.rollup_retention_days` with `ALTER TABLE ... MODIFY TTL` at start.

ALTER TABLE requests MODIFY SETTING non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS cache_events
(
    event_id    UUID,
    time        DateTime64(6, 'UTC'),
    source      LowCardinality(String),
    partition   UInt16,
    stream_seq  UInt64,
    action      LowCardinality(String),
    route       LowCardinality(String),
    key         String,
    tier        LowCardinality(String),
    bytes       UInt64,
    ttl_s       UInt64,
    tags        Array(String),
    actor       String,
    reason      String
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(time)
ORDER BY (route, action, time, event_id)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- Every `health.*` event: target transitions (`upstream`, `target`, `state`, `check_kind`,
-- `reason`, `consecutive`), worker heartbeats and reports of lost events (`worker`, ...). Columns
-- a type does not have stay at their defaults.
CREATE TABLE IF NOT EXISTS health_events
(
    event_id        UUID,
    time            DateTime64(6, 'UTC'),
    source          LowCardinality(String),
    partition       UInt16,
    stream_seq      UInt64,
    event_type      LowCardinality(String),
    upstream        LowCardinality(String),
    target          LowCardinality(String),
    state           LowCardinality(String),
    check_kind      LowCardinality(String),
    reason          String,
    consecutive     UInt32,
    worker          LowCardinality(String),
    build           LowCardinality(String),
    uptime_s        UInt64,
    in_flight       UInt64,
    events_pending  UInt64,
    dropped         UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(time)
ORDER BY (event_type, upstream, target, time, event_id)
TTL toDateTime(time) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- Rollups: one row per bucket and dimension combination. `status` and `cache` are dimensions,
-- so error classes and cache hits and misses are sums over them; latency is a mergeable
-- t-digest state of `total_us`.
CREATE TABLE IF NOT EXISTS requests_1m
(
    bucket         DateTime('UTC'),
    route          LowCardinality(String),
    path_template  LowCardinality(String),
    upstream       LowCardinality(String),
    consumer       LowCardinality(String),
    status         UInt16,
    cache          LowCardinality(String),
    requests       SimpleAggregateFunction(sum, UInt64),
    bytes_in       SimpleAggregateFunction(sum, UInt64),
    bytes_out      SimpleAggregateFunction(sum, UInt64),
    latency_us     AggregateFunction(quantilesTDigest(0.5, 0.9, 0.95, 0.99), UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (bucket, route, path_template, upstream, consumer, status, cache)
TTL bucket + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS requests_1h
(
    bucket         DateTime('UTC'),
    route          LowCardinality(String),
    path_template  LowCardinality(String),
    upstream       LowCardinality(String),
    consumer       LowCardinality(String),
    status         UInt16,
    cache          LowCardinality(String),
    requests       SimpleAggregateFunction(sum, UInt64),
    bytes_in       SimpleAggregateFunction(sum, UInt64),
    bytes_out      SimpleAggregateFunction(sum, UInt64),
    latency_us     AggregateFunction(quantilesTDigest(0.5, 0.9, 0.95, 0.99), UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, route, path_template, upstream, consumer, status, cache)
TTL bucket + INTERVAL 400 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_1m_mv TO requests_1m AS
SELECT
    toStartOfMinute(time) AS bucket,
    route, path_template, upstream, consumer, status, cache,
    count() AS requests,
    sum(bytes_in) AS bytes_in,
    sum(bytes_out) AS bytes_out,
    quantilesTDigestState(0.5, 0.9, 0.95, 0.99)(total_us) AS latency_us
FROM requests
GROUP BY bucket, route, path_template, upstream, consumer, status, cache;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_1h_mv TO requests_1h AS
SELECT
    toStartOfHour(time) AS bucket,
    route, path_template, upstream, consumer, status, cache,
    count() AS requests,
    sum(bytes_in) AS bytes_in,
    sum(bytes_out) AS bytes_out,
    quantilesTDigestState(0.5, 0.9, 0.95, 0.99)(total_us) AS latency_us
FROM requests
GROUP BY bucket, route, path_template, upstream, consumer, status, cache;
