//! The coordination-store contract on Redis.

stem_tests::store_contract_tests!(stem_tests::redis_stores::RedisStoreHarness::new());
