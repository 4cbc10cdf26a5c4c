//! A direct writer for the two JSON records every task writes: its envelope (at enqueue) and
//! its status records. Field names are literals that need no escaping, and ids, numbers and
//! timestamps are ASCII that Stem formats itself, so only free-form values (arguments,
//! results, metadata, names) go through `serde_json`. Through serde's derived `Serialize`,
//! every name and every one of those strings passed through the escaping writer, which was
//! the larger part of a producer's instructions per task. The output is byte for byte what
//! the derived `Serialize` writes (tested below), so every reader is unchanged.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::envelope::TaskId;

/// One JSON object being written to `out`.
pub(crate) struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    /// Open an object at the end of `out`.
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// `"name":` after a comma if needed; `name` is a literal that needs no escaping.
    fn key(&mut self, name: &str) {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string field, escaped only when it holds a character JSON escapes (the same set
    /// `serde_json` escapes: controls, `"` and `\`).
    pub(crate) fn str(&mut self, name: &str, value: &str) -> serde_json::Result<()> {
        self.key(name);
        if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
            Ok(())
        } else {
            serde_json::to_writer(&mut *self.out, value)
        }
    }

    /// An unsigned integer field.
    pub(crate) fn uint(&mut self, name: &str, value: u64) {
        self.key(name);
        self.out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// A task id field (hyphenated lower-case, as the id's `Serialize` writes it).
    pub(crate) fn id(&mut self, name: &str, id: TaskId) {
        self.key(name);
        let mut buf = [0u8; 36];
        self.out.push(b'"');
        self.out.extend_from_slice(id.0.as_hyphenated().encode_lower(&mut buf).as_bytes());
        self.out.push(b'"');
    }

    /// A timestamp field, as `crate::timestamp::rfc3339` writes it.
    pub(crate) fn timestamp(&mut self, name: &str, t: &DateTime<Utc>) -> serde_json::Result<()> {
        self.key(name);
        let mut buf = [0u8; crate::timestamp::MAX_LEN];
        match crate::timestamp::format(t, &mut buf) {
            Some(len) => {
                self.out.push(b'"');
                self.out.extend_from_slice(&buf[..len]);
                self.out.push(b'"');
                Ok(())
            }
            None => serde_json::to_writer(&mut *self.out, t),
        }
    }

    /// Any other field, through its `Serialize`.
    pub(crate) fn value<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> serde_json::Result<()> {
        self.key(name);
        serde_json::to_writer(&mut *self.out, value)
    }

    /// Close the object.
    pub(crate) fn end(self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use chrono::TimeZone;
    use serde_json::json;

    use crate::backend::{Progress, TaskFailure, TaskState, TaskStatus};
    use crate::canvas::Continuation;
    use crate::envelope::Envelope;
    use crate::task::Backoff;

    fn same_as_serde_envelope(env: &Envelope) {
        let mut ours = Vec::new();
        env.write_json(&mut ours).unwrap();
        assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(env).unwrap());
    }

    fn same_as_serde_status(s: &TaskStatus) {
        let mut ours = Vec::new();
        s.write_json(&mut ours).unwrap();
        assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(s).unwrap());
    }

    #[test]
    fn envelopes_are_written_as_serde_writes_them() {
        let plain = Envelope::new("emails.send", json!({"to": "a@b.c", "n": 1}));
        same_as_serde_envelope(&plain);
        // Every field set (a struct literal, so a new field fails to compile here until it is
        // written and checked too), with strings that need escaping and a far-off year.
        let at = chrono::Utc.with_ymd_and_hms(2026, 12, 1, 15, 4, 5).unwrap();
        let full = Envelope {
            v: 1,
            id: crate::TaskId::new(),
            task: "odd \"name\"\\\n".to_owned(),
            args: json!({"text": "tab\there", "list": [1, 2.5, null]}),
            headers: BTreeMap::from([("traceparent".to_owned(), "00-ab-cd-01".to_owned())]),
            meta: serde_json::Map::from_iter([("tenant".to_owned(), json!("acme"))]),
            queue: "q\u{1}".to_owned(),
            priority: 9,
            attempt: 3,
            max_retries: u32::MAX,
            not_before: Some(at + chrono::Duration::nanoseconds(1)),
            expires: Some(chrono::Utc.with_ymd_and_hms(12345, 1, 1, 0, 0, 0).unwrap()),
            soft_time_limit: Some(Duration::from_millis(1500)),
            hard_time_limit: Some(Duration::from_secs(u64::MAX)),
            visibility_timeout: Some(Duration::from_secs(30)),
            backoff: Some(Backoff::default()),
            parent_id: Some(crate::TaskId::new()),
            root_id: Some(crate::TaskId::new()),
            ignore_result: true,
            created_at: at,
            canvas: Some(Box::new(Continuation::Done)),
        };
        same_as_serde_envelope(&full);
        let back: Envelope = serde_json::from_slice(&full.to_json().unwrap()).unwrap();
        assert_eq!(back.task, full.task);
        assert_eq!(back.expires, full.expires);
    }

    #[test]
    fn status_records_are_written_as_serde_writes_them() {
        let env = Envelope::new("t", json!({}));
        for state in [
            TaskState::Queued,
            TaskState::Running,
            TaskState::Retried,
            TaskState::Succeeded,
            TaskState::Failed,
            TaskState::Cancelled,
        ] {
            same_as_serde_status(&TaskStatus::for_envelope(&env, state));
        }
        let at = chrono::Utc.with_ymd_and_hms(2026, 12, 1, 15, 4, 5).unwrap();
        let full = TaskStatus {
            id: crate::TaskId::new(),
            task: "t\"".to_owned(),
            state: TaskState::Failed,
            result: Some(json!({"sum": 3})),
            error: Some(TaskFailure::new("boom", "line\nbreak", false)),
            attempt: 7,
            queued_at: Some(at),
            started_at: Some(at + chrono::Duration::microseconds(5)),
            finished_at: Some(at + chrono::Duration::milliseconds(9)),
            updated_at: at,
            worker_id: Some("worker-1".into()),
            progress: Some(Progress { fraction: 0.5, data: Some(json!("half")), at }),
            meta: serde_json::Map::from_iter([("k".to_owned(), json!([1]))]),
            parent_id: Some(crate::TaskId::new()),
            root_id: Some(crate::TaskId::new()),
        };
        same_as_serde_status(&full);
    }
}
