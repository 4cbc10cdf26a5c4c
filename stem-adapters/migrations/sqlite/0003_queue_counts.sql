-- Row counts per queue (all rows, leased rows), kept by triggers on `jobs`, so `counts` reads
-- one counter row plus the delayed rows and expired leases instead of scanning the queue.
-- One writer at a time, so one row per queue is enough.
CREATE TABLE queue_counts (
    queue  TEXT PRIMARY KEY,
    jobs   INTEGER NOT NULL DEFAULT 0,
    leased INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO queue_counts (queue, jobs, leased)
SELECT queue, count(*), sum(state = 'leased') FROM jobs GROUP BY queue;
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO queue_counts (queue, jobs, leased) VALUES (NEW.queue, 1, NEW.state = 'leased')
    ON CONFLICT (queue) DO UPDATE SET jobs = jobs + 1, leased = leased + excluded.leased;
END;
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE queue_counts SET jobs = jobs - 1, leased = leased - (OLD.state = 'leased')
    WHERE queue = OLD.queue;
END;
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state, queue ON jobs
WHEN OLD.state IS NOT NEW.state OR OLD.queue IS NOT NEW.queue BEGIN
    UPDATE queue_counts SET jobs = jobs - 1, leased = leased - (OLD.state = 'leased')
    WHERE queue = OLD.queue;
    INSERT INTO queue_counts (queue, jobs, leased) VALUES (NEW.queue, 1, NEW.state = 'leased')
    ON CONFLICT (queue) DO UPDATE SET jobs = jobs + 1, leased = leased + excluded.leased;
END;
