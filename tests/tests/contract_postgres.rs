//! The adapter contract suite on the Postgres broker and backend (needs PostgreSQL: see
//! `stem_tests::postgres`).

stem_tests::contract_tests!(stem_tests::postgres::PgHarness::new());
