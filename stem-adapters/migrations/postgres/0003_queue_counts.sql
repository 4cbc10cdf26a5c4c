-- Row counts per queue (all rows, leased rows), so `counts` reads a few counter rows plus
-- the delayed rows and expired leases instead of scanning the whole queue. Statement
-- triggers count inserts and deletes; the adapter's UPDATE statements that change a row's
-- state or queue (claim, requeue, retry) adjust the counters themselves, so the claim, the
-- most frequent write, fires no trigger. Each transaction adds its deltas to one of 64
-- shard rows per queue (its transaction id modulo 64): concurrent writers have nearby
-- transaction ids, so they practically never wait for each other's row lock. The trigger
-- functions name the schema explicitly (filled in from the migration's search path),
-- whatever the caller's search path.
CREATE TABLE queue_counts (
    queue  TEXT NOT NULL,
    shard  SMALLINT NOT NULL,
    jobs   BIGINT NOT NULL DEFAULT 0,
    leased BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, shard)
) WITH (fillfactor = 50);

DO $do$
BEGIN
EXECUTE format($f$
CREATE FUNCTION %1$I.jobs_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO %1$I.queue_counts AS c (queue, shard, jobs, leased)
    SELECT queue, (txid_current() %% 64)::int2, count(*), count(*) FILTER (WHERE state = 'leased')
    FROM new_rows GROUP BY queue ORDER BY queue
    ON CONFLICT (queue, shard) DO UPDATE SET jobs = c.jobs + EXCLUDED.jobs, leased = c.leased + EXCLUDED.leased;
    RETURN NULL;
END $$;

CREATE FUNCTION %1$I.jobs_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO %1$I.queue_counts AS c (queue, shard, jobs, leased)
    SELECT queue, (txid_current() %% 64)::int2, -count(*), -count(*) FILTER (WHERE state = 'leased')
    FROM old_rows GROUP BY queue ORDER BY queue
    ON CONFLICT (queue, shard) DO UPDATE SET jobs = c.jobs + EXCLUDED.jobs, leased = c.leased + EXCLUDED.leased;
    RETURN NULL;
END $$;

$f$, current_schema());
END $do$;

LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_insert();
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION jobs_count_delete();
INSERT INTO queue_counts (queue, shard, jobs, leased)
SELECT queue, 0, count(*), count(*) FILTER (WHERE state = 'leased') FROM jobs GROUP BY queue;

-- The lease index covers the rows with a lease deadline (exactly the leased ones). Its
-- predicate is implied by conditions on `lease_until` (reclaim, `counts`), never by
-- `state = 'leased'` alone: with the old predicate a generic plan for an ack could choose a
-- full scan of this index (statistics saying "few leased rows") over the primary key, and
-- that scan grows with every acked row not yet vacuumed.
DROP INDEX jobs_leased;
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE lease_until IS NOT NULL;

-- Priorities are 0-9 (the adapter clamps them); `counts` and the next-due check rely on it
-- to find delayed rows with ten short index range scans.
ALTER TABLE jobs ADD CONSTRAINT jobs_priority_range CHECK (priority BETWEEN 0 AND 9);

-- Status records are stored as `json` (validated text) rather than `jsonb`: every task
-- writes its record twice, and building the binary form on each write cost more than the
-- reads gain (the adapter reads a record whole; `->` and `->>` work on `json` as well).
ALTER TABLE statuses ALTER COLUMN record TYPE json USING record::json;
