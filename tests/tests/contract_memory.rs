//! The adapter contract suite on the in-memory broker and backend.

stem_tests::contract_tests!(stem_tests::MemoryHarness::new());
