//! The canvas checks on the Redis broker and backend (needs a Redis server: see
//! `stem_tests::redis`).

stem_tests::canvas_tests!(stem_tests::redis::RedisHarness::new());
