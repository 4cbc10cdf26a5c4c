//! The canvas checks on the in-memory broker and backend.

stem_tests::canvas_tests!(stem_tests::MemoryHarness::new());
