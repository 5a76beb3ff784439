-- Raw request events: one row per proxied request (request.completed, upcast to the current version).
-- (partition, stream_seq) is the projector's watermark: a partition's rows are inserted in stream
-- order, so the highest stream_seq stored for a partition says where a restarted projector resumes.

CREATE TABLE IF NOT EXISTS requests
(
    event_id       UUID,
    time           DateTime64(6, 'UTC'),
    source         LowCardinality(String),
    config_seq     UInt64,
    partition      UInt16,
    stream_seq     UInt64,
    method         LowCardinality(String),
    host           LowCardinality(String),
    route          LowCardinality(String),
    path_template  LowCardinality(String),
    path           String,
    upstream       LowCardinality(String),
    target         LowCardinality(String),
    consumer       LowCardinality(String),
    client_ip      String,
    protocol       LowCardinality(String),
    status         UInt16,
    total_us       UInt64,
    upstream_us    UInt64,
    ttfb_us        UInt64,
    bytes_in       UInt64,
    bytes_out      UInt64,
    cache          LowCardinality(String),
    error          LowCardinality(String),
    rate_limited   UInt8,
    traceparent    String
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(time)
ORDER BY (route, time, event_id)
TTL toDateTime(time) + INTERVAL 30 DAY;
