//! The coordination-store contract on SQLite.

stem_tests::store_contract_tests!(stem_tests::sqlite::SqliteStoreHarness::new());
