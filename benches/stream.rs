//! Streaming benchmark: time to first token and gaps between tokens, direct to the fake upstream
//! and through coachd (SSE and WebSocket), at 1, 100 and 1 000 concurrent streams, side by side
//! in one run; then the resident memory per idle WebSocket session at 10 000 sessions.
//!
//! Each level holds N streams in flight for its whole window: N closed-loop workers, each running
//! one stream after another (a worker's turns share one coachd session, as a conversation would),
//! their first starts spread over one stream's length so arrivals are even. Only streams that
//! start after that ramp are timed.
//!
//! coachd runs as its own process (the release binary, embedded stores, the fake as its OpenAI
//! upstream), so its RSS and CPU are its own; the fake and the clients share this process. The
//! `stores` section runs 1 and 100 streams again with coachd on real Redis and PostgreSQL (a
//! scratch database) when `DATABASE_URL` and `REDIS_URL` are set.
//!
//! ```sh
//! cargo bench --bench stream                 # full run
//! COACHD_BENCH_QUICK=1 cargo bench --bench stream   # smaller, for a smoke check
//! COACHD_BENCH_ONLY=latency|stores|idle cargo bench --bench stream   # some sections
//! set -a; . .services/env; set +a; COACHD_BENCH_ONLY=stores cargo bench --bench stream  # real stores
//! COACHD_BENCH_STREAMS=1000 cargo bench --bench stream         # only the levels of these sizes
//! COACHD_BENCH_PIN=1 cargo bench --bench stream                 # coachd on a CPU of its own
//! COACHD_BENCH_THINK_MS=200 cargo bench --bench stream          # pause between a worker's turns
//! COACHD_BENCH_LOG=debug cargo bench --bench stream             # coachd's log to stderr
//! ```

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark: every spawned stream is awaited before the run ends"
)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coachd::fake_upstream::{FakeUpstream, Script};
use eventsource_stream::Eventsource;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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

/// Latencies of one stream: time to first token, then each gap.
#[derive(Debug, Default, Clone)]
struct Trace {
    ttft: Duration,
    gaps: Vec<Duration>,
    last: Option<Instant>,
}

impl Trace {
    /// A token arrived now, in a stream started at `start`.
    fn token(&mut self, start: Instant) {
        let now = Instant::now();
        match self.last {
            None => self.ttft = now - start,
            Some(prev) => self.gaps.push(now - prev),
        }
        self.last = Some(now);
    }
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

/// Where the two processes run. By default coachd, the fake and the clients share every CPU, as
/// they must on a small machine. With `COACHD_BENCH_PIN=1` (two or more CPUs and `taskset`),
/// coachd gets the last CPU to itself and this process (the fake and the clients) the others,
/// closer to a load generator on a separate machine; the direct path runs the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Pinned { coachd_cpu: usize },
    Shared,
}

impl Placement {
    fn choose() -> Self {
        if std::env::var_os("COACHD_BENCH_PIN").is_none() {
            return Placement::Shared;
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus < 2 {
            eprintln!("COACHD_BENCH_PIN needs two CPUs; running shared");
            return Placement::Shared;
        }
        let coachd_cpu = cpus - 1;
        // Every thread of this process (tokio's workers already exist) onto the other CPUs.
        let ok = Command::new("taskset")
            .args([
                "-a",
                "-cp",
                &format!("0-{}", coachd_cpu - 1),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Placement::Pinned { coachd_cpu }
        } else {
            eprintln!("taskset failed; running shared");
            Placement::Shared
        }
    }

    fn describe(self) -> String {
        match self {
            Placement::Pinned { coachd_cpu } => format!(
                "coachd pinned to CPU {coachd_cpu} (one runtime worker), the fake and the clients to CPU 0-{}",
                coachd_cpu - 1
            ),
            Placement::Shared => "coachd, the fake and the clients share every CPU".to_owned(),
        }
    }
}

async fn start_coachd(
    fake: &FakeUpstream,
    placement: Placement,
    extra_env: &[(&str, String)],
) -> Result<Coachd, BoxError> {
    let port = free_port()?;
    let mut command = match placement {
        // taskset execs coachd, so the child's pid is coachd's own (for RSS and CPU time).
        Placement::Pinned { coachd_cpu } => {
            let mut c = Command::new("taskset");
            c.args(["-c", &coachd_cpu.to_string(), env!("CARGO_BIN_EXE_coachd")]);
            c
        }
        Placement::Shared => Command::new(env!("CARGO_BIN_EXE_coachd")),
    };
    let child = command
        .env_clear()
        .env("PORT", port.to_string())
        .env("COACHD_HOST", "127.0.0.1")
        .env("LLM_PROVIDER", "openai")
        .env("OPENAI_API_KEY", "bench")
        .env("COACHD_OPENAI_BASE_URL", fake.base_url())
        .env(
            "COACHD_LOG",
            std::env::var("COACHD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("COACHD_MAX_SESSIONS", "20000")
        .env("RATE_LIMIT_ENABLED", "false")
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(std::env::temp_dir())
        // With COACHD_BENCH_LOG, coachd's log (on its stdout) goes to this process's stderr.
        .stdout(if std::env::var_os("COACHD_BENCH_LOG").is_some() {
            Stdio::from(std::io::stderr())
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..600 {
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
async fn direct(client: &reqwest::Client, base: &str) -> Result<Trace, BoxError> {
    let body = json!({"model": "bench", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hello"}]});
    let start = Instant::now();
    let resp = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth("bench")
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut events = resp.bytes_stream().eventsource();
    let mut trace = Trace::default();
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
            trace.token(start);
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
async fn via_sse(client: &reqwest::Client, base: &str, session: &str) -> Result<Trace, BoxError> {
    let start = Instant::now();
    let resp = client
        .post(format!("{base}/realtime/sessions/{session}/turn"))
        .header("accept", "text/event-stream")
        .json(&json!({"text": "hello"}))
        .send()
        .await?
        .error_for_status()?;
    let mut events = resp.bytes_stream().eventsource();
    let mut trace = Trace::default();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        match ev.event.as_str() {
            "token" => {
                trace.token(start);
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
    // tungstenite's default 128 KiB read buffer is zeroed on every read: a load generator's
    // cost per frame that would crowd coachd off the CPU.
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://127.0.0.1:{port}/realtime/sessions/{session}/ws?token={token}"),
        Some(config),
        true,
    )
    .await?;
    // The connection's first event is the session state.
    ws.next().await.ok_or("closed")??;
    Ok(ws)
}

/// One turn through coachd's WebSocket (connected beforehand, not timed).
async fn via_ws(ws: &mut Ws) -> Result<Trace, BoxError> {
    let start = Instant::now();
    ws.send(Message::text(
        json!({"type": "user_message", "text": "hello"}).to_string(),
    ))
    .await?;
    let mut trace = Trace::default();
    while let Some(msg) = ws.next().await {
        let Message::Text(text) = msg? else { continue };
        let frame: Frame = serde_json::from_str(text.as_str())?;
        match frame.kind.as_ref() {
            "token" => {
                trace.token(start);
            }
            "turn_end" => break,
            "error" => return Err(format!("turn error: {text}").into()),
            _ => {}
        }
    }
    Ok(trace)
}

/// The shape of one concurrency level.
#[derive(Debug, Clone, Copy)]
struct Level {
    /// Streams in flight together.
    streams: usize,
    /// Tokens per stream, and the upstream's pace between them.
    tokens: usize,
    interval: Duration,
    /// How long streams are timed, after the ramp.
    window: Duration,
}

impl Level {
    /// One stream's length upstream; the first starts are spread over it.
    fn ramp(&self) -> Duration {
        self.interval * self.tokens as u32
    }
}

/// What one worker runs its streams over.
enum Conn {
    Direct(reqwest::Client, String),
    Sse(reqwest::Client, String, String),
    Ws(Box<Ws>),
}

impl Conn {
    async fn stream(&mut self) -> Result<Trace, BoxError> {
        match self {
            Conn::Direct(client, base) => direct(client, base).await,
            Conn::Sse(client, base, session) => via_sse(client, base, session).await,
            Conn::Ws(ws) => via_ws(ws).await,
        }
    }
}

#[derive(Debug, Default)]
struct WorkerOut {
    timed: Vec<Trace>,
    tokens: usize,
    failed: usize,
    first_error: Option<String>,
}

/// Runs streams back to back from `start` until `end`; keeps the traces of those begun at or
/// after `timed_from`. A failed stream ends the worker (its connection may be gone).
async fn worker(mut conn: Conn, start: Instant, timed_from: Instant, end: Instant) -> WorkerOut {
    let think = std::env::var("COACHD_BENCH_THINK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    tokio::time::sleep_until(start.into()).await;
    let mut out = WorkerOut::default();
    while Instant::now() < end {
        let began = Instant::now();
        match conn.stream().await {
            Ok(trace) => {
                out.tokens += trace.gaps.len() + 1;
                if began >= timed_from {
                    out.timed.push(trace);
                }
                if let Some(think) = think {
                    tokio::time::sleep(think).await;
                }
            }
            Err(e) => {
                out.failed += 1;
                out.first_error = Some(e.to_string());
                break;
            }
        }
    }
    if let Conn::Ws(ws) = &mut conn {
        let _ = ws.as_mut().close(None).await;
    }
    out
}

struct Row {
    path: &'static str,
    level: Level,
    ttft: Summary,
    gap: Summary,
    samples: usize,
    failed: usize,
    /// CPU time per token received, of coachd and of this process (the fake and the clients).
    coachd_us_per_token: f64,
    bench_us_per_token: f64,
}

/// Runs one path of a level: every worker on its connection, timed as described in the header.
async fn run_path(path: &'static str, level: Level, coachd: &Coachd, conns: Vec<Conn>) -> Row {
    let n = conns.len().max(1);
    let ramp = level.ramp();
    let t0 = Instant::now() + Duration::from_millis(50);
    let timed_from = t0 + ramp;
    let end = timed_from + level.window;
    let cpu0 = cpu_now(coachd);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let start = t0 + ramp.mul_f64(i as f64 / n as f64);
            tokio::spawn(worker(conn, start, timed_from, end))
        })
        .collect();
    let (mut ttfts, mut gaps, mut tokens, mut failed) = (Vec::new(), Vec::new(), 0, 0);
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(out) => {
                tokens += out.tokens;
                failed += out.failed;
                first_error = first_error.or(out.first_error);
                for trace in out.timed {
                    ttfts.push(trace.ttft);
                    gaps.extend(trace.gaps);
                }
            }
            Err(_) => failed += 1,
        }
    }
    let cpu1 = cpu_now(coachd);
    if let Some(e) = first_error {
        eprintln!("{path} x{}: a stream failed: {e}", level.streams);
    }
    let per_token = |d: Duration| d.as_secs_f64() * 1e6 / tokens.max(1) as f64;
    Row {
        path,
        level,
        samples: ttfts.len(),
        ttft: summarize(ttfts),
        gap: summarize(gaps),
        failed,
        coachd_us_per_token: per_token(cpu1.0.saturating_sub(cpu0.0)),
        bench_us_per_token: per_token(cpu1.1.saturating_sub(cpu0.1)),
    }
}

fn cpu_now(coachd: &Coachd) -> (Duration, Duration) {
    (cpu_time(&coachd.child.id().to_string()), cpu_time("self"))
}

/// One level on all three paths, one after another, against the same fake and coachd.
async fn run_level(fake: &FakeUpstream, coachd: &Coachd, level: Level) -> Result<Vec<Row>, BoxError> {
    let n = level.streams;
    fake.set_default(Script::counted(level.tokens).paced(Duration::ZERO, level.interval));
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(2 * n + 16)
        .build()?;

    let conns = (0..n)
        .map(|_| Conn::Direct(client.clone(), fake.base_url()))
        .collect();
    let direct_row = run_path("direct to fake", level, coachd, conns).await;

    let mut sessions = Vec::new();
    for i in 0..n {
        sessions.push(create_session(&client, &coachd.base, i).await?);
    }
    let conns = sessions
        .iter()
        .map(|(id, _)| Conn::Sse(client.clone(), coachd.base.clone(), id.clone()))
        .collect();
    let sse_row = run_path("coachd SSE", level, coachd, conns).await;

    let mut conns = Vec::new();
    for (id, token) in &sessions {
        conns.push(Conn::Ws(Box::new(ws_open(coachd.port, id, token).await?)));
    }
    let ws_row = run_path("coachd WebSocket", level, coachd, conns).await;

    for (id, _) in &sessions {
        let _ = client
            .post(format!("{}/realtime/sessions/{id}/end", coachd.base))
            .json(&json!({}))
            .send()
            .await;
    }
    Ok(vec![direct_row, sse_row, ws_row])
}

async fn idle_rss(
    fake: &FakeUpstream,
    placement: Placement,
    sessions: usize,
) -> Result<(u64, u64, usize), BoxError> {
    // A fresh process, so earlier levels' allocations do not blur the figure.
    let coachd = start_coachd(fake, placement, &[]).await?;
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

/// Warms coachd up, then runs every level.
async fn run_levels(fake: &FakeUpstream, coachd: &Coachd, levels: &[Level]) -> Result<Vec<Row>, BoxError> {
    // Warm-up: connection pools, allocator, the first-request paths.
    let warm = Level {
        streams: 4,
        tokens: 5,
        interval: Duration::from_millis(10),
        window: Duration::from_millis(300),
    };
    run_level(fake, coachd, warm).await?;
    let mut rows = Vec::new();
    for &level in levels {
        rows.extend(run_level(fake, coachd, level).await?);
    }
    Ok(rows)
}

fn print_rows(rows: &[Row]) {
    println!(
        "| path | streams | tokens × pace | timed streams | TTFT p50 ms | TTFT p99 ms | TTFT max ms | gap p50 ms | gap p99 ms | failed | coachd CPU µs/token | bench CPU µs/token |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} × {} ms | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |",
            r.path,
            r.level.streams,
            r.level.tokens,
            r.level.interval.as_millis(),
            r.samples,
            ms(r.ttft.p50),
            ms(r.ttft.p99),
            ms(r.ttft.max),
            ms(r.gap.p50),
            ms(r.gap.p99),
            r.failed,
            r.coachd_us_per_token,
            r.bench_us_per_token
        );
    }
}

/// Added first-token time of each coachd path over the direct one of its level (rows come in
/// threes: direct, SSE, WebSocket), against the targets.
fn print_added(rows: &[Row]) {
    println!("\nAdded time to first token (coachd minus direct, same level):\n");
    println!("| path | streams | added p50 ms | added p99 ms | target p99 |");
    println!("|---|---:|---:|---:|---|");
    for level_rows in rows.chunks(3) {
        let base = level_rows[0].ttft;
        for r in &level_rows[1..] {
            let added = r.ttft.p99.as_secs_f64() * 1e3 - base.p99.as_secs_f64() * 1e3;
            let target = match r.level.streams {
                1 => format!("< 1 ms: {}", if added < 1.0 { "met" } else { "NOT met" }),
                1000 => format!("< 5 ms: {}", if added < 5.0 { "met" } else { "NOT met" }),
                _ => "none".to_owned(),
            };
            println!(
                "| {} | {} | {:.3} | {:.3} | {target} |",
                r.path,
                r.level.streams,
                r.ttft.p50.as_secs_f64() * 1e3 - base.p50.as_secs_f64() * 1e3,
                added
            );
        }
    }
}

/// Runs `body` against a scratch database created on `admin_url`'s server, dropped afterwards
/// (whatever `body` returned).
async fn with_scratch_database<F, Fut, T>(admin_url: &str, body: F) -> Result<T, BoxError>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, BoxError>>,
{
    let scratch = coachd::db::ScratchDatabase::create(admin_url, "coachd_bench_").await?;
    let result = body(scratch.url.clone()).await;
    scratch.drop_now().await?;
    result
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
    let only = std::env::var("COACHD_BENCH_ONLY").unwrap_or_default();
    let section = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    let ms50 = Duration::from_millis(50);
    let ms10 = Duration::from_millis(10);
    let levels: Vec<Level> = if quick {
        vec![
            Level {
                streams: 1,
                tokens: 10,
                interval: ms10,
                window: Duration::from_secs(2),
            },
            Level {
                streams: 50,
                tokens: 40,
                interval: ms50,
                window: Duration::from_secs(2),
            },
        ]
    } else {
        vec![
            // One stream: short ones, so the window holds enough of them for a percentile.
            Level {
                streams: 1,
                tokens: 10,
                interval: ms10,
                window: Duration::from_secs(8),
            },
            Level {
                streams: 100,
                tokens: 40,
                interval: ms50,
                window: Duration::from_secs(6),
            },
            Level {
                streams: 1000,
                tokens: 40,
                interval: ms50,
                window: Duration::from_secs(6),
            },
        ]
    };
    // COACHD_BENCH_STREAMS=1000 keeps only the levels of those stream counts (for profiling).
    let levels: Vec<Level> = match std::env::var("COACHD_BENCH_STREAMS") {
        Ok(keep) => levels
            .into_iter()
            .filter(|l| keep.split(',').any(|k| k.trim() == l.streams.to_string()))
            .collect(),
        Err(_) => levels,
    };
    let idle_sessions = if quick { 500 } else { 10_000 };

    let placement = Placement::choose();
    println!("\nplacement: {}", placement.describe());
    let fake = FakeUpstream::start().await?;
    if section("latency") {
        let coachd = start_coachd(&fake, placement, &[]).await?;
        let rows = run_levels(&fake, &coachd, &levels).await?;
        println!("\n## Streaming latency at steady concurrency\n");
        print_rows(&rows);
        print_added(&rows);
    }

    if section("stores") {
        match (std::env::var("DATABASE_URL"), std::env::var("REDIS_URL")) {
            (Ok(db), Ok(redis)) => {
                // Real stores put a Redis read and a pgvector search on every turn's prompt, and
                // write-behind adds two appends and a memory insert after it. One and 100 streams:
                // at 1 000, each turn's HNSW insert (~10 ms of CPU) would need more than two cores.
                let store_levels: Vec<Level> = levels.iter().copied().filter(|l| l.streams <= 100).collect();
                let rows = with_scratch_database(&db, |url| {
                    let fake = &fake;
                    let store_levels = &store_levels;
                    async move {
                        let prefix = format!("coachd_bench_{}:", uuid::Uuid::new_v4().simple());
                        let env = [
                            ("DATABASE_URL", url),
                            ("REDIS_URL", redis),
                            ("COACHD_REDIS_KEY_PREFIX", prefix),
                        ];
                        let coachd = start_coachd(fake, placement, &env).await?;
                        run_levels(fake, &coachd, store_levels).await
                    }
                })
                .await?;
                println!("\n## With Redis and PostgreSQL + pgvector behind coachd\n");
                print_rows(&rows);
                print_added(&rows);
            }
            _ => println!(
                "\n(stores: skipped; set DATABASE_URL and REDIS_URL, e.g. `set -a; . .services/env; set +a` after scripts/services)"
            ),
        }
    }

    if !section("idle") {
        return Ok(());
    }
    let (before, after, open) = idle_rss(&fake, placement, idle_sessions).await?;
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
    Ok(())
}
