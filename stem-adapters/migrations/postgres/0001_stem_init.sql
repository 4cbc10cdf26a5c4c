-- Stem on Postgres: every table lives in the namespace's schema (the migration runs with
-- `search_path` set to it), so two deployments share one database without seeing each other.

-- Broker: one row per stored envelope. `state` is `ready` (due at `run_at`) or `leased`
-- (delivered; owned until `lease_until`). `token` grows with every delivery and fences
-- receipts: an operation with an old token touches nothing.
CREATE TABLE jobs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       TEXT NOT NULL,
    priority    SMALLINT NOT NULL DEFAULT 0,
    run_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    state       TEXT NOT NULL DEFAULT 'ready',
    lease_until TIMESTAMPTZ,
    lease_ms    BIGINT,
    token       BIGINT NOT NULL DEFAULT 0,
    deliveries  INTEGER NOT NULL DEFAULT 0,
    consumer    TEXT,
    task_id     UUID,
    payload     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, run_at, id) WHERE state = 'ready';
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE state = 'leased';

-- Dead-letter queue: `payload` is the envelope JSON, or the raw text of a malformed one.
CREATE TABLE dead_letters (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue   TEXT NOT NULL,
    reason  TEXT NOT NULL,
    detail  TEXT NOT NULL,
    payload TEXT NOT NULL,
    dead_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_queue ON dead_letters (queue, id);

-- Broadcast: subscriptions, and one row per (message, subscriber) taken once.
CREATE TABLE broadcast_subscriptions (
    channel    TEXT NOT NULL,
    subscriber TEXT NOT NULL,
    since      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, subscriber)
);
CREATE TABLE broadcast_messages (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel    TEXT NOT NULL,
    subscriber TEXT NOT NULL,
    payload    TEXT NOT NULL
);
CREATE INDEX broadcast_messages_inbox ON broadcast_messages (channel, subscriber, id);

-- Result backend: one status record per task. `record` is the status without progress;
-- rows past `expires_at` are invisible and swept.
CREATE TABLE statuses (
    id         UUID PRIMARY KEY,
    task       TEXT NOT NULL,
    state      TEXT NOT NULL,
    attempt    BIGINT NOT NULL,
    terminal   BOOLEAN NOT NULL,
    record     JSONB NOT NULL,
    progress   JSONB,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX statuses_expiry ON statuses (expires_at);

CREATE TABLE groups (
    id         UUID PRIMARY KEY,
    total      INTEGER NOT NULL,
    succeeded  INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0,
    claimed    BOOLEAN NOT NULL DEFAULT false,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE group_members (
    group_id  UUID NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,
    succeeded BOOLEAN NOT NULL,
    outcome   JSONB NOT NULL,
    PRIMARY KEY (group_id, idx)
);

CREATE TABLE workers (
    worker_id  TEXT PRIMARY KEY,
    record     JSONB NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

-- Coordination stores.
CREATE TABLE locks (
    key        TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE revokes (
    task_id    UUID PRIMARY KEY,
    terminate  BOOLEAN NOT NULL,
    reason     TEXT NOT NULL,
    -- RFC 3339 with full precision (what the revoker stamped).
    revoked_at TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE rate_buckets (
    key        TEXT PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    granted    BOOLEAN NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE unique_claims (
    key        TEXT PRIMARY KEY,
    task_id    UUID NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

-- Beat schedules: `spec` is the entry as JSON; `next_run_at` is advanced with a
-- compare-and-set so one firing happens once however many Beat processes run.
CREATE TABLE schedules (
    id          TEXT PRIMARY KEY,
    spec        JSONB NOT NULL,
    enabled     BOOLEAN NOT NULL DEFAULT true,
    next_run_at TIMESTAMPTZ,
    last_run_at TIMESTAMPTZ,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
