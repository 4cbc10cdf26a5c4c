//! The producer: turns typed signatures (or a name plus JSON) into envelopes, records them as
//! queued and publishes them.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::backend::{ResultBackend, TaskState, TaskStatus};
use crate::broker::Broker;
use crate::envelope::{DEFAULT_QUEUE, Envelope, MAX_PRIORITY};
use crate::error::{Error, Result};
use crate::result::TaskHandle;
use crate::signals::{AfterPublish, BeforePublish, Signals};
use crate::store::{Revocation, RevokeStore, UniqueStore};
use crate::task::{EnqueueOptions, Registry, Signature, Task, TaskArgs, TaskOptions};

/// The producer: enqueue tasks and get handles to their results. Cheap to clone.
#[derive(Clone)]
pub struct Stem {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    signals: Signals,
    default_queue: String,
    registry: Option<Arc<Registry>>,
    unique: Option<Arc<dyn UniqueStore>>,
    revokes: Option<Arc<dyn RevokeStore>>,
    max_payload_bytes: usize,
}

/// Default limit of a task's encoded arguments plus metadata ([`StemBuilder::max_payload_bytes`]).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// Counts bytes written, to size a payload without keeping it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How long a revoke is remembered (longer than any sensible task lifetime).
pub const REVOKE_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Builder for [`Stem`].
pub struct StemBuilder {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    signals: Signals,
    default_queue: String,
    registry: Option<Arc<Registry>>,
    unique: Option<Arc<dyn UniqueStore>>,
    revokes: Option<Arc<dyn RevokeStore>>,
    max_payload_bytes: usize,
}

impl StemBuilder {
    /// Refuse tasks whose encoded arguments plus metadata exceed `bytes` (default 8 MiB) with
    /// [`Error::PayloadTooLarge`]; large data belongs in storage, passed by reference.
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// Listeners for `BeforePublish` / `AfterPublish` (shared with a worker if you pass the same).
    pub fn signals(mut self, signals: Signals) -> Self {
        self.signals = signals;
        self
    }

    /// Queue for tasks that name none (default `"default"`).
    pub fn default_queue(mut self, queue: impl Into<String>) -> Self {
        self.default_queue = queue.into();
        self
    }

    /// Know the registered tasks: `enqueue_raw` then applies their defaults and refuses
    /// unknown names.
    pub fn registry(mut self, registry: Arc<Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Store for `unique_for` claims (without one, `unique_for` is an error at enqueue).
    pub fn unique_store(mut self, store: Arc<dyn UniqueStore>) -> Self {
        self.unique = Some(store);
        self
    }

    /// Store for [`Stem::revoke`] (share it with the workers).
    pub fn revoke_store(mut self, store: Arc<dyn RevokeStore>) -> Self {
        self.revokes = Some(store);
        self
    }

    /// Finish.
    pub fn build(self) -> Stem {
        Stem {
            inner: Arc::new(Inner {
                broker: self.broker,
                backend: self.backend,
                signals: self.signals,
                default_queue: self.default_queue,
                registry: self.registry,
                unique: self.unique,
                revokes: self.revokes,
                max_payload_bytes: self.max_payload_bytes,
            }),
        }
    }
}

fn after(now: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .map_or(DateTime::<Utc>::MAX_UTC, |d| now.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC))
}

impl Stem {
    /// A producer on `broker` and `backend`.
    pub fn new(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>) -> Self {
        Self::builder(broker, backend).build()
    }

    /// Configure a producer.
    pub fn builder(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>) -> StemBuilder {
        StemBuilder {
            broker,
            backend,
            signals: Signals::new(),
            default_queue: DEFAULT_QUEUE.to_owned(),
            registry: None,
            unique: None,
            revokes: None,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// The result backend.
    pub fn backend(&self) -> &Arc<dyn ResultBackend> {
        &self.inner.backend
    }

    /// The signal listeners.
    pub fn signals(&self) -> &Signals {
        &self.inner.signals
    }

    /// Queue used when neither task nor call names one.
    pub fn default_queue(&self) -> &str {
        &self.inner.default_queue
    }

    /// Build the envelope for a task call: the task's defaults, overridden by the call's options.
    pub fn envelope<T: Task>(&self, sig: &Signature<T>) -> Result<Envelope> {
        let args = sig.args.to_json(T::PARAMS)?;
        Ok(self.build_envelope(T::NAME, args, &T::OPTIONS, &sig.options))
    }

    pub(crate) fn build_envelope(
        &self,
        name: &str,
        args: serde_json::Value,
        task: &TaskOptions,
        call: &EnqueueOptions,
    ) -> Envelope {
        let now = Utc::now();
        let mut env = Envelope::new(name, args);
        env.created_at = now;
        if let Some(id) = call.task_id {
            env.id = id;
        }
        env.queue = call
            .queue
            .clone()
            .or_else(|| task.queue.map(str::to_owned))
            .unwrap_or_else(|| self.inner.default_queue.clone());
        env.priority = call.priority.unwrap_or(task.priority).min(MAX_PRIORITY);
        env.max_retries = call.retries.unwrap_or(task.retries);
        env.not_before = call.eta.or_else(|| call.countdown.map(|d| after(now, d)));
        env.expires = call.expires_at.or_else(|| call.expires_in.or(task.expires).map(|d| after(now, d)));
        env.soft_time_limit = call.soft_time_limit.or(task.soft_time_limit);
        env.hard_time_limit = call.hard_time_limit.or(task.hard_time_limit);
        env.visibility_timeout = call.visibility_timeout.or(task.visibility_timeout);
        env.backoff = call.backoff;
        env.headers.clone_from(&call.headers);
        env.meta.clone_from(&call.meta);
        env.parent_id = call.parent_id;
        env.root_id = call.root_id;
        env.ignore_result = task.ignore_result;
        env
    }

    /// Enqueue one typed task call.
    pub async fn enqueue<T: Task>(&self, sig: Signature<T>) -> Result<TaskHandle<T::Output>> {
        let env = self.envelope(&sig)?;
        let window = sig.options.unique_for.or(T::OPTIONS.unique_for);
        if let Some(existing) = self.claim_unique(&env, window).await? {
            return Ok(TaskHandle::new(existing, Arc::clone(&self.inner.backend)));
        }
        let id = env.id;
        self.publish(vec![env]).await?;
        Ok(TaskHandle::new(id, Arc::clone(&self.inner.backend)))
    }

    /// For a unique call, claim its key; returns the id of the task that already holds it.
    async fn claim_unique(
        &self,
        env: &Envelope,
        window: Option<std::time::Duration>,
    ) -> Result<Option<crate::TaskId>> {
        let Some(window) = window else { return Ok(None) };
        let Some(store) = &self.inner.unique else {
            return Err(Error::Config(format!(
                "task `{}` asks for unique_for but the producer has no unique store",
                env.task
            )));
        };
        // serde_json writes object keys in sorted order, so equal arguments give equal keys.
        let key = format!("{}:{}:{}", env.queue, env.task, serde_json::to_string(&env.args)?);
        store.claim(&key, env.id, window).await
    }

    /// Revoke a task: it will never start, and with `terminate` a worker running it cancels it.
    /// Needs a revoke store shared with the workers.
    pub async fn revoke(&self, id: crate::TaskId, terminate: bool, reason: impl Into<String>) -> Result<()> {
        let Some(store) = &self.inner.revokes else {
            return Err(Error::Config("the producer has no revoke store".to_owned()));
        };
        let revocation = Revocation { task_id: id, terminate, reason: reason.into(), at: Utc::now() };
        store.revoke(revocation, REVOKE_TTL).await
    }

    /// Enqueue many calls of one task in one batch.
    pub async fn enqueue_many<T: Task>(
        &self,
        sigs: impl IntoIterator<Item = Signature<T>>,
    ) -> Result<Vec<TaskHandle<T::Output>>> {
        let envs = sigs.into_iter().map(|s| self.envelope(&s)).collect::<Result<Vec<_>>>()?;
        let handles = envs.iter().map(|e| TaskHandle::new(e.id, Arc::clone(&self.inner.backend))).collect();
        self.publish(envs).await?;
        Ok(handles)
    }

    /// Enqueue a task by name with JSON arguments (an object keyed by parameter name).
    ///
    /// With a registry (see [`StemBuilder::registry`]) the task's defaults apply and an unknown
    /// name is an error here; without one, the envelope is sent as is and a worker that does
    /// not know the name dead-letters it as `unregistered-task`.
    pub async fn enqueue_raw(
        &self,
        name: &str,
        args: serde_json::Value,
        options: EnqueueOptions,
    ) -> Result<TaskHandle<serde_json::Value>> {
        if !args.is_object() {
            return Err(Error::Args(crate::task::ArgsError::NotAnObject(match args {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Null => "null",
                _ => "a scalar",
            })));
        }
        let defaults = match &self.inner.registry {
            Some(reg) => reg.get(name).ok_or_else(|| Error::UnknownTask(name.to_owned()))?.options,
            None => TaskOptions::new(),
        };
        let env = self.build_envelope(name, args, &defaults, &options);
        if let Some(existing) = self.claim_unique(&env, options.unique_for.or(defaults.unique_for)).await? {
            return Ok(TaskHandle::new(existing, Arc::clone(&self.inner.backend)));
        }
        let id = env.id;
        self.publish(vec![env]).await?;
        Ok(TaskHandle::new(id, Arc::clone(&self.inner.backend)))
    }

    /// Record envelopes as queued, then publish them in one batch.
    ///
    /// The queued record is written first (or in the same transaction, on adapters that can)
    /// so a fast worker's outcome can never be overwritten by it.
    pub async fn publish(&self, envelopes: Vec<Envelope>) -> Result<()> {
        for env in &envelopes {
            self.check_size(env)?;
        }
        let signals = &self.inner.signals;
        for env in &envelopes {
            signals.emit(|| BeforePublish { envelope: env.clone() });
        }
        let now = Utc::now();
        let statuses: Vec<_> =
            envelopes.iter().map(|e| TaskStatus::for_envelope_at(e, TaskState::Queued, now)).collect();
        let published = signals.is_connected::<AfterPublish>().then(|| envelopes.clone());
        self.inner.broker.record_and_publish(&*self.inner.backend, statuses, envelopes).await?;
        for envelope in published.into_iter().flatten() {
            signals.emit(|| AfterPublish { envelope });
        }
        Ok(())
    }

    /// The registered tasks, when the producer knows them (canvas planning reads defaults).
    pub(crate) fn registry(&self) -> Option<&Arc<Registry>> {
        self.inner.registry.as_ref()
    }

    /// Refuse an envelope whose arguments and metadata exceed the size limit, before anything
    /// is written: a clear error at the call site instead of a broker failure later.
    fn check_size(&self, env: &Envelope) -> Result<()> {
        let limit = self.inner.max_payload_bytes;
        let mut counter = ByteCounter(0);
        serde_json::to_writer(&mut counter, &env.args)?;
        serde_json::to_writer(&mut counter, &env.meta)?;
        if counter.0 > limit {
            return Err(Error::PayloadTooLarge { task: env.task.clone(), size: counter.0, limit });
        }
        Ok(())
    }

    /// A handle to an existing task id.
    pub fn handle<T>(&self, id: crate::TaskId) -> TaskHandle<T> {
        TaskHandle::new(id, Arc::clone(&self.inner.backend))
    }
}

impl std::fmt::Debug for Stem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stem").field("default_queue", &self.inner.default_queue).finish_non_exhaustive()
    }
}
