-- `cache.evicted` events sum many evictions per reason and interval (the proxy never sends one
-- event per eviction): `count` is how many objects an event stands for, 1 for every other event.
ALTER TABLE cache_events ADD COLUMN IF NOT EXISTS count UInt64 DEFAULT 1 AFTER reason;
