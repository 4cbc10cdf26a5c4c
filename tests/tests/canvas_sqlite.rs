//! The canvas checks on the SQLite broker and backend (a database file per check).

stem_tests::canvas_tests!(stem_tests::sqlite::SqliteHarness::new());
