//! In-memory broker: the reference implementation of the broker contract, for tests, demos and
//! single-process apps. Nothing survives the process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BoxFuture, Broker, ConsumeRequest, DeadLetter, Delivery, QueueCounts, Receipt};
use crate::envelope::{Envelope, MAX_PRIORITY};
use crate::error::Result;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

const LEVELS: usize = MAX_PRIORITY as usize + 1;

/// In-memory broker. Clones share the same store.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Woken whenever something becomes ready.
    ready: Notify,
    /// Woken whenever a broadcast message is published.
    broadcast: Notify,
}

#[derive(Default)]
struct State {
    queues: HashMap<Arc<str>, QueueState>,
    in_flight: HashMap<u64, InFlight>,
    /// Lease deadlines, so expired deliveries are found without scanning.
    leases: BTreeMap<(Instant, u64), ()>,
    next_tag: u64,
    next_seq: u64,
    next_dead: u64,
    channels: HashMap<String, HashMap<String, VecDeque<Envelope>>>,
}

#[derive(Default)]
struct QueueState {
    /// One FIFO per priority level.
    ready: [VecDeque<Ready>; LEVELS],
    /// Keyed by due instant, then publish order.
    delayed: BTreeMap<(Instant, u64), Arc<Envelope>>,
    dead: VecDeque<DeadLetter>,
    in_flight: u64,
}

struct Ready {
    envelope: Arc<Envelope>,
    deliveries: u32,
}

struct InFlight {
    envelope: Arc<Envelope>,
    queue: Arc<str>,
    deadline: Instant,
    deliveries: u32,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> Self {
        Self::default()
    }
}

impl QueueState {
    fn pending(&self) -> u64 {
        self.ready.iter().map(|q| q.len() as u64).sum()
    }
}

impl State {
    fn queue_mut(&mut self, name: &str) -> &mut QueueState {
        // Reuse the stored `Arc<str>` key so the hot path does not allocate.
        let key = match self.queues.get_key_value(name) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(name),
        };
        self.queues.entry(key).or_default()
    }

    fn insert(&mut self, envelope: Envelope, deliveries: u32, now: Instant) {
        let delay = envelope.delay_from(Utc::now());
        let seq = self.next_seq;
        self.next_seq += 1;
        let q = self.queue_mut(&envelope.queue);
        if delay.is_zero() {
            let level = usize::from(envelope.priority.min(MAX_PRIORITY));
            q.ready[level].push_back(Ready { envelope: Arc::new(envelope), deliveries });
        } else {
            q.delayed.insert((now + delay, seq), Arc::new(envelope));
        }
    }

    /// Move expired leases back to ready; returns whether any moved.
    fn reclaim(&mut self, now: Instant) -> bool {
        let mut moved = false;
        while let Some((&(deadline, tag), _)) = self.leases.first_key_value() {
            if deadline > now {
                break;
            }
            self.leases.remove(&(deadline, tag));
            if let Some(f) = self.in_flight.remove(&tag) {
                let q = self.queues.entry(f.queue).or_default();
                q.in_flight = q.in_flight.saturating_sub(1);
                let level = usize::from(f.envelope.priority.min(MAX_PRIORITY));
                // Redelivered work goes first within its priority: it is the oldest.
                q.ready[level].push_front(Ready { envelope: f.envelope, deliveries: f.deliveries });
                moved = true;
            }
        }
        moved
    }

    fn promote(&mut self, queue: &str, now: Instant) {
        if let Some(q) = self.queues.get_mut(queue) {
            while let Some(entry) = q.delayed.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let envelope = entry.remove();
                let level = usize::from(envelope.priority.min(MAX_PRIORITY));
                q.ready[level].push_back(Ready { envelope, deliveries: 0 });
            }
        }
    }

    fn take(&mut self, req: &ConsumeRequest, now: Instant) -> Vec<Delivery> {
        let mut out = Vec::new();
        for level in (0..LEVELS).rev() {
            for name in &req.queues {
                let Some((qname, _)) = self.queues.get_key_value(name.as_str()) else {
                    continue;
                };
                let qname = Arc::clone(qname);
                let Some(q) = self.queues.get_mut(&qname) else {
                    continue;
                };
                while out.len() < req.max {
                    let Some(ready) = q.ready[level].pop_front() else {
                        break;
                    };
                    self.next_tag += 1;
                    let tag = self.next_tag;
                    let lease = ready.envelope.visibility_timeout.unwrap_or(req.lease);
                    let deadline = now + lease;
                    q.in_flight += 1;
                    out.push(Delivery {
                        envelope: Arc::clone(&ready.envelope),
                        // The lease number identifies the delivery; no tag string is needed.
                        receipt: Receipt {
                            queue: Arc::clone(&qname),
                            tag: String::new(),
                            lease: tag,
                            held_until: None,
                        },
                        redelivered: ready.deliveries > 0,
                    });
                    self.leases.insert((deadline, tag), ());
                    self.in_flight.insert(
                        tag,
                        InFlight {
                            envelope: ready.envelope,
                            queue: Arc::clone(&qname),
                            deadline,
                            deliveries: ready.deliveries + 1,
                        },
                    );
                }
                if out.len() >= req.max {
                    return out;
                }
            }
        }
        out
    }

    /// Earliest instant at which something may become ready for `queues`.
    fn next_due(&self, queues: &[String]) -> Option<Instant> {
        let lease = self.leases.first_key_value().map(|(&(d, _), _)| d);
        let delayed = queues
            .iter()
            .filter_map(|q| self.queues.get(q.as_str()))
            .filter_map(|q| q.delayed.first_key_value().map(|(&(d, _), _)| d))
            .min();
        match (lease, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Remove a live delivery; `None` when its lease was lost.
    fn finish(&mut self, receipt: &Receipt) -> Option<InFlight> {
        let f = self.in_flight.remove(&receipt.lease)?;
        self.leases.remove(&(f.deadline, receipt.lease));
        if let Some(q) = self.queues.get_mut(&f.queue) {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        Some(f)
    }

    fn push_dead(&mut self, queue: &str, dead: DeadLetterParts) {
        self.next_dead += 1;
        let id = self.next_dead.to_string();
        let q = self.queue_mut(queue);
        q.dead.push_back(DeadLetter {
            id,
            queue: queue.to_owned(),
            reason: dead.reason,
            detail: dead.detail,
            envelope: dead.envelope,
            raw: None,
            dead_at: Utc::now(),
        });
    }
}

struct DeadLetterParts {
    reason: String,
    detail: String,
    envelope: Option<Envelope>,
}

impl Broker for MemoryBroker {
    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if envelopes.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            {
                let mut st = self.inner.state.lock();
                for env in envelopes {
                    st.insert(env, 0, now);
                }
            }
            self.inner.ready.notify_waiters();
            Ok(())
        })
    }

    fn consume<'a>(&'a self, req: &'a ConsumeRequest) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        Box::pin(async move {
            let give_up = Instant::now() + req.wait;
            loop {
                let notified = self.inner.ready.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let wake_at = {
                    let mut st = self.inner.state.lock();
                    let now = Instant::now();
                    st.reclaim(now);
                    for q in &req.queues {
                        st.promote(q, now);
                    }
                    let out = st.take(req, now);
                    if !out.is_empty() || req.max == 0 {
                        return Ok(out);
                    }
                    st.next_due(&req.queues).map_or(give_up, |d| d.min(give_up))
                };
                if Instant::now() >= give_up {
                    return Ok(Vec::new());
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(wake_at) => {}
                }
            }
        })
    }

    fn ack(&self, receipts: Vec<Receipt>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut st = self.inner.state.lock();
            for r in &receipts {
                st.finish(r);
            }
            Ok(())
        })
    }

    fn nack(&self, receipt: Receipt, requeue: bool) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let found = {
                let mut st = self.inner.state.lock();
                match st.finish(&receipt) {
                    Some(f) if requeue => {
                        let q = st.queues.entry(f.queue).or_default();
                        let level = usize::from(f.envelope.priority.min(MAX_PRIORITY));
                        q.ready[level].push_front(Ready { envelope: f.envelope, deliveries: f.deliveries });
                        true
                    }
                    Some(_) => true,
                    None => false,
                }
            };
            if found && requeue {
                self.inner.ready.notify_waiters();
            }
            Ok(found)
        })
    }

    fn retry(&self, receipt: Receipt, envelope: Envelope) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let found = {
                let mut st = self.inner.state.lock();
                if st.finish(&receipt).is_some() {
                    st.insert(envelope, 0, Instant::now());
                    true
                } else {
                    false
                }
            };
            if found {
                self.inner.ready.notify_waiters();
            }
            Ok(found)
        })
    }

    fn extend_lease<'a>(&'a self, receipt: &'a Receipt, lease: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut guard = self.inner.state.lock();
            let st = &mut *guard;
            let now = Instant::now();
            // A lease that already expired is lost even if nobody reclaimed it yet.
            let Some(f) = st.in_flight.get_mut(&receipt.lease) else {
                return Ok(false);
            };
            if f.deadline <= now {
                return Ok(false);
            }
            st.leases.remove(&(f.deadline, receipt.lease));
            f.deadline = now + lease;
            st.leases.insert((f.deadline, receipt.lease), ());
            Ok(true)
        })
    }

    fn dead_letter(
        &self,
        receipt: Receipt,
        envelope: Envelope,
        reason: &str,
        detail: String,
    ) -> BoxFuture<'_, Result<bool>> {
        let reason = reason.to_owned();
        Box::pin(async move {
            let mut st = self.inner.state.lock();
            let Some(f) = st.finish(&receipt) else {
                return Ok(false);
            };
            drop(f);
            st.push_dead(&receipt.queue, DeadLetterParts { reason, detail, envelope: Some(envelope) });
            Ok(true)
        })
    }

    fn dlq_list<'a>(
        &'a self,
        queue: &'a str,
        offset: usize,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>>> {
        Box::pin(async move {
            let st = self.inner.state.lock();
            Ok(st
                .queues
                .get(queue)
                .map(|q| q.dead.iter().skip(offset).take(limit).cloned().collect())
                .unwrap_or_default())
        })
    }

    fn dlq_get<'a>(&'a self, queue: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>>> {
        Box::pin(async move {
            let st = self.inner.state.lock();
            Ok(st.queues.get(queue).and_then(|q| q.dead.iter().find(|d| d.id == id).cloned()))
        })
    }

    fn dlq_replay<'a>(
        &'a self,
        queue: &'a str,
        ids: &'a [String],
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let replayed = {
                let mut st = self.inner.state.lock();
                let Some(q) = st.queues.get_mut(queue) else {
                    return Ok(0);
                };
                let mut taken = Vec::new();
                q.dead.retain_mut(|d| {
                    let wanted = ids.is_empty() || ids.contains(&d.id);
                    match (wanted, d.envelope.take()) {
                        (true, Some(env)) => {
                            taken.push(env);
                            false
                        }
                        (_, env) => {
                            d.envelope = env;
                            true
                        }
                    }
                });
                let now = Instant::now();
                let n = taken.len();
                for mut env in taken {
                    env.attempt = 0;
                    env.not_before =
                        delay.and_then(|d| chrono::Duration::from_std(d).ok()).map(|d| Utc::now() + d);
                    st.insert(env, 0, now);
                }
                n
            };
            if replayed > 0 {
                self.inner.ready.notify_waiters();
            }
            Ok(replayed)
        })
    }

    fn dlq_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let mut st = self.inner.state.lock();
            Ok(st.queues.get_mut(queue).map(|q| q.dead.drain(..).count()).unwrap_or(0))
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let mut st = self.inner.state.lock();
            let Some(q) = st.queues.get_mut(queue) else {
                return Ok(0);
            };
            let n = usize::try_from(q.pending()).unwrap_or(usize::MAX) + q.delayed.len();
            q.ready.iter_mut().for_each(VecDeque::clear);
            q.delayed.clear();
            Ok(n)
        })
    }

    fn counts<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueCounts>> {
        Box::pin(async move {
            let mut st = self.inner.state.lock();
            st.reclaim(Instant::now());
            Ok(st
                .queues
                .get(queue)
                .map(|q| QueueCounts {
                    pending: q.pending(),
                    delayed: q.delayed.len() as u64,
                    in_flight: q.in_flight,
                    dead: q.dead.len() as u64,
                })
                .unwrap_or_default())
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut st = self.inner.state.lock();
            st.channels.entry(channel.to_owned()).or_default().entry(subscriber.to_owned()).or_default();
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut st = self.inner.state.lock();
            if let Some(subs) = st.channels.get_mut(channel) {
                subs.remove(subscriber);
            }
            Ok(())
        })
    }

    fn broadcast<'a>(&'a self, channel: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            {
                let mut st = self.inner.state.lock();
                if let Some(subs) = st.channels.get_mut(channel) {
                    for inbox in subs.values_mut() {
                        inbox.push_back(envelope.clone());
                    }
                }
            }
            self.inner.broadcast.notify_waiters();
            Ok(())
        })
    }

    fn consume_broadcast<'a>(
        &'a self,
        channel: &'a str,
        subscriber: &'a str,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Vec<Envelope>>> {
        Box::pin(async move {
            let give_up = Instant::now() + wait;
            loop {
                let notified = self.inner.broadcast.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let mut st = self.inner.state.lock();
                    if let Some(inbox) = st.channels.get_mut(channel).and_then(|s| s.get_mut(subscriber)) {
                        let n = inbox.len().min(max);
                        if n > 0 {
                            return Ok(inbox.drain(..n).collect());
                        }
                    }
                }
                if Instant::now() >= give_up {
                    return Ok(Vec::new());
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(give_up) => {}
                }
            }
        })
    }
}
