-- Backfill example: usage per consumer and hour (requests, server errors, rate-limited requests,
-- bytes), the shape a billing or quota report needs. Added after the first release: the view
-- fills it from new inserts only, and a rebuild (`stone replay analytics`, or
-- `POST /v1/projections/analytics/rebuild`) fills it from the retained stream — every rollup fed
-- by a `{rollup}_mv` view on a raw table is rebuilt with the raw tables — without touching the
-- proxies. See docs/analytics.md, "Rebuilds and backfills".

CREATE TABLE IF NOT EXISTS consumer_usage_1h
(
    bucket         DateTime('UTC'),
    consumer       LowCardinality(String),
    route          LowCardinality(String),
    requests       SimpleAggregateFunction(sum, UInt64),
    server_errors  SimpleAggregateFunction(sum, UInt64),
    rate_limited   SimpleAggregateFunction(sum, UInt64),
    bytes_in       SimpleAggregateFunction(sum, UInt64),
    bytes_out      SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (bucket, consumer, route)
TTL bucket + INTERVAL 400 DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS consumer_usage_1h_mv TO consumer_usage_1h AS
SELECT
    toStartOfHour(time) AS bucket,
    consumer, route,
    count() AS requests,
    countIf(status >= 500) AS server_errors,
    countIf(rate_limited = 1) AS rate_limited,
    sum(bytes_in) AS bytes_in,
    sum(bytes_out) AS bytes_out
FROM requests
GROUP BY bucket, consumer, route;
