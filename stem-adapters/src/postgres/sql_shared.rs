//! Pieces shared by the SQL adapters (Postgres and SQLite): URL splitting, status batches,
//! record encoding and in-process wake-ups.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use stem::TaskId;
use stem::backend::{Progress, TaskStatus};
use stem::broker::DeadLetter;
use stem::envelope::Envelope;
use tokio::sync::Notify;

/// Split `ns=` off an SQL adapter URL: returns the URL for the driver and the namespace.
pub(crate) fn split_namespace(url: &str) -> Result<(String, String), stem::Error> {
    let masked = crate::url::mask(url);
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (location, query) = match before_fragment.split_once('?') {
        Some((l, q)) => (l, Some(q)),
        None => (before_fragment, None),
    };
    let mut namespace = None;
    let mut kept = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("ns", value)) => namespace = Some(value.to_owned()),
            None if pair == "ns" => {
                return Err(stem::Error::Config(format!(
                    "`{masked}`: the `ns` parameter needs a value (?ns=name)"
                )));
            }
            _ => kept.push(pair),
        }
    }
    let namespace = namespace.unwrap_or_else(|| crate::url::DEFAULT_NAMESPACE.to_owned());
    if namespace.is_empty() || namespace.len() > 58 {
        return Err(stem::Error::Config(format!(
            "`{masked}`: namespace `{namespace}` must be 1 to 58 characters"
        )));
    }
    if let Some(c) = namespace.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(stem::Error::Config(format!(
            "`{masked}`: namespace `{namespace}` contains `{c}` (allowed: letters, digits, `-`, `_`, `.`)"
        )));
    }
    let mut driver = location.to_owned();
    if !kept.is_empty() {
        driver.push('?');
        driver.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        driver.push('#');
        driver.push_str(f);
    }
    Ok((driver, namespace))
}

/// Collapse a batch to one record per task, applying [`TaskStatus::may_replace`] in order
/// (the rule is a total preorder on `(attempt, terminal)`, so folding the batch first and
/// then comparing with the stored record gives the same result as applying each in turn).
/// Progress carries over from a replaced record that had some.
pub(crate) fn fold_statuses(statuses: Vec<TaskStatus>) -> Vec<TaskStatus> {
    if statuses.len() < 2 {
        return statuses;
    }
    let mut index: HashMap<TaskId, usize> = HashMap::with_capacity(statuses.len());
    let mut out: Vec<TaskStatus> = Vec::with_capacity(statuses.len());
    for mut s in statuses {
        match index.get(&s.id) {
            Some(&i) => {
                if s.may_replace(&out[i]) {
                    if s.progress.is_none() {
                        s.progress = out[i].progress.take();
                    }
                    out[i] = s;
                }
            }
            None => {
                index.insert(s.id, out.len());
                out.push(s);
            }
        }
    }
    out
}

/// A status record as stored: JSON without its progress (kept in its own column).
pub(crate) fn encode_status(status: &TaskStatus) -> Result<String, stem::Error> {
    if status.progress.is_none() {
        return serde_json::to_string(status).map_err(stem::Error::backend);
    }
    let mut copy = status.clone();
    copy.progress = None;
    serde_json::to_string(&copy).map_err(stem::Error::backend)
}

/// Read a stored status record and its progress.
pub(crate) fn decode_status(record: &str, progress: Option<&str>) -> Result<TaskStatus, stem::Error> {
    let mut status: TaskStatus = serde_json::from_str(record)
        .map_err(|e| stem::Error::backend(format!("stored status record is unreadable: {e}")))?;
    if let Some(p) = progress {
        let p: Progress = serde_json::from_str(p)
            .map_err(|e| stem::Error::backend(format!("stored progress is unreadable: {e}")))?;
        status.progress = Some(p);
    }
    Ok(status)
}

/// A dead-letter row as the broker API shows it: the envelope when it decodes, else the raw
/// text.
pub(crate) fn dead_letter(
    id: i64,
    queue: String,
    reason: String,
    detail: String,
    payload: String,
    dead_at: DateTime<Utc>,
) -> DeadLetter {
    let (envelope, raw) = match Envelope::from_json(payload.as_bytes()) {
        Ok(env) => (Some(env), None),
        Err(_) => (None, Some(payload)),
    };
    DeadLetter { id: id.to_string(), queue, reason, detail, envelope, raw, dead_at }
}

/// In-process wake-ups: consumers wait on `jobs`, broadcast consumers on `broadcast`, result
/// waiters on one [`Notify`] per task id.
#[derive(Default)]
pub(crate) struct Hub {
    pub(crate) jobs: Notify,
    pub(crate) broadcast: Notify,
    waiters: Mutex<HashMap<TaskId, (Arc<Notify>, usize)>>,
}

impl Hub {
    /// Register interest in `id`; drop the guard to unregister.
    pub(crate) fn watch(self: &Arc<Self>, id: TaskId) -> Watch {
        let notify = {
            let mut w = self.waiters.lock();
            let entry = w.entry(id).or_insert_with(|| (Arc::new(Notify::new()), 0));
            entry.1 += 1;
            Arc::clone(&entry.0)
        };
        Watch { hub: Arc::clone(self), id, notify }
    }

    /// Wake the waiters of `id`.
    pub(crate) fn task_done(&self, id: TaskId) {
        if let Some((n, _)) = self.waiters.lock().get(&id) {
            n.notify_waiters();
        }
    }

    /// Whether anybody waits on a task in this process.
    pub(crate) fn has_waiters(&self) -> bool {
        !self.waiters.lock().is_empty()
    }

    /// Wake everybody (after a reconnect, when notifications may have been missed).
    pub(crate) fn wake_all(&self) {
        self.jobs.notify_waiters();
        self.broadcast.notify_waiters();
        for (n, _) in self.waiters.lock().values() {
            n.notify_waiters();
        }
    }
}

/// Interest in one task's completion.
pub(crate) struct Watch {
    hub: Arc<Hub>,
    id: TaskId,
    pub(crate) notify: Arc<Notify>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut w = self.hub.waiters.lock();
        if let Some(entry) = w.get_mut(&self.id) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                w.remove(&self.id);
            }
        }
    }
}

/// Milliseconds of a duration, saturating.
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
