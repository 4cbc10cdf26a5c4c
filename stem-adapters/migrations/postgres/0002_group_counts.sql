-- Group counters move off the `groups` row into shards (member index modulo 32): members that
-- finish at the same time bump different rows, so their commits no longer queue behind one
-- row lock. A group's counts are the sums of its shards.
CREATE TABLE group_counts (
    group_id  UUID NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    shard     INTEGER NOT NULL,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (group_id, shard)
);
INSERT INTO group_counts (group_id, shard, succeeded, failed)
    SELECT id, 0, succeeded, failed FROM groups WHERE succeeded > 0 OR failed > 0;
ALTER TABLE groups DROP COLUMN succeeded, DROP COLUMN failed;
