//! The `soak` section (issue 15, part 5; RELIABILITY.md): `COACHD_BENCH_SOAK_SESSIONS` (1 000)
//! workers over mixed transports (session WebSocket, session SSE, `/v1/chat/completions`)
//! stream back to back with a pause between turns for `COACHD_BENCH_SOAK_SECS` (1 800), while
//! coachd's RSS, open descriptors, threads and alive runtime tasks are sampled every
//! `COACHD_BENCH_SOAK_EVERY_SECS` (10). After a warm-up of a fifth of the run, each series should
//! stay within ±5 % of its mean. Prints the samples (the plot data) and the verdict.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::BoxError;
use crate::coachd::{API_KEY, Placement, start_coachd};
use crate::fake::FakeProcess;
use crate::load::run_mixed;
use crate::measure::rss_kib;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at_secs: f64,
    rss_kib: u64,
    fds: usize,
    sockets: Sockets,
    threads: u64,
    /// `None` when the stats request failed (under load it can time out): not a count of 0.
    tasks: Option<u64>,
    sessions: u64,
}

fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// coachd's TCP sockets by what is at the other end: its clients (the load), the upstream, and
/// anything else (Redis, PostgreSQL, listeners). Read from the process's fd links and its
/// network namespace's socket tables.
#[derive(Debug, Clone, Copy, Default)]
struct Sockets {
    clients: usize,
    upstream: usize,
    other: usize,
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

fn sockets(pid: u32, own_port: u16, upstream_port: u16) -> Sockets {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Sockets::default();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(inode)) = (cols.get(1), cols.get(2), cols.get(9)) else {
                continue;
            };
            if !inodes.contains(*inode) {
                continue;
            }
            let port = |a: &str| a.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            let (lp, rp) = (port(local).unwrap_or(0), port(remote).unwrap_or(0));
            if lp == own_port && rp != 0 {
                out.clients += 1;
            } else if rp == upstream_port {
                out.upstream += 1;
            } else {
                out.other += 1;
            }
        }
    }
    out
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

pub async fn run(fake: &mut FakeProcess, placement: Placement) -> Result<(), BoxError> {
    let sessions = env_u64("COACHD_BENCH_SOAK_SESSIONS", 1_000) as usize;
    let secs = env_u64("COACHD_BENCH_SOAK_SECS", 1_800);
    let every = Duration::from_secs(env_u64("COACHD_BENCH_SOAK_EVERY_SECS", 10).max(1));
    // Turns of 20 tokens at 50 ms (a second each), with COACHD_BENCH_THINK_MS between them.
    fake.set_script(20, Duration::from_millis(50))?;
    if std::env::var_os("COACHD_BENCH_THINK_MS").is_none() {
        eprintln!("soak: COACHD_BENCH_THINK_MS is unset: workers stream back to back, no pause");
    }
    let coachd = start_coachd(fake.base_url(), placement, &[]).await?;
    let pid = coachd.pid();
    let (own_port, upstream_port) = (port_of(&coachd.base), port_of(fake.base_url()));
    let stats_client = reqwest::Client::new();
    let began = Instant::now();
    let end = began + Duration::from_secs(secs);
    let load = run_mixed(&coachd, sessions, Duration::from_secs(5), end);
    tokio::pin!(load);
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(every);
    let out = loop {
        tokio::select! {
            out = &mut load => break out?,
            _ = tick.tick() => {
                let stats: Value = match stats_client
                    .get(format!("{}/realtime/stats", coachd.base))
                    .header("x-api-key", API_KEY)
                    .send()
                    .await
                {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                samples.push(Sample {
                    at_secs: began.elapsed().as_secs_f64(),
                    rss_kib: rss_kib(pid).unwrap_or(0),
                    fds: fds(pid),
                    sockets: sockets(pid, own_port, upstream_port),
                    threads: threads(pid),
                    tasks: stats["runtime"]["alive_tasks"].as_u64(),
                    sessions: stats["active_sessions"].as_u64().unwrap_or(0),
                });
            }
        }
    };

    println!("\n## Soak: {sessions} workers over mixed transports for {secs} s\n");
    println!(
        "tokens received {}, streams failed {}{}\n",
        out.tokens,
        out.failed,
        out.first_error
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!(
        "| t s | RSS MiB | open fds | client sockets | upstream sockets | other sockets | threads | alive tasks | live sessions |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &samples {
        println!(
            "| {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            s.at_secs,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.sockets.clients,
            s.sockets.upstream,
            s.sockets.other,
            s.threads,
            s.tasks.map_or_else(|| "–".to_owned(), |t| t.to_string()),
            s.sessions
        );
    }
    let warm = samples.len() / 5;
    let steady = &samples[warm.min(samples.len())..];
    let band = |name: &str, v: Vec<f64>| {
        if v.is_empty() {
            return;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
        let spread = if mean > 0.0 {
            (hi - mean).max(mean - lo) / mean * 100.0
        } else {
            0.0
        };
        println!(
            "- {name}: mean {mean:.1}, min {lo:.1}, max {hi:.1}, ±{spread:.1} % after warm-up: {}",
            if spread <= 5.0 {
                "flat (±5 % met)"
            } else {
                "NOT within ±5 %"
            }
        );
    };
    println!("\nAfter the first {warm} samples:\n");
    band(
        "RSS MiB",
        steady.iter().map(|s| s.rss_kib as f64 / 1024.0).collect(),
    );
    band("open fds", steady.iter().map(|s| s.fds as f64).collect());
    band(
        "open fds less client sockets",
        steady
            .iter()
            .map(|s| (s.fds - s.sockets.clients.min(s.fds)) as f64)
            .collect(),
    );
    band(
        "client sockets",
        steady.iter().map(|s| s.sockets.clients as f64).collect(),
    );
    band("threads", steady.iter().map(|s| s.threads as f64).collect());
    band(
        "alive tasks",
        steady.iter().filter_map(|s| s.tasks).map(|t| t as f64).collect(),
    );
    Ok(())
}
