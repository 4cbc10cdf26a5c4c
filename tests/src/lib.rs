//! Stem's adapter contract suite: one set of behaviours, written once, run against every
//! broker and result backend.
//!
//! An adapter plugs in by implementing [`Harness`] and invoking [`contract_tests!`] in a test
//! file. Every check takes a fresh namespace, so tests run in parallel on one server.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod canvas_contract;
pub mod contract;
pub mod postgres;
pub mod redis;
pub mod redis_stores;
pub mod sqlite;
pub mod store_contract;
pub mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stem::backend::ResultBackend;
use stem::broker::{BoxFuture, Broker};
use stem::{MemoryBackend, MemoryBroker};

/// Opens brokers and backends of one adapter. The same namespace must give access to the same
/// stored data (as a second process would see it); different namespaces must be isolated.
pub trait Harness: Send + Sync + 'static {
    /// Adapter name for messages.
    fn name(&self) -> &'static str;
    /// A broker in `namespace`.
    fn broker(&self, namespace: &str) -> BoxFuture<'_, Arc<dyn Broker>>;
    /// A result backend in `namespace` keeping results for `ttl`.
    fn backend(&self, namespace: &str, ttl: Duration) -> BoxFuture<'_, Arc<dyn ResultBackend>>;
}

/// A fresh namespace name.
pub fn namespace() -> String {
    format!("t{}", uuid::Uuid::now_v7().simple())
}

/// The in-memory adapters: one store per namespace, shared by every handle to it.
#[derive(Default)]
pub struct MemoryHarness {
    brokers: Mutex<HashMap<String, MemoryBroker>>,
    backends: Mutex<HashMap<String, MemoryBackend>>,
}

impl MemoryHarness {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Harness for MemoryHarness {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn broker(&self, namespace: &str) -> BoxFuture<'_, Arc<dyn Broker>> {
        let b = self.brokers.lock().unwrap().entry(namespace.to_owned()).or_default().clone();
        Box::pin(async move { Arc::new(b) as Arc<dyn Broker> })
    }

    fn backend(&self, namespace: &str, ttl: Duration) -> BoxFuture<'_, Arc<dyn ResultBackend>> {
        let b = self
            .backends
            .lock()
            .unwrap()
            .entry(namespace.to_owned())
            .or_insert_with(|| MemoryBackend::with_ttl(ttl))
            .clone();
        Box::pin(async move { Arc::new(b) as Arc<dyn ResultBackend> })
    }
}

/// Expands to one `#[tokio::test]` per contract check, each with a fresh `$harness`.
#[macro_export]
macro_rules! contract_tests {
    ($harness:expr) => {
        $crate::contract_tests!(@each $harness;
            publish_consume_ack,
            combined_record_publish_and_ack,
            consume_blocks_until_publish,
            nack_with_and_without_requeue,
            lease_expiry_redelivers,
            stale_receipt_is_refused,
            renewal_keeps_delivery_hidden_without_duplicating,
            delayed_delivery_waits_in_the_store,
            retry_replaces_delivery_with_delayed_envelope,
            priorities_order_delivery,
            queues_are_separate,
            dead_letter_lifecycle,
            purge_drops_pending_and_delayed,
            broadcast_reaches_every_subscriber_once,
            namespaces_are_isolated,
            backend_round_trip_and_fencing,
            backend_ttl_expires_records,
            backend_wait_wakes_on_completion_from_another_handle,
            backend_wait_times_out_with_latest,
            backend_progress_is_stored,
            group_counts_are_idempotent_per_member,
            concurrent_group_records_see_the_group_complete,
            group_record_many_records_each_member_once,
            chord_claim_has_exactly_one_winner,
            heartbeats_expire
        );
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::contract::$name(&harness).await;
            }
        )*
    };
}

/// Opens the coordination stores of one adapter (same namespace rules as [`Harness`]).
pub trait StoreHarness: Send + Sync + 'static {
    /// Adapter name for messages.
    fn name(&self) -> &'static str;
    /// The stores in `namespace`.
    fn stores(&self, namespace: &str) -> BoxFuture<'_, Stores>;
}

/// One adapter's coordination stores.
pub struct Stores {
    pub locks: Arc<dyn stem::store::LockStore>,
    pub revokes: Arc<dyn stem::store::RevokeStore>,
    pub rate_limiter: Arc<dyn stem::store::RateLimiter>,
    pub unique: Arc<dyn stem::store::UniqueStore>,
}

#[derive(Default)]
struct MemoryStores {
    locks: stem::store::MemoryLockStore,
    revokes: stem::store::MemoryRevokeStore,
    rate: stem::store::MemoryRateLimiter,
    unique: stem::store::MemoryUniqueStore,
}

/// In-memory stores, one set per namespace.
#[derive(Default)]
pub struct MemoryStoreHarness {
    sets: Mutex<HashMap<String, Arc<MemoryStores>>>,
}

impl MemoryStoreHarness {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StoreHarness for MemoryStoreHarness {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn stores(&self, namespace: &str) -> BoxFuture<'_, Stores> {
        let set = self.sets.lock().unwrap().entry(namespace.to_owned()).or_default().clone();
        Box::pin(async move {
            Stores {
                locks: Arc::new(set.locks.clone()),
                revokes: Arc::new(set.revokes.clone()),
                rate_limiter: Arc::new(set.rate.clone()),
                unique: Arc::new(set.unique.clone()),
            }
        })
    }
}

/// Expands to one `#[tokio::test]` per store contract check.
#[macro_export]
macro_rules! store_contract_tests {
    ($harness:expr) => {
        $crate::store_contract_tests!(@each $harness;
            lock_ownership_and_expiry,
            revokes_persist_across_handles,
            rate_limit_is_shared_by_two_workers,
            unique_claims_return_the_existing_task,
            revoked_task_never_starts_and_terminate_cancels_a_running_one
        );
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::store_contract::$name(&harness).await;
            }
        )*
    };
}

/// Expands to one `#[tokio::test]` per canvas check, each with a fresh `$harness`.
#[macro_export]
macro_rules! canvas_tests {
    ($harness:expr) => {
        $crate::canvas_tests!(@each $harness;
            group_of_100_returns_results_in_order,
            chain_of_5_passes_results_along,
            chord_of_50_on_4_workers_calls_back_exactly_once,
            failing_chain_step_stops_later_steps,
            failing_chord_member_runs_error_callback_once,
            chain_of_groups,
            chord_inside_a_chain,
            group_of_chains,
            chord_with_chains_in_its_header,
            link_and_link_error,
            immutable_steps_ignore_the_previous_output,
            group_progress_counts_failures,
            duplicate_deliveries_start_nothing_twice,
            failed_member_records_retry_the_delivery,
            shutdown_waits_for_member_bookkeeping,
            canvas_state_expires_with_the_result_ttl,
            progress_reported_by_a_task_stays_on_its_final_record
        );
    };
    (@each $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let harness = $harness;
                $crate::canvas_contract::$name(&harness).await;
            }
        )*
    };
}
