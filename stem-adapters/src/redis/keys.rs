//! Key names. Every key starts with the namespace, so deployments sharing one Redis never see
//! each other's data. The Lua scripts build the same names from the namespace (see
//! `scripts/common.lua`); this module is the reference for both.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{ns}:q:{queue}:{priority}` | stream, group `stem` | ready and in-flight envelopes (field `e`, optional lease ms `v`); the group's pending entries are the leases (owner `{worker}~{lease ms}`, delivery count = token) |
//! | `{ns}:d:{queue}` | sorted set | delayed envelopes: member `{priority}\|{lease ms}\|{json}`, score = due ms |
//! | `{ns}:dlq:{queue}` | hash | dead letters: DLQ id → `DeadLetter` JSON |
//! | `{ns}:dlqi:{queue}` | sorted set | DLQ ids in order (score = id) |
//! | `{ns}:dlq-seq` | string | DLQ id counter |
//! | `{ns}:bc:{channel}` | stream, one group per subscriber | broadcast messages |
//! | `{ns}:rh:{slot}` | hash, TTL | status records (every state after `queued`) of time-ordered task ids made in one 100 ms slot: task id → `{attempt}:{terminal 0/1}:{progress key 0/1}\|{json}`; the TTL is renewed by each write |
//! | `{ns}:rq:{slot}` | hash, TTL | `queued` records of the same ids, same form; a task's record in `rh`, once written, takes precedence |
//! | `{ns}:r:{task id}` | string, TTL | status record of a task id that is not time-ordered (its `queued` record too) |
//! | `{ns}:p:{task id}` | string, TTL | last progress report |
//! | `{ns}:done:{task id}` | pub/sub channel | terminal records, for `wait` |
//! | `{ns}:g:{group id}` | hash, TTL | group: `total`, `s`, `f`, `claimed`, `m{index}` → outcome |
//! | `{ns}:workers`, `{ns}:workers:exp` | hash, sorted set | heartbeats and their expiry |

use stem::TaskId;

/// Time-ordered (UUIDv7) task ids made within this many milliseconds of each other share one
/// hash for their `queued` records.
pub const QUEUED_SLOT_MS: u64 = 100;

/// The consumer group every queue stream has.
pub const GROUP: &str = "stem";

/// Key names of one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    ns: String,
}

impl Keys {
    /// Keys under `namespace`.
    pub fn new(namespace: &str) -> Self {
        Keys { ns: namespace.to_owned() }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Stream of `queue` at `priority` (0–9).
    pub fn stream(&self, queue: &str, priority: u8) -> String {
        self.joined(&[":q:", queue, ":", itoa::Buffer::new().format(priority)])
    }

    /// Delayed sorted set of `queue`.
    pub fn delayed(&self, queue: &str) -> String {
        self.joined(&[":d:", queue])
    }

    /// DLQ hash of `queue`.
    pub fn dlq(&self, queue: &str) -> String {
        self.joined(&[":dlq:", queue])
    }

    /// DLQ order index of `queue`.
    pub fn dlq_index(&self, queue: &str) -> String {
        self.joined(&[":dlqi:", queue])
    }

    /// Broadcast stream of `channel`.
    pub fn broadcast(&self, channel: &str) -> String {
        self.joined(&[":bc:", channel])
    }

    /// The namespace followed by `parts`, without `format!`: a fetch names ten streams, and
    /// the formatting machinery cost several times the copying.
    fn joined(&self, parts: &[&str]) -> String {
        let mut key = String::with_capacity(self.ns.len() + parts.iter().map(|p| p.len()).sum::<usize>());
        key.push_str(&self.ns);
        for part in parts {
            key.push_str(part);
        }
        key
    }

    /// `{ns}{infix}{id}`, built without the formatting machinery: a worker makes a few such
    /// names per task, and `format!` with a UUID costs several times the copying.
    fn id_key(&self, infix: &str, id: TaskId) -> String {
        let mut buf = [0u8; 36];
        let id = id.0.as_hyphenated().encode_lower(&mut buf);
        let mut key = String::with_capacity(self.ns.len() + infix.len() + id.len());
        key.push_str(&self.ns);
        key.push_str(infix);
        key.push_str(id);
        key
    }

    /// `{ns}{infix}{n}`, likewise.
    fn number_key(&self, infix: &str, n: u64) -> String {
        let mut digits = itoa::Buffer::new();
        let n = digits.format(n);
        let mut key = String::with_capacity(self.ns.len() + infix.len() + n.len());
        key.push_str(&self.ns);
        key.push_str(infix);
        key.push_str(n);
        key
    }

    /// Status record of a task whose id is not time-ordered (see [`Keys::record_slot`]).
    pub fn record(&self, id: TaskId) -> String {
        self.id_key(":r:", id)
    }

    /// The hash holding the `queued` record of `id` when it is a time-ordered (UUIDv7) id:
    /// one per [`QUEUED_SLOT_MS`] of the id's timestamp, so a producer writes a batch's
    /// `queued` records with one `HSET`. `None` for other ids: their `queued` record is their
    /// own record key.
    pub fn queued(&self, id: TaskId) -> Option<String> {
        Keys::slot(id).map(|slot| self.queued_hash(slot))
    }

    /// The `queued` slot hash of slot number `slot` (see [`Keys::slot`]).
    pub(crate) fn queued_hash(&self, slot: u64) -> String {
        self.number_key(":rq:", slot)
    }

    /// The hash holding the status record of `id` (every state after `queued`) when it is a
    /// time-ordered (UUIDv7) id, one per [`QUEUED_SLOT_MS`] of the id's timestamp like
    /// [`Keys::queued`]: a field costs Redis a fraction of a key with its own expiry, and a
    /// worker writes a batch's records into one hash with one `HSET`. `None` for other ids:
    /// their record is [`Keys::record`].
    pub fn record_slot(&self, id: TaskId) -> Option<String> {
        Keys::slot(id).map(|slot| self.record_hash(slot))
    }

    /// The record slot hash of slot number `slot` (see [`Keys::slot`]).
    pub(crate) fn record_hash(&self, slot: u64) -> String {
        self.number_key(":rh:", slot)
    }

    /// The slot number of a time-ordered id (its timestamp in [`QUEUED_SLOT_MS`] units), for
    /// grouping a batch's records by hash before naming each hash once.
    pub(crate) fn slot(id: TaskId) -> Option<u64> {
        if id.0.get_version_num() != 7 {
            return None;
        }
        let b = id.0.as_bytes();
        Some(u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]) / QUEUED_SLOT_MS)
    }

    /// Progress of a task.
    pub fn progress(&self, id: TaskId) -> String {
        self.id_key(":p:", id)
    }

    /// Prefix of the per-task completion channels.
    pub fn done_prefix(&self) -> String {
        format!("{}:done:", self.ns)
    }

    /// Completion channel of a task.
    pub fn done(&self, id: TaskId) -> String {
        self.id_key(":done:", id)
    }

    /// Group hash.
    pub fn group(&self, id: TaskId) -> String {
        self.id_key(":g:", id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_starts_with_the_namespace() {
        let k = Keys::new("acme");
        let id = TaskId::new();
        for key in [
            k.stream("q", 9),
            k.delayed("q"),
            k.dlq("q"),
            k.dlq_index("q"),
            k.broadcast("c"),
            k.record(id),
            k.progress(id),
            k.done(id),
            k.group(id),
            k.queued(id).expect("a time-ordered id"),
            k.record_slot(id).expect("a time-ordered id"),
        ] {
            assert!(key.starts_with("acme:"), "{key}");
        }
        // The names the Lua scripts build (scripts/common.lua).
        assert_eq!(k.stream("emails", 3), "acme:q:emails:3");
        assert_eq!(k.stream("emails", 10), "acme:q:emails:10");
        assert_eq!(k.delayed("emails"), "acme:d:emails");
        assert_eq!(k.dlq("emails"), "acme:dlq:emails");
        assert_eq!(k.dlq_index("emails"), "acme:dlqi:emails");
        assert_eq!(k.broadcast("news"), "acme:bc:news");
    }

    #[test]
    fn time_ordered_ids_of_one_slot_share_a_queued_hash() {
        let k = Keys::new("n");
        let at =
            |ms: u64, low: u128| TaskId(uuid::Uuid::from_u128((u128::from(ms) << 80) | (0x7 << 76) | low));
        assert_eq!(k.queued(at(1_234_567, 1)), Some("n:rq:12345".to_owned()));
        assert_eq!(k.queued(at(1_234_599, 2)), k.queued(at(1_234_500, 3)), "same 100 ms slot");
        assert_ne!(k.queued(at(1_234_600, 1)), k.queued(at(1_234_599, 1)));
        assert_eq!(k.queued(TaskId(uuid::Uuid::new_v4())), None, "other ids keep their own key");
        assert_eq!(k.record_slot(at(1_234_567, 1)), Some("n:rh:12345".to_owned()));
        assert_eq!(k.record_slot(TaskId(uuid::Uuid::new_v4())), None);
    }
}
