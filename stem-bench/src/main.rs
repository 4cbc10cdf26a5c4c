//! `stem-bench`: throughput and latency of a Stem pipeline on a given adapter, plus
//! separate-process commands for multi-process runs.
//!
//! ```text
//! cargo run --release --bin stem-bench -- drain --url memory:// --tasks 200000 --concurrency 16
//! cargo run --release --bin stem-bench -- latency --url redis://127.0.0.1:6379/1 --tasks 2000
//! stem-bench enqueue --url redis://127.0.0.1:6379/1?ns=run1 --tasks 2000 --task-ms 5
//! stem-bench worker  --url redis://127.0.0.1:6379/1?ns=run1 --concurrency 16   # until SIGTERM
//! stem-bench count   --url redis://127.0.0.1:6379/1?ns=run1
//! cargo run --release --bin stem-bench -- chord --url redis://127.0.0.1:6379/9 --members 10000
//! stem-bench canvas-worker  --url redis://127.0.0.1:6379/1?ns=run2 --log-runs   # until SIGTERM
//! stem-bench canvas-enqueue --url redis://127.0.0.1:6379/1?ns=run2 --members 50
//! ```
//! Each measuring command prints one JSON line on stdout; logs go to stderr.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use std::sync::atomic::AtomicU64;

use stem::backend::{ResultBackend, TaskState};
use stem::broker::Broker;
use stem::canvas::{Group, NoInput};
use stem::{Registry, Signature, Stem, TaskContext, TaskError, TaskId, Worker, WorkerConfig};

/// mimalloc keeps allocation cheap and contention-free across worker threads; we recommend
/// it for high-throughput workers, and the figures in docs/benchmarks.md are measured with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The queue every bench task goes to.
const QUEUE: &str = "bench";

/// `enqueue` gives task `i` the id `ID_BASE + i`, so `count` can find every task of a run
/// without a list of ids (namespaces keep runs apart).
const ID_BASE: u128 = 0x0000_5e4d_be4c_7000_8000_0000_0000_0000;

/// Group that records how many tasks `enqueue` sent (its total), read back by `count`.
const RUN_GROUP: u128 = 0x0000_5e4d_be4c_7000_8000_ffff_ffff_ffff;

/// Print one line per task run on stdout (`worker --log-runs`), to count duplicate runs.
static LOG_RUNS: AtomicBool = AtomicBool::new(false);

/// The benchmark task: takes `{"i": n, "ms": MS}`, sleeps MS milliseconds, returns `i`.
struct Echo;

impl stem::Task for Echo {
    type Args = (u64, Option<u64>);
    type Output = u64;
    const NAME: &'static str = "bench.echo";
    const PARAMS: &'static [&'static str] = &["i", "ms"];
    const OPTIONS: stem::TaskOptions = stem::TaskOptions::new().queue(QUEUE);

    async fn run(_ctx: TaskContext, (i, ms): Self::Args) -> Result<u64, TaskError> {
        if let Some(ms) = ms.filter(|ms| *ms > 0) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if LOG_RUNS.load(Ordering::Relaxed) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ran {i}");
        }
        Ok(i)
    }
}

/// Runs of [`chord_total`] in this process (`chord` reports it; it must be 1).
static CALLBACKS: AtomicU64 = AtomicU64::new(0);

/// Chord member of `chord` and `canvas-enqueue`: sleeps `ms` milliseconds, returns `i`.
#[stem::task(name = "bench.canvas.member", queue = "bench")]
async fn chord_member(i: u64, ms: u64) -> u64 {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if LOG_RUNS.load(Ordering::Relaxed) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "member {i}");
    }
    i
}

/// Chord callback of `chord` and `canvas-enqueue`: counts its runs, returns the sum.
#[stem::task(name = "bench.canvas.total", queue = "bench")]
async fn chord_total(values: Vec<u64>) -> u64 {
    CALLBACKS.fetch_add(1, Ordering::Relaxed);
    if LOG_RUNS.load(Ordering::Relaxed) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "callback {}", json!(values));
    }
    values.iter().sum()
}

/// Chain step of `canvas-enqueue`.
#[stem::task(name = "bench.canvas.add", queue = "bench")]
async fn chain_add(a: i64, b: i64) -> i64 {
    a + b
}

/// Chain step of `canvas-enqueue`.
#[stem::task(name = "bench.canvas.mul", queue = "bench")]
async fn chain_mul(a: i64, b: i64) -> i64 {
    a * b
}

#[derive(Parser)]
#[command(name = "stem-bench", about = "Measure Stem throughput and latency")]
struct Cli {
    /// Tokio worker threads. Default: one per CPU, except for commands that run a worker on
    /// a server URL (redis://, postgres://): one fewer (at least one), since the server on
    /// the same small machine needs a core of its own (see docs/benchmarks.md).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

impl Command {
    /// The adapter URL the command runs on.
    fn url(&self) -> &str {
        match self {
            Command::Drain { url, .. }
            | Command::Latency { url, .. }
            | Command::Enqueue { url, .. }
            | Command::Worker { url, .. }
            | Command::Count { url }
            | Command::Chord { url, .. }
            | Command::CanvasWorker { url, .. }
            | Command::CanvasEnqueue { url, .. } => url,
        }
    }

    /// Whether the command runs a worker.
    fn runs_worker(&self) -> bool {
        !matches!(self, Command::Enqueue { .. } | Command::Count { .. } | Command::CanvasEnqueue { .. })
    }
}

/// The default of `--threads` for `command`.
fn default_threads(command: &Command) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let embedded = matches!(adapter_name(command.url()), "memory" | "sqlite");
    if command.runs_worker() && !embedded { cpus.saturating_sub(1).max(1) } else { cpus }
}

#[derive(Subcommand)]
enum Command {
    /// Enqueue N tasks, then run a worker until all N results are stored.
    Drain {
        /// Adapter URL (memory://, redis://, rediss://, postgres://, sqlite://). Without an
        /// `ns=` parameter each run gets a fresh namespace.
        #[arg(long, default_value = "memory://")]
        url: String,
        /// Number of tasks.
        #[arg(long, default_value_t = 100_000)]
        tasks: u64,
        /// Worker concurrency.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Milliseconds each task sleeps.
        #[arg(long, default_value_t = 0)]
        task_ms: u64,
    },
    /// Enqueue one task, wait for its result, repeat; report percentiles.
    Latency {
        /// Adapter URL.
        #[arg(long, default_value = "memory://")]
        url: String,
        /// Number of round trips.
        #[arg(long, default_value_t = 1000)]
        tasks: u64,
    },
    /// Enqueue N tasks for separate `worker` processes (URL used as given).
    Enqueue {
        /// Adapter URL (use `?ns=` to share a namespace with the workers).
        #[arg(long)]
        url: String,
        /// Number of tasks.
        #[arg(long)]
        tasks: u64,
        /// Milliseconds each task sleeps.
        #[arg(long, default_value_t = 0)]
        task_ms: u64,
    },
    /// Run a worker on the bench queue until SIGTERM or Ctrl-C, then shut down gracefully.
    Worker {
        /// Adapter URL (used as given).
        #[arg(long)]
        url: String,
        /// Tasks running at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Lease length in milliseconds (how soon a killed worker's tasks come back).
        #[arg(long, default_value_t = 15_000)]
        visibility_timeout_ms: u64,
        /// Grace period of a graceful shutdown, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        grace_ms: u64,
        /// Print `ran <i>` on stdout for every task run.
        #[arg(long)]
        log_runs: bool,
    },
    /// Count the outcomes of the tasks `enqueue` sent.
    Count {
        /// Adapter URL (used as given).
        #[arg(long)]
        url: String,
    },
    /// Run a chord of N members on one worker in this process; report members per second
    /// from enqueue to the callback's result, and how many times the callback ran.
    Chord {
        /// Adapter URL. Without an `ns=` parameter each run gets a fresh namespace.
        #[arg(long, default_value = "memory://")]
        url: String,
        /// Members in the chord's header.
        #[arg(long, default_value_t = 10_000)]
        members: u64,
        /// Worker concurrency.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Run a worker with the canvas tasks of `canvas-enqueue` until SIGTERM or Ctrl-C.
    CanvasWorker {
        /// Adapter URL (used as given).
        #[arg(long)]
        url: String,
        /// Tasks running at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Print `member <i>` for every chord member run and `callback <values>` for every
        /// chord callback run.
        #[arg(long)]
        log_runs: bool,
    },
    /// Enqueue a chord (`--members` members, then a callback summing them) and a chain of
    /// five steps for separate `canvas-worker` processes, print their ids and exit.
    CanvasEnqueue {
        /// Adapter URL (use `?ns=` to share a namespace with the workers).
        #[arg(long)]
        url: String,
        /// Members in the chord's header.
        #[arg(long, default_value_t = 50)]
        members: u64,
        /// Milliseconds each member sleeps.
        #[arg(long, default_value_t = 0)]
        task_ms: u64,
    },
}

struct Adapters {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    /// The URL of the namespace this run made for itself on a server (see [`connect`]),
    /// removed when it ends.
    own: Option<String>,
}

impl Adapters {
    /// Remove what the run stored under its own namespace, so that runs which follow measure
    /// the same server rather than one holding every earlier run's results (with 1.4 GB of
    /// them in Redis, drains ran about a third slower), and no Postgres schema or SQLite file
    /// is left behind per run. A failure is logged.
    async fn drop_own_namespace(&self) {
        let Some(url) = self.own.as_deref() else { return };
        let dropped = match adapter_name(url) {
            "redis" | "rediss" => drop_redis_namespace(url).await,
            "postgres" | "postgresql" => drop_postgres_namespace(url).await,
            "sqlite" => drop_sqlite_namespace(url).await,
            _ => Ok(()),
        };
        if let Err(e) = dropped {
            tracing::warn!(url = %stem_adapters::url::mask(url), error = %e, "could not remove the run's namespace");
        }
    }
}

async fn drop_redis_namespace(url: &str) -> Result<(), BoxError> {
    let url = stem_adapters::url::parse(url)?;
    let client = redis::Client::open(url.driver_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{}:*", url.namespace);
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK").arg(&keys).query_async::<()>(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

async fn drop_postgres_namespace(url: &str) -> Result<(), BoxError> {
    use stem_adapters::postgres::{PgOptions, PgStore};
    let store = PgStore::connect(url, PgOptions::default().migrate(false)).await?;
    let drop_schema = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", store.namespace());
    sqlx::query(&drop_schema).execute(store.pool()).await?;
    Ok(())
}

/// A run's own SQLite namespace is a sibling file of the one named: remove it with its WAL
/// files (this process's connections keep the unlinked file until they close).
async fn drop_sqlite_namespace(url: &str) -> Result<(), BoxError> {
    use stem_adapters::sqlite::{SqliteOptions, SqliteStore};
    let store = SqliteStore::connect(url, SqliteOptions::default()).await?;
    let Some(path) = store.path() else { return Ok(()) };
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// Connect; `fresh` gives a URL without `ns=` a namespace of its own (Redis keys, a Postgres
/// schema, a SQLite sibling file), removed after the run, and the bench queue is purged, so
/// leftovers of an interrupted run never count.
async fn connect(url: &str, fresh: bool) -> Result<Adapters, BoxError> {
    let own = (fresh && adapter_name(url) != "memory" && !url.contains("ns=")).then(|| {
        let sep = if url.contains('?') { '&' } else { '?' };
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{url}{sep}ns=bench_{}_{nanos}", std::process::id())
    });
    let adapters = stem_adapters::connect(own.as_deref().unwrap_or(url)).await?;
    if fresh {
        adapters.broker.purge(QUEUE).await?;
    }
    Ok(Adapters { broker: adapters.broker, backend: adapters.backend, own })
}

fn adapter_name(url: &str) -> &str {
    url.split("://").next().unwrap_or(url)
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(0.0, |kb| (kb / 1024.0 * 10.0).round() / 10.0)
}

fn registry() -> Result<Arc<Registry>, stem::RegistryError> {
    Ok(Arc::new(Registry::new().register::<Echo>().build()?))
}

fn producer(a: &Adapters, registry: &Arc<Registry>) -> Stem {
    Stem::builder(Arc::clone(&a.broker), Arc::clone(&a.backend)).registry(Arc::clone(registry)).build()
}

fn emit(value: serde_json::Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// Enqueue `tasks` echo tasks in batches; with `ids`, task `i` gets the id `ID_BASE + i`.
/// Enqueue in batches of 5,000, four batches in flight at once, as a bulk producer would:
/// building one batch overlaps with the server storing the previous ones.
async fn enqueue_all(stem: &Stem, tasks: u64, task_ms: u64, ids: bool) -> Result<f64, stem::Error> {
    const BATCH: u64 = 5_000;
    const IN_FLIGHT: usize = 4;
    let ms = (task_ms > 0).then_some(task_ms);
    let t0 = Instant::now();
    let mut batches = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < tasks {
        let end = (next + BATCH).min(tasks);
        let stem = stem.clone();
        batches.spawn(async move {
            stem.enqueue_many((next..end).map(|i| {
                let sig = Signature::<Echo>::new((i, ms));
                if ids { sig.task_id(TaskId(uuid::Uuid::from_u128(ID_BASE + u128::from(i)))) } else { sig }
            }))
            .await
            .map(|_| ())
        });
        next = end;
        if batches.len() >= IN_FLIGHT {
            join_one(&mut batches).await?;
        }
    }
    while !batches.is_empty() {
        join_one(&mut batches).await?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

async fn join_one(batches: &mut tokio::task::JoinSet<Result<(), stem::Error>>) -> Result<(), stem::Error> {
    match batches.join_next().await {
        Some(Ok(done)) => done,
        Some(Err(e)) => Err(stem::Error::Config(format!("enqueue batch panicked: {e}"))),
        None => Ok(()),
    }
}

async fn drain(url: &str, tasks: u64, concurrency: usize, task_ms: u64) -> Result<(), BoxError> {
    let a = connect(url, true).await?;
    let registry = registry()?;
    let stem = producer(&a, &registry);
    let enqueue_s = enqueue_all(&stem, tasks, task_ms, false).await?;

    let worker = Worker::builder(Arc::clone(&a.broker), Arc::clone(&a.backend))
        .registry(registry)
        .queues([QUEUE])
        .concurrency(concurrency)
        .build()?;
    let t1 = Instant::now();
    let handle = worker.spawn();
    // The worker counts a delivery once its outcome is stored and the broker told, so its
    // count reaching N marks the last stored result to within a millisecond; polling the
    // broker instead would add up to its own interval (10 ms, several percent of a short
    // drain) and its load on the server to the figure.
    while handle.processed() < tasks {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut drain_s = t1.elapsed().as_secs_f64();
    // Acks follow stored outcomes, so an empty queue means every result is stored. A
    // delivery counted without being acked (a failed write, redelivered) leaves it non-empty:
    // then the drain lasts until it is empty.
    if !is_empty(&*a.broker).await? {
        until_empty(&*a.broker).await?;
        drain_s = t1.elapsed().as_secs_f64();
    }
    handle.shutdown().await?;
    emit(json!({
        "adapter": adapter_name(url),
        "tasks": tasks,
        "concurrency": concurrency,
        "task_ms": task_ms,
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_rate": round(tasks as f64 / enqueue_s, 0),
        "drain_s": round(drain_s, 3),
        "drain_rate": round(tasks as f64 / drain_s, 0),
        "peak_rss_mb": peak_rss_mb(),
    }))?;
    a.drop_own_namespace().await;
    Ok(())
}

async fn latency(url: &str, tasks: u64) -> Result<(), BoxError> {
    let a = connect(url, true).await?;
    let registry = registry()?;
    let stem = producer(&a, &registry);
    let worker = Worker::builder(Arc::clone(&a.broker), Arc::clone(&a.backend))
        .registry(registry)
        .queues([QUEUE])
        .concurrency(4)
        .build()?;
    let handle = worker.spawn();
    let mut samples = Vec::with_capacity(usize::try_from(tasks).unwrap_or(0));
    for i in 0..tasks {
        let t = Instant::now();
        let h = stem.enqueue(Signature::<Echo>::new((i, None))).await?;
        let out = h.wait(Duration::from_secs(30)).await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        if out != i {
            return Err(format!("task {i} returned {out}").into());
        }
    }
    handle.shutdown().await?;
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples.get(idx).copied().unwrap_or(0.0)
    };
    emit(json!({
        "adapter": adapter_name(url),
        "tasks": tasks,
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "max_ms": round(samples.last().copied().unwrap_or(0.0), 3),
    }))?;
    a.drop_own_namespace().await;
    Ok(())
}

async fn enqueue(url: &str, tasks: u64, task_ms: u64) -> Result<(), BoxError> {
    let a = connect(url, false).await?;
    let registry = registry()?;
    let stem = producer(&a, &registry);
    let run = TaskId(uuid::Uuid::from_u128(RUN_GROUP));
    a.backend.group_init(run, usize::try_from(tasks)?).await?;
    let seconds = enqueue_all(&stem, tasks, task_ms, true).await?;
    emit(
        json!({ "enqueued": tasks, "seconds": round(seconds, 3), "rate": round(tasks as f64 / seconds, 0) }),
    )?;
    Ok(())
}

async fn worker(
    url: &str,
    concurrency: usize,
    visibility_timeout: Duration,
    grace: Duration,
) -> Result<(), BoxError> {
    let a = connect(url, false).await?;
    let mut config = WorkerConfig::default();
    config.queues = vec![QUEUE.to_owned()];
    config.concurrency = concurrency.max(1);
    config.visibility_timeout = visibility_timeout;
    config.shutdown_grace = grace;
    let worker = Worker::builder(a.broker, a.backend).registry(registry()?).config(config).build()?;
    tracing::info!(worker = worker.id(), "stem-bench worker ready");
    worker.run_until_signal().await?;
    Ok(())
}

async fn count(url: &str) -> Result<(), BoxError> {
    let a = connect(url, false).await?;
    let run = TaskId(uuid::Uuid::from_u128(RUN_GROUP));
    let Some(group) = a.backend.group_get(run).await? else {
        return Err(format!("no `stem-bench enqueue` run found at {url}").into());
    };
    let total = group.counts.total as u128;
    let (mut succeeded, mut failed, mut pending) = (0u64, 0u64, 0u64);
    let mut next = 0u128;
    while next < total {
        let end = (next + 256).min(total);
        let mut reads = tokio::task::JoinSet::new();
        for i in next..end {
            let backend = Arc::clone(&a.backend);
            reads.spawn(async move { backend.get(TaskId(uuid::Uuid::from_u128(ID_BASE + i))).await });
        }
        while let Some(read) = reads.join_next().await {
            match read??.map(|s| s.state) {
                Some(TaskState::Succeeded) => succeeded += 1,
                Some(TaskState::Failed | TaskState::Cancelled) => failed += 1,
                _ => pending += 1,
            }
        }
        next = end;
    }
    let dead = a.broker.counts(QUEUE).await?.dead;
    emit(json!({ "succeeded": succeeded, "failed": failed, "pending": pending, "dead": dead }))?;
    Ok(())
}

fn canvas_registry() -> Result<Arc<Registry>, stem::RegistryError> {
    Ok(Arc::new(
        Registry::new()
            .register::<chord_member>()
            .register::<chord_total>()
            .register::<chain_add>()
            .register::<chain_mul>()
            .build()?,
    ))
}

/// How often [`until_empty`] asks. Each look is a `counts` query the server answers while
/// it drains; every 2 ms those took a measurable share of a Postgres server's CPU away from
/// the drain being measured. (`drain` times itself by the worker's own count instead and
/// asks the broker once at the end.)
const EMPTY_POLL: Duration = Duration::from_millis(10);

/// Whether the bench queue has nothing pending, delayed or in flight.
async fn is_empty(broker: &dyn Broker) -> Result<bool, stem::Error> {
    let c = broker.counts(QUEUE).await?;
    Ok(c.pending + c.in_flight + c.delayed == 0)
}

/// Wait until the bench queue has nothing pending, delayed or in flight.
async fn until_empty(broker: &dyn Broker) -> Result<(), stem::Error> {
    while !is_empty(broker).await? {
        tokio::time::sleep(EMPTY_POLL).await;
    }
    Ok(())
}

async fn chord(url: &str, members: u64, concurrency: usize) -> Result<(), BoxError> {
    let a = connect(url, true).await?;
    let registry = canvas_registry()?;
    let stem = producer(&a, &registry);
    let worker = Worker::builder(Arc::clone(&a.broker), Arc::clone(&a.backend))
        .registry(registry)
        .queues([QUEUE])
        .concurrency(concurrency)
        .build()?;
    let handle = worker.spawn();
    let t0 = Instant::now();
    let header: Group<NoInput, u64> = Group::of((0..members).map(|i| chord_member::new(i, 0)));
    let chord = stem.enqueue_canvas(header.chord(chord_total::partial())).await?;
    let enqueue_s = t0.elapsed().as_secs_f64();
    let total = chord.wait(Duration::from_secs(3600)).await?;
    let seconds = t0.elapsed().as_secs_f64();
    // Acks follow the bookkeeping, so once the queue is empty every callback that was ever
    // started has run.
    until_empty(a.broker.as_ref()).await?;
    handle.shutdown().await?;
    let callbacks = CALLBACKS.load(Ordering::Relaxed);
    emit(json!({
        "adapter": adapter_name(url),
        "members": members,
        "concurrency": concurrency,
        "enqueue_s": round(enqueue_s, 3),
        "seconds": round(seconds, 3),
        "members_per_s": round(members as f64 / seconds, 0),
        "callbacks": callbacks,
    }))?;
    a.drop_own_namespace().await;
    let expected = members.saturating_sub(1).saturating_mul(members) / 2;
    if total != expected {
        return Err(format!("the chord returned {total}, expected {expected}").into());
    }
    if callbacks != 1 {
        return Err(format!("the chord callback ran {callbacks} times").into());
    }
    Ok(())
}

async fn canvas_worker(url: &str, concurrency: usize) -> Result<(), BoxError> {
    let a = connect(url, false).await?;
    let worker = Worker::builder(a.broker, a.backend)
        .registry(canvas_registry()?)
        .queues([QUEUE])
        .concurrency(concurrency.max(1))
        .build()?;
    tracing::info!(worker = worker.id(), "stem-bench canvas worker ready");
    worker.run_until_signal().await?;
    Ok(())
}

async fn canvas_enqueue(url: &str, members: u64, task_ms: u64) -> Result<(), BoxError> {
    let a = connect(url, false).await?;
    let stem = producer(&a, &canvas_registry()?);
    let header: Group<NoInput, u64> = Group::of((0..members).map(|i| chord_member::new(i, task_ms)));
    let chord = stem.enqueue_canvas(header.chord(chord_total::partial())).await?;
    // ((1 + 2) * 10 + 5) * 2 + 1 = 71
    let chain =
        stem::canvas!(chain[chain_add(1, 2), chain_mul(10), chain_add(5), chain_mul(2), chain_add(1)]);
    let chain = stem.enqueue_canvas(chain).await?;
    emit(json!({ "members": members, "chord": chord.id(), "chain": chain.id() }))?;
    Ok(())
}

/// Every command's error: `Send`, so a command can run as a spawned task.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_filter = if matches!(cli.command, Command::Worker { .. } | Command::CanvasWorker { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The command runs as a spawned task, on the runtime's worker threads like the code it
    // measures, not on the main thread (whose every wake-up would be a cross-thread hop).
    let threads = cli.threads.unwrap_or_else(|| default_threads(&cli.command)).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build();
    let result = runtime.map_err(BoxError::from).and_then(|rt| {
        rt.block_on(async {
            match tokio::spawn(run(cli.command)).await {
                Ok(result) => result,
                Err(e) => Err(e.into()),
            }
        })
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "stem-bench: {e}");
            std::process::ExitCode::from(70)
        }
    }
}

async fn run(command: Command) -> Result<(), BoxError> {
    match command {
        Command::Drain { url, tasks, concurrency, task_ms } => drain(&url, tasks, concurrency, task_ms).await,
        Command::Latency { url, tasks } => latency(&url, tasks).await,
        Command::Enqueue { url, tasks, task_ms } => enqueue(&url, tasks, task_ms).await,
        Command::Worker { url, concurrency, visibility_timeout_ms, grace_ms, log_runs } => {
            LOG_RUNS.store(log_runs, Ordering::Relaxed);
            worker(
                &url,
                concurrency,
                Duration::from_millis(visibility_timeout_ms),
                Duration::from_millis(grace_ms),
            )
            .await
        }
        Command::Count { url } => count(&url).await,
        Command::Chord { url, members, concurrency } => chord(&url, members, concurrency).await,
        Command::CanvasWorker { url, concurrency, log_runs } => {
            LOG_RUNS.store(log_runs, Ordering::Relaxed);
            canvas_worker(&url, concurrency).await
        }
        Command::CanvasEnqueue { url, members, task_ms } => canvas_enqueue(&url, members, task_ms).await,
    }
}
