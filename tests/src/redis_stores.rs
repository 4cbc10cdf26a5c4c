//! The Redis coordination stores under the store contract.

use std::sync::Arc;

use stem::broker::BoxFuture;
use stem_adapters::redis::RedisStores;

use crate::redis::RedisHarness;
use crate::{StoreHarness, Stores};

/// Opens Redis stores; each namespace is a key prefix.
#[derive(Default)]
pub struct RedisStoreHarness {
    redis: RedisHarness,
}

impl RedisStoreHarness {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StoreHarness for RedisStoreHarness {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn stores(&self, namespace: &str) -> BoxFuture<'_, Stores> {
        let namespace = namespace.to_owned();
        Box::pin(async move {
            let stores = Arc::new(RedisStores::new(self.redis.connection().await, &namespace));
            Stores {
                locks: stores.clone(),
                revokes: stores.clone(),
                rate_limiter: stores.clone(),
                unique: stores,
            }
        })
    }
}
