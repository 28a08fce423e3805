//! Streaming benchmark: time to first token and gaps between tokens, direct to the fake upstream
//! and through coachd (SSE and WebSocket), at 1, 100 and 1 000 concurrent streams, side by side
//! in one run; then the resident memory per idle WebSocket session at 10 000 sessions.
//!
//! coachd runs as its own process (the release binary, embedded stores, the fake as its OpenAI
//! upstream), so its RSS is its own; the fake and the clients share this process.
//!
//! ```sh
//! cargo bench --bench stream                 # full run
//! COACHD_BENCH_QUICK=1 cargo bench --bench stream   # smaller, for a smoke check
//! ```

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark: every spawned stream is awaited before the run ends"
)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coachd::fake_upstream::{FakeUpstream, Script};
use eventsource_stream::Eventsource;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// The load generator runs on the same two cores as coachd: keep its own cost per token down.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Just enough of an OpenAI chunk to tell a text delta (borrowed: no allocation per token).
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Vec<Choice<'a>>,
}

#[derive(serde::Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
}

/// Just the `type` of a coachd frame.
#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

const TOKENS: usize = 20;
const TOKEN_INTERVAL: Duration = Duration::from_millis(10);

/// Latencies of one stream: time to first token, then each gap.
#[derive(Debug, Default, Clone)]
struct Trace {
    ttft: Duration,
    gaps: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[derive(Debug, Clone, Copy)]
struct Summary {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn summarize(mut v: Vec<Duration>) -> Summary {
    v.sort();
    Summary {
        p50: percentile(&v, 0.50),
        p99: percentile(&v, 0.99),
        max: v.last().copied().unwrap_or_default(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

struct Coachd {
    child: Child,
    base: String,
    port: u16,
}

impl Drop for Coachd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_coachd(fake: &FakeUpstream) -> Result<Coachd, BoxError> {
    let port = free_port()?;
    let child = Command::new(env!("CARGO_BIN_EXE_coachd"))
        .env_clear()
        .env("PORT", port.to_string())
        .env("COACHD_HOST", "127.0.0.1")
        .env("LLM_PROVIDER", "openai")
        .env("OPENAI_API_KEY", "bench")
        .env("COACHD_OPENAI_BASE_URL", fake.base_url())
        .env("COACHD_LOG", "warn")
        .env("COACHD_MAX_SESSIONS", "20000")
        .env("RATE_LIMIT_ENABLED", "false")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client.get(format!("{base}/health")).send().await.is_ok() {
            return Ok(Coachd { child, base, port });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("coachd did not start".into())
}

/// CPU time (user + system) a process has used so far, from `/proc/{pid}/stat`.
fn cpu_time(pid: &str) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // Linux reports these in USER_HZ, which is 100 on every platform Rust targets.
    Duration::from_millis(ticks * 10)
}

fn rss_kib(pid: u32) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// One stream straight to the fake (what a client would see without coachd).
async fn direct(client: reqwest::Client, base: String) -> Result<Trace, BoxError> {
    let body = json!({"model": "bench", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]});
    let start = Instant::now();
    let resp = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth("bench")
        .json(&body)
        .send()
        .await?;
    let mut events = resp.bytes_stream().eventsource();
    let mut trace = Trace::default();
    let mut last: Option<Instant> = None;
    while let Some(ev) = events.next().await {
        let ev = ev?;
        if ev.data == "[DONE]" {
            break;
        }
        let chunk: Chunk = serde_json::from_str(&ev.data)?;
        if chunk
            .choices
            .first()
            .and_then(|c| c.delta.as_ref())
            .and_then(|d| d.content.as_deref())
            .is_some_and(|t| !t.is_empty())
        {
            let now = Instant::now();
            match last {
                None => trace.ttft = now - start,
                Some(prev) => trace.gaps.push(now - prev),
            }
            last = Some(now);
        }
    }
    Ok(trace)
}

async fn create_session(
    client: &reqwest::Client,
    base: &str,
    user: usize,
) -> Result<(String, String), BoxError> {
    let v: Value = client
        .post(format!("{base}/realtime/sessions"))
        .json(&json!({"user_id": format!("bench-{user}"), "coach_id": "sales", "transport": "websocket"}))
        .send()
        .await?
        .json()
        .await?;
    let id = v["session_id"].as_str().ok_or("no session_id")?.to_owned();
    let token = v["token"].as_str().ok_or("no token")?.to_owned();
    Ok((id, token))
}

/// One turn through coachd's SSE turn route (session created beforehand, not timed).
async fn via_sse(client: reqwest::Client, base: String, session: String) -> Result<Trace, BoxError> {
    let start = Instant::now();
    let resp = client
        .post(format!("{base}/realtime/sessions/{session}/turn"))
        .header("accept", "text/event-stream")
        .json(&json!({"text": "hello"}))
        .send()
        .await?;
    let mut events = resp.bytes_stream().eventsource();
    let mut trace = Trace::default();
    let mut last: Option<Instant> = None;
    while let Some(ev) = events.next().await {
        let ev = ev?;
        match ev.event.as_str() {
            "token" => {
                let now = Instant::now();
                match last {
                    None => trace.ttft = now - start,
                    Some(prev) => trace.gaps.push(now - prev),
                }
                last = Some(now);
            }
            "turn_end" => break,
            "error" => return Err(format!("turn error: {}", ev.data).into()),
            _ => {}
        }
    }
    Ok(trace)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_open(port: u16, session: &str, token: &str) -> Result<Ws, BoxError> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{port}/realtime/sessions/{session}/ws?token={token}"
    ))
    .await?;
    // The connection's first event is the session state.
    ws.next().await.ok_or("closed")??;
    Ok(ws)
}

/// One turn through coachd's WebSocket (connected beforehand, not timed).
async fn via_ws(mut ws: Ws) -> Result<Trace, BoxError> {
    let start = Instant::now();
    ws.send(Message::text(
        json!({"type": "user_message", "text": "hello"}).to_string(),
    ))
    .await?;
    let mut trace = Trace::default();
    let mut last: Option<Instant> = None;
    while let Some(msg) = ws.next().await {
        let Message::Text(text) = msg? else { continue };
        let frame: Frame = serde_json::from_str(text.as_str())?;
        match frame.kind.as_ref() {
            "token" => {
                let now = Instant::now();
                match last {
                    None => trace.ttft = now - start,
                    Some(prev) => trace.gaps.push(now - prev),
                }
                last = Some(now);
            }
            "turn_end" => break,
            "error" => return Err(format!("turn error: {text}").into()),
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(trace)
}

struct Row {
    path: &'static str,
    streams: usize,
    ttft: Summary,
    gap: Summary,
    failed: usize,
    /// Tokens received over the level.
    tokens: usize,
    /// CPU time coachd and this process (the fake and the clients) used over the level.
    coachd_cpu: Duration,
    bench_cpu: Duration,
}

async fn collect_rows(
    path: &'static str,
    streams: usize,
    tasks: Vec<tokio::task::JoinHandle<Result<Trace, BoxError>>>,
) -> Row {
    let mut ttfts = Vec::new();
    let mut gaps = Vec::new();
    let mut failed = 0;
    let mut tokens = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(trace)) => {
                tokens += trace.gaps.len() + 1;
                ttfts.push(trace.ttft);
                gaps.extend(trace.gaps);
            }
            Ok(Err(e)) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("{path} x{streams}: a stream failed: {e}");
                }
            }
            Err(_) => failed += 1,
        }
    }
    Row {
        path,
        streams,
        ttft: summarize(ttfts),
        gap: summarize(gaps),
        failed,
        tokens,
        coachd_cpu: Duration::ZERO,
        bench_cpu: Duration::ZERO,
    }
}

/// Collects a path's rows and charges it the CPU both processes used since `cpu0`.
async fn measured(
    path: &'static str,
    n: usize,
    coachd: &Coachd,
    cpu0: (Duration, Duration),
    tasks: Vec<tokio::task::JoinHandle<Result<Trace, BoxError>>>,
) -> Row {
    let mut row = collect_rows(path, n, tasks).await;
    let (c, b) = cpu_now(coachd);
    row.coachd_cpu = c.saturating_sub(cpu0.0);
    row.bench_cpu = b.saturating_sub(cpu0.1);
    row
}

fn cpu_now(coachd: &Coachd) -> (Duration, Duration) {
    (cpu_time(&coachd.child.id().to_string()), cpu_time("self"))
}

/// Runs `n` streams on each path. With a `spread`, stream i starts `spread * i / n` after the
/// level begins (so many are in flight at once without every connection opening in the same
/// instant); without, all start together.
async fn run_level(
    fake: &FakeUpstream,
    coachd: &Coachd,
    n: usize,
    spread: Duration,
) -> Result<Vec<Row>, BoxError> {
    let _ = fake;
    let offset = move |i: usize| spread.mul_f64(i as f64 / n.max(1) as f64);
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(2000)
        .build()?;
    let fake_base = fake.base_url();
    // Start gate so every stream of a level begins together.
    let gate = Arc::new(Semaphore::new(0));

    let mut tasks = Vec::new();
    for i in 0..n {
        let (c, b, g, wait) = (client.clone(), fake_base.clone(), gate.clone(), offset(i));
        tasks.push(tokio::spawn(async move {
            let _p = g.acquire().await?;
            tokio::time::sleep(wait).await;
            direct(c, b).await
        }));
    }
    let cpu0 = cpu_now(coachd);
    gate.add_permits(n);
    let direct_row = measured("direct to fake", n, coachd, cpu0, tasks).await;

    let mut sessions = Vec::new();
    for i in 0..n {
        sessions.push(create_session(&client, &coachd.base, i).await?);
    }
    let gate = Arc::new(Semaphore::new(0));
    let mut tasks = Vec::new();
    for (i, (id, _)) in sessions.iter().enumerate() {
        let (c, b, g, id, wait) = (
            client.clone(),
            coachd.base.clone(),
            gate.clone(),
            id.clone(),
            offset(i),
        );
        tasks.push(tokio::spawn(async move {
            let _p = g.acquire().await?;
            tokio::time::sleep(wait).await;
            via_sse(c, b, id).await
        }));
    }
    let cpu0 = cpu_now(coachd);
    gate.add_permits(n);
    let sse_row = measured("coachd SSE", n, coachd, cpu0, tasks).await;

    let mut sockets = Vec::new();
    for (id, token) in &sessions {
        sockets.push(ws_open(coachd.port, id, token).await?);
    }
    let gate = Arc::new(Semaphore::new(0));
    let mut tasks = Vec::new();
    for (i, ws) in sockets.into_iter().enumerate() {
        let (g, wait) = (gate.clone(), offset(i));
        tasks.push(tokio::spawn(async move {
            let _p = g.acquire().await?;
            tokio::time::sleep(wait).await;
            via_ws(ws).await
        }));
    }
    let cpu0 = cpu_now(coachd);
    gate.add_permits(n);
    let ws_row = measured("coachd WebSocket", n, coachd, cpu0, tasks).await;

    for (id, _) in &sessions {
        let _ = client
            .post(format!("{}/realtime/sessions/{id}/end", coachd.base))
            .json(&json!({}))
            .send()
            .await;
    }
    Ok(vec![direct_row, sse_row, ws_row])
}

async fn idle_rss(fake: &FakeUpstream, sessions: usize) -> Result<(u64, u64, usize), BoxError> {
    // A fresh process, so earlier levels' allocations do not blur the figure.
    let coachd = start_coachd(fake).await?;
    let client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(coachd.child.id())?;
    let mut sockets = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let (id, token) = create_session(&client, &coachd.base, i).await?;
        sockets.push(ws_open(coachd.port, &id, &token).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(coachd.child.id())?;
    let open = sockets.len();
    drop(sockets);
    Ok((before, after, open))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // `cargo test --all-targets` runs bench binaries too; only `cargo bench` (which passes
    // --bench) should spend minutes measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("stream benchmark: skipped outside `cargo bench --bench stream`");
        return Ok(());
    }
    let quick = std::env::var_os("COACHD_BENCH_QUICK").is_some();
    let levels: &[usize] = if quick { &[1, 20] } else { &[1, 100, 1000] };
    let idle_sessions = if quick { 500 } else { 10_000 };
    // COACHD_BENCH_ONLY=burst,sustained,idle picks sections (all by default).
    let only = std::env::var("COACHD_BENCH_ONLY").unwrap_or_default();
    let section = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    let levels: &[usize] = if section("burst") { levels } else { &[] };

    let fake = FakeUpstream::start().await?;
    fake.set_default(Script::counted(TOKENS).paced(Duration::ZERO, TOKEN_INTERVAL));
    let coachd = start_coachd(&fake).await?;

    // Warm-up: connection pools, allocator, the first-request paths.
    run_level(&fake, &coachd, 4, Duration::ZERO).await?;

    println!(
        "\n## Streaming latency ({TOKENS} tokens per stream, {} ms apart upstream)\n",
        TOKEN_INTERVAL.as_millis()
    );
    println!(
        "| path | streams | TTFT p50 ms | TTFT p99 ms | TTFT max ms | gap p50 ms | gap p99 ms | failed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut added = Vec::new();
    for &n in levels {
        let rows = run_level(&fake, &coachd, n, Duration::ZERO).await?;
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.path,
                r.streams,
                ms(r.ttft.p50),
                ms(r.ttft.p99),
                ms(r.ttft.max),
                ms(r.gap.p50),
                ms(r.gap.p99),
                r.failed
            );
        }
        let base = rows[0].ttft;
        for r in &rows[1..] {
            added.push((
                r.path,
                n,
                r.ttft.p50.saturating_sub(base.p50),
                r.ttft.p99.saturating_sub(base.p99),
            ));
        }
    }
    println!("\n## Added time to first token (coachd minus direct)\n");
    println!("| path | streams | added p50 ms | added p99 ms |");
    println!("|---|---:|---:|---:|");
    for (path, n, p50, p99) in added {
        println!("| {path} | {n} | {} | {} |", ms(p50), ms(p99));
    }

    // Sustained load: 1 000 streams in flight together, their starts spread over one second so the
    // load generator does not measure its own connection storm. 40 tokens 50 ms apart: 2 s each.
    let sustained = if !section("sustained") {
        0
    } else if quick {
        50
    } else {
        1000
    };
    fake.set_default(Script::counted(40).paced(Duration::ZERO, Duration::from_millis(50)));
    let rows = run_level(&fake, &coachd, sustained, Duration::from_secs(1)).await?;
    println!(
        "\n## Sustained concurrency ({sustained} streams of 40 tokens 50 ms apart, starts spread over 1 s)\n"
    );
    println!(
        "| path | streams | TTFT p50 ms | TTFT p99 ms | TTFT max ms | gap p50 ms | gap p99 ms | failed | added TTFT p50 ms | added TTFT p99 ms | coachd CPU µs/token | bench CPU µs/token |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let base = rows[0].ttft;
    for r in &rows {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / r.tokens.max(1) as f64;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |",
            r.path,
            r.streams,
            ms(r.ttft.p50),
            ms(r.ttft.p99),
            ms(r.ttft.max),
            ms(r.gap.p50),
            ms(r.gap.p99),
            r.failed,
            ms(r.ttft.p50.saturating_sub(base.p50)),
            ms(r.ttft.p99.saturating_sub(base.p99)),
            per(r.coachd_cpu),
            per(r.bench_cpu)
        );
    }

    if !section("idle") {
        return Ok(());
    }
    let (before, after, open) = idle_rss(&fake, idle_sessions).await?;
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / open as f64;
    println!("\n## Idle WebSocket sessions\n");
    println!("| sessions | RSS before | RSS after | per session |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {open} | {:.1} MiB | {:.1} MiB | {:.1} KiB |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        per / 1024.0
    );
    drop(coachd);
    Ok(())
}
