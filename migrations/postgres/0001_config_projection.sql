-- The configuration projection: current state of every entity, folded from the CONFIG stream.
-- The checkpoint row is written in the same transaction as the state it covers.

CREATE TABLE IF NOT EXISTS config_entities (
    kind        TEXT        NOT NULL,
    name        TEXT        NOT NULL,
    id          UUID        NOT NULL,
    version     BIGINT      NOT NULL,
    spec        JSONB       NOT NULL,
    stream_seq  BIGINT      NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    updated_by  TEXT        NOT NULL,
    PRIMARY KEY (kind, name)
);

CREATE TABLE IF NOT EXISTS projection_checkpoints (
    projection  TEXT        PRIMARY KEY,
    stream_seq  BIGINT      NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
