//! `connect` by URL: supported schemes, clear errors, masked passwords, no hangs.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use stem_adapters::connect;

fn err_of(r: Result<stem_adapters::Adapters, stem::Error>) -> stem::Error {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn memory_url_gives_working_adapters() {
    let a = connect("memory://").await.unwrap();
    assert_eq!(a.broker.counts("q").await.unwrap().pending, 0);
}

#[tokio::test]
async fn unknown_scheme_names_the_url_with_the_password_masked() {
    let e = err_of(connect("foo://x").await);
    assert!(matches!(e, stem::Error::Config(_)), "{e:?}");
    assert!(e.to_string().contains("foo://x"), "{e}");

    let e = err_of(connect("foo://admin:hunter2@x/0").await).to_string();
    assert!(e.contains("foo://admin:***@x/0"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
}

#[cfg(not(feature = "redis"))]
#[tokio::test]
async fn redis_without_the_feature_says_which_feature_to_enable() {
    let e = err_of(connect("redis://:pw@127.0.0.1:6379").await).to_string();
    assert!(e.contains("`redis` feature"), "{e}");
    assert!(e.contains("redis://:***@127.0.0.1:6379") && !e.contains("pw@"), "{e}");
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn unreachable_redis_fails_fast_naming_the_masked_url() {
    use std::time::{Duration, Instant};
    for url in ["redis://user:s3cret@nohost:1/0", "redis://:s3cret@127.0.0.1:1"] {
        let t0 = Instant::now();
        let e = err_of(connect(url).await).to_string();
        assert!(t0.elapsed() < Duration::from_secs(8), "{url}: took {:?}", t0.elapsed());
        assert!(e.contains("cannot connect to Redis"), "{e}");
        assert!(e.contains(":***@"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }
}
