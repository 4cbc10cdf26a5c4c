//! `stem-bench`: throughput and latency of a Stem pipeline on a given adapter.
//!
//! ```text
//! cargo run --release --bin stem-bench -- drain --url memory:// --tasks 200000 --concurrency 16
//! cargo run --release --bin stem-bench -- latency --url memory:// --tasks 2000
//! ```
//! Each command prints one JSON line.

use std::io::Write;

/// mimalloc keeps allocation cheap and contention-free across worker threads; we recommend
/// it for high-throughput workers, and the figures in docs/benchmarks.md are measured with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use stem::backend::ResultBackend;
use stem::broker::Broker;
use stem::{Registry, Signature, Stem, TaskContext, TaskError, Worker};

/// The benchmark task: takes `{"i": n, "ms": MS}`, sleeps MS milliseconds, returns `i`.
struct Echo;

impl stem::Task for Echo {
    type Args = (u64, Option<u64>);
    type Output = u64;
    const NAME: &'static str = "bench.echo";
    const PARAMS: &'static [&'static str] = &["i", "ms"];
    const OPTIONS: stem::TaskOptions = stem::TaskOptions::new().queue("bench");

    async fn run(_ctx: TaskContext, (i, ms): Self::Args) -> Result<u64, TaskError> {
        if let Some(ms) = ms.filter(|ms| *ms > 0) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(i)
    }
}

#[derive(Parser)]
#[command(name = "stem-bench", about = "Measure Stem throughput and latency")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enqueue N tasks, then run a worker until all N results are stored.
    Drain {
        /// Adapter URL (memory://).
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
        /// Adapter URL (memory://).
        #[arg(long, default_value = "memory://")]
        url: String,
        /// Number of round trips.
        #[arg(long, default_value_t = 1000)]
        tasks: u64,
    },
}

type Adapters = (Arc<dyn Broker>, Arc<dyn ResultBackend>);

fn connect(url: &str) -> Result<Adapters, Box<dyn std::error::Error>> {
    // Every Redis run starts from an empty namespace: a fresh `ns` unless the URL names one,
    // and the bench queue purged either way (leftovers of an interrupted run never count).
    let url = if url.starts_with("redis") && !url.contains("ns=") {
        let sep = if url.contains('?') { '&' } else { '?' };
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{url}{sep}ns=bench-{}-{nanos}", std::process::id())
    } else {
        url.to_owned()
    };
    let runtime = tokio::runtime::Handle::current();
    let adapters = tokio::task::block_in_place(|| {
        runtime.block_on(async {
            let a = stem_adapters::connect(&url).await?;
            a.broker.purge("bench").await?;
            Ok::<_, stem::Error>(a)
        })
    })?;
    Ok((adapters.broker, adapters.backend))
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

fn emit(value: serde_json::Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

async fn drain(
    url: &str,
    tasks: u64,
    concurrency: usize,
    task_ms: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let (broker, backend) = connect(url)?;
    let registry = registry()?;
    let stem =
        Stem::builder(Arc::clone(&broker), Arc::clone(&backend)).registry(Arc::clone(&registry)).build();

    let ms = (task_ms > 0).then_some(task_ms);
    let t0 = Instant::now();
    let mut next = 0;
    while next < tasks {
        let end = (next + 5_000).min(tasks);
        stem.enqueue_many((next..end).map(|i| Signature::<Echo>::new((i, ms)))).await?;
        next = end;
    }
    let enqueue_s = t0.elapsed().as_secs_f64();

    let worker = Worker::builder(Arc::clone(&broker), backend)
        .registry(registry)
        .queues(["bench"])
        .concurrency(concurrency)
        .track_started(std::env::var_os("NO_TRACK").is_none())
        .build()?;
    let t1 = Instant::now();
    let handle = worker.spawn();
    // Acks follow stored outcomes, so an empty queue means every result is stored.
    loop {
        let c = broker.counts("bench").await?;
        if c.pending + c.in_flight + c.delayed == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain_s = t1.elapsed().as_secs_f64();
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
    Ok(())
}

async fn latency(url: &str, tasks: u64) -> Result<(), Box<dyn std::error::Error>> {
    let (broker, backend) = connect(url)?;
    let registry = registry()?;
    let stem =
        Stem::builder(Arc::clone(&broker), Arc::clone(&backend)).registry(Arc::clone(&registry)).build();
    let worker =
        Worker::builder(broker, backend).registry(registry).queues(["bench"]).concurrency(4).build()?;
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
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Drain { url, tasks, concurrency, task_ms } => drain(&url, tasks, concurrency, task_ms).await,
        Command::Latency { url, tasks } => latency(&url, tasks).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "stem-bench: {e}");
            std::process::ExitCode::from(70)
        }
    }
}
