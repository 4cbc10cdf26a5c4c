//! The canvas checks on the Postgres broker and backend (needs PostgreSQL: see
//! `stem_tests::postgres`).

stem_tests::canvas_tests!(stem_tests::postgres::PgHarness::new());
