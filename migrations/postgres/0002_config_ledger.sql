-- The configuration ledger's read side beyond current state: the history of every applied change
-- (who, when, before and after) and the gateway's API tokens.
--
-- History rows are written by the config projector in the same transaction as the entity state
-- and the checkpoint, so history, state and checkpoint always agree.

CREATE TABLE IF NOT EXISTS config_history (
    -- Stream sequence of the change's own event.
    stream_seq     BIGINT      PRIMARY KEY,
    -- Where and when the change took effect: for a member of a change set, the sequence and time
    -- of the set's last member, so a point-in-time view never shows half a set.
    effective_seq  BIGINT      NOT NULL,
    effective_at   TIMESTAMPTZ NOT NULL,
    kind           TEXT        NOT NULL,
    name           TEXT        NOT NULL,
    entity_id      UUID        NOT NULL,
    version        BIGINT      NOT NULL,
    op             TEXT        NOT NULL CHECK (op IN ('upserted', 'deleted')),
    actor          TEXT        NOT NULL,
    change_set     UUID,
    before         JSONB,
    after          JSONB
);

CREATE INDEX IF NOT EXISTS config_history_entity ON config_history (kind, name, stream_seq DESC);
CREATE INDEX IF NOT EXISTS config_history_effective_at ON config_history (effective_at);
CREATE INDEX IF NOT EXISTS config_history_effective_seq ON config_history (effective_seq);

-- Bearer tokens of the gateway API. Only the SHA-256 of a token is kept; the token itself is
-- shown once when it is created.
CREATE TABLE IF NOT EXISTS api_tokens (
    id             TEXT        PRIMARY KEY,
    name           TEXT        NOT NULL UNIQUE,
    scope          TEXT        NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    secret_sha256  TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at     TIMESTAMPTZ
);
