//! End-to-end runs with producer and workers as separate OS processes on Postgres: results
//! awaited by the producer (LISTEN/NOTIFY across processes), a worker SIGKILLed mid-drain,
//! SIGTERM during a drain (the scenarios of `common`, shared with Redis), and a worker riding
//! out a restart of its Postgres server.
//!
//! Uses `STEM_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`) with a fresh
//! namespace (schema) per test, dropped when the test passes. These tests never skip: when
//! Postgres does not answer they fail saying so. The restart test runs a private server
//! (`initdb` + `pg_ctl` on a free port in a temporary directory; as root, as the `postgres`
//! OS user or `STEM_TEST_PG_OS_USER`), found through `STEM_TEST_PG_BINDIR`, `pg_config
//! --bindir`, `/usr/lib/postgresql/<version>/bin` or `PATH`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Worker, enqueue, free_port, wait_succeeded, wait_until};
use serde_json::json;
use stem::EnqueueOptions;
use stem_adapters::postgres::{PgOptions, PgStore};

fn base_url() -> String {
    std::env::var("STEM_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Run `f` to completion on a runtime of its own, on a thread of its own (callable from sync
/// tests, async tests and `Drop`).
fn block_on<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || tokio::runtime::Runtime::new().unwrap().block_on(f)).join().unwrap()
}

/// A fresh namespace (schema) on the shared server, created up front (so a server that does
/// not answer fails the test here, clearly) and dropped when the test passes; a failed
/// test's schema stays for inspection and is swept by the contract harness an hour later.
struct Namespace {
    url: String,
}

impl Namespace {
    fn new() -> Namespace {
        let url = common::with_fresh_namespace(&base_url());
        let u = url.clone();
        let opened = block_on(async move {
            PgStore::connect(&u, PgOptions::default().connect_timeout(Duration::from_secs(5))).await
        });
        if let Err(e) = opened {
            panic!(
                "the Postgres multi-process tests need a PostgreSQL server ({e}); start one \
                 (`scripts/services.sh`) or point STEM_TEST_PG_URL at one"
            );
        }
        Namespace { url }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let url = self.url.clone();
        block_on(async move {
            let store = PgStore::connect(&url, PgOptions::default().migrate(false)).await.unwrap();
            let drop_schema = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", store.namespace());
            sqlx::query(&drop_schema).execute(store.pool()).await.unwrap();
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_awaits_results_computed_by_a_worker_process() {
    let ns = Namespace::new();
    common::producer_awaits_results_computed_by_a_worker_process(&ns.url).await;
}

#[test]
fn sigkill_mid_drain_loses_nothing() {
    let ns = Namespace::new();
    let twice = common::sigkill_mid_drain_loses_nothing(&ns.url);
    eprintln!(
        "Postgres, SIGKILL mid-drain: all 2000 succeeded; {twice} ran twice (in flight on the killed worker)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_drain_finishes_in_flight_and_loses_nothing() {
    let ns = Namespace::new();
    common::sigterm_during_a_drain_finishes_in_flight_and_loses_nothing(&ns.url).await;
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
fn pg_bindir() -> PathBuf {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("STEM_TEST_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        assert!(has_tools(&dir), "STEM_TEST_PG_BINDIR={} holds no initdb and pg_ctl", dir.display());
        return dir;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&dir) {
            return dir;
        }
    }
    // Debian and Ubuntu keep server binaries out of PATH, one directory per major version.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, dir)| has_tools(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return dir;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).find(|d| has_tools(d)))
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        panic!(
            "the Postgres restart test runs a private server and needs initdb and pg_ctl: install \
             the PostgreSQL server package or set STEM_TEST_PG_BINDIR"
        )
    })
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A private PostgreSQL server in a temporary directory on its own port: `initdb` on start,
/// `pg_ctl stop -m immediate` and the directory removed on drop. The server refuses to run
/// as root, so as root every server command runs as an unprivileged OS user.
struct PrivatePostgres {
    bindir: PathBuf,
    dir: PathBuf,
    os_user: Option<String>,
    port: u16,
}

impl PrivatePostgres {
    fn init() -> PrivatePostgres {
        let bindir = pg_bindir();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("stem-e2e-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let os_user = running_as_root()
            .then(|| std::env::var("STEM_TEST_PG_OS_USER").unwrap_or_else(|_| "postgres".to_owned()));
        if let Some(user) = &os_user {
            let ok = Command::new("chown").arg(format!("{user}:")).arg(&dir).status().unwrap().success();
            assert!(ok, "chown of {} to OS user `{user}` failed", dir.display());
        }
        let pg = PrivatePostgres { bindir, dir, os_user, port };
        let data = pg.data();
        pg.run("initdb", &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
             fsync = off\nshared_buffers = 32MB\n"
        );
        let conf_file = pg.dir.join("data").join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_file).unwrap();
        text.push_str(&conf);
        std::fs::write(&conf_file, text).unwrap();
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self, namespace: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?ns={namespace}", self.port)
    }

    /// Run a server tool (as the unprivileged OS user when root); panics when it fails.
    fn run(&self, tool: &str, args: &[&str]) {
        let status = self.command(tool, args).status().unwrap_or_else(|e| panic!("running {tool}: {e}"));
        assert!(status.success(), "{tool} {args:?} failed ({status}); server log: {}", self.server_log());
    }

    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let program = self.bindir.join(tool);
        let mut cmd = match &self.os_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args).stdout(std::process::Stdio::null());
        cmd
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn start(&self) {
        let log = self.dir.join("server.log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "start"]);
        wait_until("the private server to accept connections", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
    }

    /// Fast shutdown: client connections are terminated, the server checkpoints and exits.
    fn stop_fast(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.command("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A worker drains 2,000 tasks of 20 ms; the server is stopped (fast shutdown) with tasks in
/// flight and started again on the same port and data. The worker logs the outage while it
/// lasts, retries with backoff, logs the reconnect, finishes every task (those whose outcome
/// could not be recorded come back when their lease lapses) and runs tasks enqueued after
/// the restart, whose results a producer awaits.
#[test]
fn a_worker_survives_a_postgres_restart() {
    let pg = PrivatePostgres::init();
    pg.start();
    let url = pg.url("restart");
    enqueue(&url, 2000, 20);
    let lease = ["--visibility-timeout-ms", "3000"];
    let mut worker = Worker::start(&url, &lease);
    wait_until("the worker to run 100 tasks", Duration::from_secs(60), || worker.runs().len() >= 100);

    let logged_before = worker.log().len();
    pg.stop_fast();
    let down = Instant::now();
    let ran_before = worker.runs().len();
    assert!(ran_before < 2000, "the server stops mid-drain");
    let outage_logged = |what: &str| {
        wait_until(&format!("the worker to log `{what}`"), Duration::from_secs(60), || {
            worker.log()[logged_before..].contains(what)
        });
        down.elapsed()
    };
    let lost = outage_logged("lost the LISTEN connection to Postgres");
    let fetch_failed = outage_logged("fetch failed");
    eprintln!(
        "Postgres restart: stopped after {ran_before} tasks ran; connection loss logged after \
         {lost:?}, first failed fetch after {fetch_failed:?}"
    );
    assert!(worker.alive(), "the worker keeps running while the server is down");
    pg.start();

    let c = wait_succeeded(&url, 2000, Duration::from_secs(180));
    assert_eq!(
        (c["failed"].clone(), c["pending"].clone(), c["dead"].clone()),
        (json!(0), json!(0), json!(0)),
        "{c}"
    );
    let twice = common::ran_twice(&worker.runs(), 2000);
    eprintln!(
        "Postgres restart: all 2000 succeeded; {twice} ran again (outcome not recorded during the outage)"
    );
    assert!(twice <= 64, "only tasks in flight during the outage may run again, got {twice}");

    let u = url.clone();
    block_on(async move {
        let adapters = stem_adapters::connect(&u).await.unwrap();
        let stem = stem::Stem::new(adapters.broker, adapters.backend);
        let mut handles = Vec::new();
        for i in 0..20u64 {
            let opts = EnqueueOptions::default().queue("bench");
            handles
                .push(stem.enqueue_raw("bench.echo", json!({"i": 1000 + i, "ms": 1}), opts).await.unwrap());
        }
        for (i, h) in handles.iter().enumerate() {
            assert_eq!(h.wait(Duration::from_secs(60)).await.unwrap(), json!(1000 + i));
        }
    });
    let log = worker.log();
    assert!(log.contains("LISTEN connection to Postgres re-established"), "{log}");
    assert!(log.contains("broker reachable again"), "the reconnect was logged:\n{log}");
    worker.stop();
}
