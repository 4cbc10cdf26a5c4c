//! The wire message: what a producer publishes and a broker stores and delivers.
//!
//! An [`Envelope`] is versioned JSON. Arguments travel as a JSON object keyed by parameter
//! name, so any language (or the CLI) can enqueue a task by name.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::task::Backoff;

/// Version of the envelope format written by this crate.
pub const ENVELOPE_VERSION: u32 = 1;

/// The queue used when neither the task nor the call site names one.
pub const DEFAULT_QUEUE: &str = "default";

/// Highest priority; priorities run from 0 (lowest) to 9 (highest).
pub const MAX_PRIORITY: u8 = 9;

/// Identity of one task (a UUIDv7, so ids sort by creation time).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub uuid::Uuid);

impl TaskId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        TaskId(uuid::Uuid::now_v7())
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(TaskId)
    }
}

/// One task as it travels from producer through broker to worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version ([`ENVELOPE_VERSION`]).
    pub v: u32,
    /// Task id; stays the same across retries.
    pub id: TaskId,
    /// Registered task name.
    pub task: String,
    /// Arguments: a JSON object keyed by parameter name.
    pub args: serde_json::Value,
    /// String headers (tracing context, tenant, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Free-form metadata, copied to the status record.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Queue the task is published to.
    pub queue: String,
    /// 0 (lowest) to 9 (highest).
    #[serde(default)]
    pub priority: u8,
    /// 0 for the first run, incremented on each retry.
    #[serde(default)]
    pub attempt: u32,
    /// How many retries are allowed after the first attempt.
    #[serde(default)]
    pub max_retries: u32,
    /// Do not deliver before this instant (ETA / countdown / retry backoff).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timestamp::opt_rfc3339")]
    pub not_before: Option<DateTime<Utc>>,
    /// Never run after this instant; an expired task is recorded as cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timestamp::opt_rfc3339")]
    pub expires: Option<DateTime<Utc>>,
    /// Soft time limit: the task's context is cancelled when it passes.
    #[serde(default, with = "opt_millis", skip_serializing_if = "Option::is_none")]
    pub soft_time_limit: Option<Duration>,
    /// Hard time limit: the task future is dropped and the attempt fails.
    #[serde(default, with = "opt_millis", skip_serializing_if = "Option::is_none")]
    pub hard_time_limit: Option<Duration>,
    /// How long a delivery stays leased before the broker redelivers it.
    #[serde(default, with = "opt_millis", skip_serializing_if = "Option::is_none")]
    pub visibility_timeout: Option<Duration>,
    /// Retry backoff chosen at the call site (else the task's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Task that enqueued this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<TaskId>,
    /// First task of the tree this one belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<TaskId>,
    /// Do not keep a result for this task.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_result: bool,
    /// When the producer created the envelope.
    #[serde(with = "crate::timestamp::rfc3339")]
    pub created_at: DateTime<Utc>,
    /// Canvas: what happens when this task ends for good (next chain step, group member slot,
    /// callbacks). Absent for plain tasks, so envelopes without it still parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canvas: Option<Box<crate::canvas::Continuation>>,
}

impl Envelope {
    /// A new envelope for `task` with `args`, default queue and options.
    pub fn new(task: impl Into<String>, args: serde_json::Value) -> Self {
        Envelope {
            v: ENVELOPE_VERSION,
            id: TaskId::new(),
            task: task.into(),
            args,
            headers: BTreeMap::new(),
            meta: serde_json::Map::new(),
            queue: DEFAULT_QUEUE.to_owned(),
            priority: 0,
            attempt: 0,
            max_retries: 0,
            not_before: None,
            expires: None,
            soft_time_limit: None,
            hard_time_limit: None,
            visibility_timeout: None,
            backoff: None,
            parent_id: None,
            root_id: None,
            ignore_result: false,
            created_at: Utc::now(),
            canvas: None,
        }
    }

    /// Whether the envelope's expiry has passed at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// Time left until `not_before`, or zero when it is due.
    pub fn delay_from(&self, now: DateTime<Utc>) -> Duration {
        self.not_before.and_then(|nb| (nb - now).to_std().ok()).unwrap_or(Duration::ZERO)
    }

    /// Serialize to JSON bytes.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        // Most envelopes (a canvas task's included) fit: one allocation, no regrowth.
        let mut out = Vec::with_capacity(1024);
        self.write_json(&mut out)?;
        Ok(out)
    }

    /// Append the envelope's JSON to `out`: the same bytes as its `Serialize`, written
    /// directly (see `crate::json`). Keep the field order and skip rules of the struct.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut o = crate::json::Object::new(out);
        o.uint("v", self.v.into());
        o.id("id", self.id);
        o.str("task", &self.task)?;
        o.value("args", &self.args)?;
        if !self.headers.is_empty() {
            o.value("headers", &self.headers)?;
        }
        if !self.meta.is_empty() {
            o.value("meta", &self.meta)?;
        }
        o.str("queue", &self.queue)?;
        o.uint("priority", self.priority.into());
        o.uint("attempt", self.attempt.into());
        o.uint("max_retries", self.max_retries.into());
        if let Some(t) = &self.not_before {
            o.timestamp("not_before", t)?;
        }
        if let Some(t) = &self.expires {
            o.timestamp("expires", t)?;
        }
        if let Some(d) = self.soft_time_limit {
            o.uint("soft_time_limit", millis(d));
        }
        if let Some(d) = self.hard_time_limit {
            o.uint("hard_time_limit", millis(d));
        }
        if let Some(d) = self.visibility_timeout {
            o.uint("visibility_timeout", millis(d));
        }
        if let Some(b) = &self.backoff {
            o.value("backoff", b)?;
        }
        if let Some(id) = self.parent_id {
            o.id("parent_id", id);
        }
        if let Some(id) = self.root_id {
            o.id("root_id", id);
        }
        if self.ignore_result {
            o.value("ignore_result", &true)?;
        }
        o.timestamp("created_at", &self.created_at)?;
        if let Some(c) = &self.canvas {
            o.value("canvas", c)?;
        }
        o.end();
        Ok(())
    }

    /// Parse JSON bytes, checking the version.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        // Every delivery goes through here: parse straight into the struct, and only when that
        // fails go through a `Value` to tell apart "not JSON", "other version" and "bad fields".
        let env = match serde_json::from_slice::<Envelope>(bytes) {
            Ok(env) if env.v == ENVELOPE_VERSION => env,
            Ok(env) => return Err(EnvelopeError::UnsupportedVersion(u64::from(env.v))),
            Err(_) => Self::diagnose(bytes)?,
        };
        if !env.args.is_object() {
            return Err(EnvelopeError::Invalid("`args` must be a JSON object".to_owned()));
        }
        Ok(env)
    }

    /// The slow path of [`Envelope::from_json`]: which of its errors applies.
    fn diagnose(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let v = value
            .get("v")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| EnvelopeError::Invalid("missing field `v`".to_owned()))?;
        if v != u64::from(ENVELOPE_VERSION) {
            return Err(EnvelopeError::UnsupportedVersion(v));
        }
        serde_json::from_value(value).map_err(|e| EnvelopeError::Invalid(e.to_string()))
    }
}

/// Why bytes could not be read as an [`Envelope`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Not JSON at all.
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// A version this crate does not understand.
    #[error("unsupported envelope version {0} (this worker reads version {ENVELOPE_VERSION})")]
    UnsupportedVersion(u64),
    /// JSON, but missing or mistyped fields.
    #[error("invalid envelope: {0}")]
    Invalid(String),
}

/// Serde helper: `Option<Duration>` as integer milliseconds.
pub(crate) mod opt_millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// Serde helper: `Duration` as integer milliseconds.
pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let mut env = Envelope::new("math.add", serde_json::json!({"a": 1, "b": 2}));
        env.soft_time_limit = Some(Duration::from_millis(1500));
        env.priority = 7;
        let bytes = env.to_json().unwrap();
        let back = Envelope::from_json(&bytes).unwrap();
        assert_eq!(env, back);
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(matches!(Envelope::from_json(b"not json"), Err(EnvelopeError::NotJson(_))));
        assert!(matches!(Envelope::from_json(br#"{"v": 99}"#), Err(EnvelopeError::UnsupportedVersion(99))));
        assert!(matches!(Envelope::from_json(br#"{"v": 1}"#), Err(EnvelopeError::Invalid(_))));
        assert!(matches!(Envelope::from_json(br#"{"id": 1}"#), Err(EnvelopeError::Invalid(_))));
        // A complete envelope of another version, and one whose `args` is not an object.
        let mut other = Envelope::new("t", serde_json::json!({}));
        other.v = 2;
        let bytes = other.to_json().unwrap();
        assert!(matches!(Envelope::from_json(&bytes), Err(EnvelopeError::UnsupportedVersion(2))));
        let listed = Envelope::new("t", serde_json::json!([1, 2])).to_json().unwrap();
        assert!(matches!(Envelope::from_json(&listed), Err(EnvelopeError::Invalid(_))));
    }

    #[test]
    fn expiry_and_delay() {
        let now = Utc::now();
        let mut env = Envelope::new("t", serde_json::json!({}));
        assert!(!env.is_expired(now));
        env.expires = Some(now - chrono::Duration::seconds(1));
        assert!(env.is_expired(now));
        env.not_before = Some(now + chrono::Duration::seconds(5));
        let d = env.delay_from(now);
        assert!(d > Duration::from_secs(4) && d <= Duration::from_secs(5));
    }
}
