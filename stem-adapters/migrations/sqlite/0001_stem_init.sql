-- Stem on SQLite: one database file is one namespace. Times are Unix milliseconds.

-- Broker: `state` is `ready` (due at `run_at`) or `leased` (owned until `lease_until`);
-- `token` grows with every delivery and fences receipts.
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT NOT NULL,
    priority    INTEGER NOT NULL DEFAULT 0,
    run_at      INTEGER NOT NULL,
    state       TEXT NOT NULL DEFAULT 'ready',
    lease_until INTEGER,
    lease_ms    INTEGER,
    token       INTEGER NOT NULL DEFAULT 0,
    deliveries  INTEGER NOT NULL DEFAULT 0,
    consumer    TEXT,
    task_id     TEXT,
    payload     TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX jobs_ready ON jobs (queue, priority DESC, run_at, id) WHERE state = 'ready';
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE state = 'leased';

CREATE TABLE dead_letters (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    queue   TEXT NOT NULL,
    reason  TEXT NOT NULL,
    detail  TEXT NOT NULL,
    payload TEXT NOT NULL,
    dead_at INTEGER NOT NULL
);
CREATE INDEX dead_letters_queue ON dead_letters (queue, id);

CREATE TABLE broadcast_subscriptions (
    channel    TEXT NOT NULL,
    subscriber TEXT NOT NULL,
    PRIMARY KEY (channel, subscriber)
);
CREATE TABLE broadcast_messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    channel    TEXT NOT NULL,
    subscriber TEXT NOT NULL,
    payload    TEXT NOT NULL
);
CREATE INDEX broadcast_messages_inbox ON broadcast_messages (channel, subscriber, id);

-- Result backend.
CREATE TABLE statuses (
    id         TEXT PRIMARY KEY,
    task       TEXT NOT NULL,
    state      TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    terminal   INTEGER NOT NULL,
    record     TEXT NOT NULL,
    progress   TEXT,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX statuses_expiry ON statuses (expires_at);

CREATE TABLE groups (
    id         TEXT PRIMARY KEY,
    total      INTEGER NOT NULL,
    succeeded  INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0,
    claimed    INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL
);
CREATE TABLE group_members (
    group_id  TEXT NOT NULL,
    idx       INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    outcome   TEXT NOT NULL,
    PRIMARY KEY (group_id, idx)
);

CREATE TABLE workers (
    worker_id  TEXT PRIMARY KEY,
    record     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);

-- Coordination stores.
CREATE TABLE locks (
    key        TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE revokes (
    task_id    TEXT PRIMARY KEY,
    terminate  INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    revoked_at TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE rate_buckets (
    key        TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    granted    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE unique_claims (
    key        TEXT PRIMARY KEY,
    task_id    TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);

-- Beat schedules (same shape as on Postgres; times in Unix milliseconds).
CREATE TABLE schedules (
    id          TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    enabled     INTEGER NOT NULL DEFAULT 1,
    next_run_at INTEGER,
    last_run_at INTEGER,
    updated_at  INTEGER NOT NULL
);
