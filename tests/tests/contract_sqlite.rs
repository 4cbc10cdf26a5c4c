//! The adapter contract suite on the SQLite broker and backend (a database file per check).

stem_tests::contract_tests!(stem_tests::sqlite::SqliteHarness::new());
