//! The coordination-store contract on the in-memory stores.

stem_tests::store_contract_tests!(stem_tests::MemoryStoreHarness::new());
