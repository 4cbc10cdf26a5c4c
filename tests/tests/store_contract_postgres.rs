//! The coordination-store contract on Postgres.

stem_tests::store_contract_tests!(stem_tests::postgres::PgStoreHarness::new());
