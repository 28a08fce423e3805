//! Streaming benchmark: time to first token, gaps between tokens, throughput and CPU per token,
//! direct to the fake upstream and through coachd's four streaming paths (session SSE, session
//! WebSocket, `/api/v1/llm/stream`, `/v1/chat/completions`) at 1, 100 and 1 000 concurrent
//! streams, side by side in one run; coachd on real stores; the memory per idle WebSocket
//! session; and, on request, the LiteLLM proxy as a peer on the same load.
//!
//! Three processes: coachd (the release binary, or `COACHD_BENCH_BIN`), the fake upstream (this
//! binary again, see `fake.rs`) and this one (the clients), so each one's CPU is its own.
//!
//! ```sh
//! cargo bench --bench stream                                    # latency, stores, idle
//! COACHD_BENCH_QUICK=1 cargo bench --bench stream               # 1 and 50 streams, 500 idle sessions
//! COACHD_BENCH_ONLY=latency|stores|idle|hostile|soak|litellm|nodes cargo bench --bench stream  # some sections
//! COACHD_BENCH_ONLY=soak COACHD_BENCH_THINK_MS=1000 cargo bench --bench stream  # 1 000 sessions, 30 min
//! COACHD_BENCH_ONLY=nodes cargo bench --bench stream            # cross-node delivery (own redis-server)
//! COACHD_BENCH_PEER=litellm cargo bench --bench stream          # the default sections and litellm
//! set -a; . .services/env; set +a; COACHD_BENCH_ONLY=stores cargo bench --bench stream  # real stores
//! COACHD_BENCH_STREAMS=1000 cargo bench --bench stream          # only the levels of these sizes
//! COACHD_BENCH_PATHS=ws,chat cargo bench --bench stream       # only these paths (and direct)
//! COACHD_BENCH_PIN=1 cargo bench --bench stream                 # the server on a CPU of its own
//! COACHD_BENCH_UPSTREAM=h2 cargo bench --bench stream            # coachd to the fake over shared h2c
//! COACHD_BENCH_LEVEL=10000:20:200:8 cargo bench --bench stream  # one level: streams:tokens:ms:window s
//! COACHD_BENCH_ONLY=idle COACHD_BENCH_IDLE_SESSIONS=2000 cargo bench --bench stream  # how many idle sessions
//! COACHD_BENCH_THINK_MS=200 cargo bench --bench stream          # pause between a worker's turns
//! COACHD_BENCH_LOG=debug cargo bench --bench stream             # the servers' logs to stderr
//! COACHD_BENCH_BIN=/path/to/coachd cargo bench --bench stream   # another coachd build
//! ```
//!
//! Layout: `load.rs` the levels, workers and paths; `clients.rs` one client per path;
//! `coachd.rs` the coachd process and CPU placement; `fake.rs` the fake's process;
//! `measure.rs` traces, percentiles and `/proc`; `report.rs` the tables; `stores.rs`, `idle.rs`,
//! `hostile.rs` (memory under floods), `soak.rs` (the 30-minute soak), `litellm.rs` and `nodes.rs` (cross-node delivery) the
//! other sections.

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark: every spawned stream is awaited before the run ends"
)]

mod clients;
mod coachd;
mod fake;
mod hostile;
mod idle;
mod litellm;
mod load;
mod measure;
mod nodes;
mod report;
mod soak;
mod stores;

use std::time::Duration;

use crate::coachd::{Placement, start_coachd};
use crate::fake::FakeProcess;
use crate::load::{Level, PathKind, Servers, run_levels};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// The load generator runs on the same two cores as coachd: keep its own cost per token down.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The levels of a run: 1, 100 and 1 000 streams, or 1 and 50 with `COACHD_BENCH_QUICK`;
/// `COACHD_BENCH_STREAMS=1000` keeps only the levels of those sizes (for profiling).
fn levels(quick: bool) -> Vec<Level> {
    let level = |streams, tokens, interval_ms, window_secs| Level {
        streams,
        tokens,
        interval: Duration::from_millis(interval_ms),
        window: Duration::from_secs(window_secs),
    };
    let levels = if quick {
        vec![level(1, 10, 10, 2), level(50, 40, 50, 2)]
    } else {
        // One stream: short ones, so the window holds enough of them for a percentile.
        vec![level(1, 10, 10, 8), level(100, 40, 50, 6), level(1000, 40, 50, 6)]
    };
    // `COACHD_BENCH_LEVEL=streams:tokens:interval_ms:window_secs`: one level of this shape instead
    // (issue 16's 10 000 streams at 5 tokens a second: 10000:20:200:8).
    if let Ok(shape) = std::env::var("COACHD_BENCH_LEVEL") {
        let n: Vec<u64> = shape.split(':').filter_map(|v| v.trim().parse().ok()).collect();
        if let [streams, tokens, interval_ms, window_secs] = n[..] {
            return vec![level(streams as usize, tokens as usize, interval_ms, window_secs)];
        }
        eprintln!("COACHD_BENCH_LEVEL={shape:?} is not streams:tokens:interval_ms:window_secs; ignored");
    }
    match std::env::var("COACHD_BENCH_STREAMS") {
        Ok(keep) => levels
            .into_iter()
            .filter(|l| keep.split(',').any(|k| k.trim() == l.streams.to_string()))
            .collect(),
        Err(_) => levels,
    }
}

/// The sections to run: `COACHD_BENCH_ONLY` names them; otherwise latency, stores and idle, and
/// litellm only when `COACHD_BENCH_PEER=litellm` asks for it.
fn sections() -> Vec<String> {
    match std::env::var("COACHD_BENCH_ONLY") {
        Ok(only) if !only.trim().is_empty() => only.split(',').map(|s| s.trim().to_owned()).collect(),
        _ => {
            let mut all: Vec<String> = ["latency", "stores", "idle"].map(str::to_owned).into();
            if std::env::var("COACHD_BENCH_PEER").is_ok_and(|p| p.trim() == "litellm") {
                all.push("litellm".to_owned());
            }
            all
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    if std::env::var_os(fake::ROLE_ENV).is_some() {
        return fake::serve().await;
    }
    // `cargo test --all-targets` runs bench binaries too; only `cargo bench` (which passes
    // --bench) should spend minutes measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("stream benchmark: skipped outside `cargo bench --bench stream`");
        return Ok(());
    }
    let quick = std::env::var_os("COACHD_BENCH_QUICK").is_some();
    let levels = levels(quick);
    let sections = sections();
    let section = |name: &str| sections.iter().any(|s| s == name);

    let placement = Placement::choose();
    println!("\nplacement: {}", placement.describe());
    // Other work on the machine shows up in every figure; say how much there was.
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        println!("load average at start (1, 5, 15 min): {}", load.join(" "));
    }
    let mut fake = FakeProcess::start()?;
    if section("latency") {
        let coachd = start_coachd(fake.base_url(), placement, &[]).await?;
        let servers = Servers {
            coachd: &coachd,
            litellm: None,
        };
        let rows = run_levels(&mut fake, servers, &levels, &PathKind::COACHD).await?;
        println!("\n## Streaming latency at steady concurrency\n");
        report::print_rows(&rows);
        report::print_added(&rows);
        report::print_memory(&rows);
    }
    if section("stores") {
        stores::run(&mut fake, placement, &levels).await?;
    }
    if section("idle") {
        let sessions = std::env::var("COACHD_BENCH_IDLE_SESSIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 500 } else { 10_000 });
        idle::run(&fake, placement, sessions).await?;
    }
    if section("hostile") {
        hostile::run(&fake, placement).await?;
    }
    if section("soak") {
        soak::run(&mut fake, placement).await?;
    }
    if section("litellm") {
        litellm::run(&mut fake, placement, &levels).await?;
    }
    if section("nodes") {
        nodes::run(&mut fake, placement, &levels).await?;
    }
    Ok(())
}
