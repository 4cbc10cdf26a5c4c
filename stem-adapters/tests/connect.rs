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

/// `host:port` of the test server (from `STEM_TEST_PG_URL`, default `127.0.0.1:5432`).
#[cfg(feature = "postgres")]
fn pg_host_port() -> String {
    let url = std::env::var("STEM_TEST_PG_URL").unwrap_or_else(|_| "postgres://127.0.0.1:5432/test".into());
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or("127.0.0.1:5432").to_owned()
}

#[cfg(feature = "postgres")]
async fn pg_connect_error(url: &str) -> String {
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    let e = err_of(connect(url).await);
    assert!(matches!(e, stem::Error::Config(_)), "{e:?}");
    let e = e.to_string();
    assert!(t0.elapsed() < Duration::from_secs(8), "{url}: took {:?}", t0.elapsed());
    assert!(e.contains(":***@"), "the URL is named, password masked: {e}");
    assert!(!e.contains("s3cret"), "{e}");
    e
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn unreachable_postgres_fails_fast_naming_the_masked_url_and_the_cause() {
    let e = pg_connect_error("postgres://app:s3cret@127.0.0.1:1/db?ns=x").await;
    assert!(e.contains("cannot connect to Postgres at `postgres://app:***@127.0.0.1:1/db?ns=x`"), "{e}");
    assert!(e.to_lowercase().contains("refused"), "says the connection was refused: {e}");

    let e = pg_connect_error("postgresql://app:s3cret@no-such-host.invalid:5432/db").await;
    assert!(
        e.contains("cannot connect to Postgres at `postgresql://app:***@no-such-host.invalid:5432/db`"),
        "{e}"
    );
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_refusing_the_role_or_database_says_why() {
    // Needs the test server (never skipped: without it the reason is `refused`, and this fails).
    let hp = pg_host_port();
    let e = pg_connect_error(&format!("postgres://stem_no_such_role:s3cret@{hp}/test")).await;
    assert!(e.contains(&format!("`postgres://stem_no_such_role:***@{hp}/test`")), "{e}");
    assert!(
        e.contains(r#"role "stem_no_such_role" does not exist"#) || e.contains("authentication failed"),
        "the server's reason is given: {e}"
    );
    let e = pg_connect_error(&format!("postgres://postgres:s3cret@{hp}/stem_no_such_db")).await;
    assert!(e.contains(r#"database "stem_no_such_db" does not exist"#), "{e}");
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn malformed_postgres_url_is_a_config_error_naming_it_masked() {
    for (url, masked) in [
        ("postgres://app:s3cret@127.0.0.1:notaport/db", "postgres://app:***@127.0.0.1:notaport/db"),
        (
            "postgres://app:s3cret@127.0.0.1/db?sslmode=sometimes",
            "postgres://app:***@127.0.0.1/db?sslmode=sometimes",
        ),
        ("postgres://app:s3cret@127.0.0.1/db?ns=bad%20name", "postgres://app:***@127.0.0.1/db?ns=bad%20name"),
    ] {
        let e = err_of(connect(url).await);
        assert!(matches!(e, stem::Error::Config(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains(masked), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_that_cannot_be_opened_names_the_url() {
    let dir = std::env::temp_dir().join(format!("stem-connect-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();

    // A directory that does not exist.
    let url = format!("sqlite://{}/missing/sub/jobs.db", dir.display());
    let e = err_of(connect(&url).await);
    assert!(matches!(e, stem::Error::Config(_)), "{e:?}");
    assert!(e.to_string().contains(&format!("`{url}`")), "{e}");
    assert!(e.to_string().contains("unable to open database file"), "{e}");

    // A file that is not a database.
    let file = dir.join("garbage.db");
    std::fs::write(&file, vec![0x5a_u8; 8192]).unwrap();
    let url = format!("sqlite://{}", file.display());
    let e = err_of(connect(&url).await);
    assert!(matches!(e, stem::Error::Config(_)), "{e:?}");
    assert!(e.to_string().contains(&format!("`{url}`")), "{e}");
    assert!(e.to_string().contains("not a database"), "{e}");

    // An option SQLite does not know.
    let url = format!("sqlite://{}/jobs.db?mode=sometimes", dir.display());
    let e = err_of(connect(&url).await);
    assert!(matches!(e, stem::Error::Config(_)), "{e:?}");
    assert!(e.to_string().contains(&format!("`{url}`")), "{e}");

    let _ = std::fs::remove_dir_all(&dir);
}
