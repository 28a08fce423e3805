//! The load generator: a level is N streams held in flight for a window by N closed-loop
//! workers, one connection each, their first starts spread over one stream's length so arrivals
//! are even; only streams begun after that ramp are timed. A level runs its paths one after
//! another against the same fake, and the direct path first as the baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::BoxError;
use crate::clients::{self, OpenAiTarget, Ws};
use crate::coachd::{API_KEY, Coachd};
use crate::fake::FakeProcess;
use crate::litellm::LiteLlm;
use crate::measure::{CpuSnapshot, Pids, Summary, Trace, summarize};

/// A stream that takes longer than this counts as failed (an overloaded peer must not hang
/// the run).
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// The shape of one concurrency level.
#[derive(Debug, Clone, Copy)]
pub struct Level {
    /// Streams in flight together.
    pub streams: usize,
    /// Tokens per stream, and the upstream's pace between them.
    pub tokens: usize,
    pub interval: Duration,
    /// How long streams are timed, after the ramp.
    pub window: Duration,
}

impl Level {
    /// One stream's length upstream; the first starts are spread over it.
    fn ramp(&self) -> Duration {
        self.interval * self.tokens as u32
    }

    /// A short level that warms up connection pools, allocators and first-request paths.
    pub fn warm_up() -> Self {
        Level {
            streams: 4,
            tokens: 5,
            interval: Duration::from_millis(10),
            window: Duration::from_millis(300),
        }
    }
}

/// The paths a stream can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Straight to the fake: what a client sees with no server in the middle.
    Direct,
    /// coachd `POST /realtime/sessions/{id}/turn` with `Accept: text/event-stream`.
    SessionSse,
    /// coachd's session WebSocket, a `user_message` frame per turn.
    WebSocket,
    /// coachd `POST /api/v1/llm/stream`.
    LlmStream,
    /// coachd `POST /v1/chat/completions`, `stream: true`.
    ChatCompletions,
    /// The LiteLLM proxy's `POST /v1/chat/completions`, `stream: true`.
    LiteLlm,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct to fake",
            PathKind::SessionSse => "coachd session SSE",
            PathKind::WebSocket => "coachd WebSocket",
            PathKind::LlmStream => "coachd /api/v1/llm/stream",
            PathKind::ChatCompletions => "coachd /v1/chat/completions",
            PathKind::LiteLlm => "LiteLLM /v1/chat/completions",
        }
    }

    /// The short name `COACHD_BENCH_PATHS` takes.
    pub fn key(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::SessionSse => "sse",
            PathKind::WebSocket => "ws",
            PathKind::LlmStream => "llm-stream",
            PathKind::ChatCompletions => "chat",
            PathKind::LiteLlm => "litellm",
        }
    }

    /// `paths` less those `COACHD_BENCH_PATHS` (e.g. `ws,chat`) leaves out; the direct
    /// baseline always stays.
    pub fn selected(paths: &[PathKind]) -> Vec<PathKind> {
        let keep = std::env::var("COACHD_BENCH_PATHS").unwrap_or_default();
        paths
            .iter()
            .copied()
            .filter(|p| {
                *p == PathKind::Direct
                    || keep.trim().is_empty()
                    || keep.split(',').any(|k| k.trim() == p.key())
            })
            .collect()
    }

    /// The four coachd paths, after the direct baseline.
    pub const COACHD: [PathKind; 5] = [
        PathKind::Direct,
        PathKind::SessionSse,
        PathKind::WebSocket,
        PathKind::LlmStream,
        PathKind::ChatCompletions,
    ];
}

/// What one worker runs its streams over.
enum Conn {
    OpenAi(reqwest::Client, Arc<OpenAiTarget>),
    LlmStream(reqwest::Client, String),
    SessionSse(reqwest::Client, String, String),
    Ws(Box<Ws>),
}

impl Conn {
    async fn stream(&mut self) -> Result<Trace, BoxError> {
        let stream = async {
            match self {
                Conn::OpenAi(client, target) => clients::openai_chat(client, target).await,
                Conn::LlmStream(client, base) => clients::llm_stream(client, base).await,
                Conn::SessionSse(client, base, session) => clients::session_sse(client, base, session).await,
                Conn::Ws(ws) => clients::ws_turn(ws).await,
            }
        };
        tokio::time::timeout(STREAM_TIMEOUT, stream)
            .await
            .map_err(|_| format!("no end after {STREAM_TIMEOUT:?}"))?
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
                out.tokens += trace.tokens();
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

/// The figures of one path at one level.
#[derive(Debug)]
pub struct Row {
    pub path: PathKind,
    pub level: Level,
    pub ttft: Summary,
    pub gap: Summary,
    pub samples: usize,
    pub failed: usize,
    /// Tokens the clients received per second of the level.
    pub tokens_per_sec: f64,
    /// CPU time per token received: the server under test (none on the direct path), the fake,
    /// and this process (the clients).
    pub server_us_per_token: Option<f64>,
    pub fake_us_per_token: f64,
    pub clients_us_per_token: f64,
    /// The server's RSS (KiB) before the path's streams start, at its peak while they run
    /// (sampled every 100 ms), and once they have ended; none on the direct path.
    pub rss_kib: Option<(u64, u64, u64)>,
}

/// Runs one path of a level: every worker on its connection, timed as described in the header.
async fn run_path(path: PathKind, level: Level, pids: Pids, conns: Vec<Conn>, rss_start: Option<u64>) -> Row {
    let n = conns.len().max(1);
    let ramp = level.ramp();
    let t0 = Instant::now() + Duration::from_millis(50);
    let timed_from = t0 + ramp;
    let end = timed_from + level.window;
    let cpu0 = CpuSnapshot::take(pids);
    // From the level's start, before its sessions and connections: their cost is the stream's.
    let rss_before = pids.server.and(rss_start);
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = pids.server.map(|pid| {
        let stop = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = tick.tick() => peak = peak.max(crate::measure::rss_kib(pid).unwrap_or(0)),
                    () = stop.cancelled() => {}
                }
            }
            peak
        })
    });
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
    let elapsed = t0.elapsed();
    let (server, fake, clients) = CpuSnapshot::take(pids).since(cpu0);
    sampling.cancel();
    let peak = match sampler {
        Some(task) => task.await.ok(),
        None => None,
    };
    let rss_after = pids.server.and_then(|pid| crate::measure::rss_kib(pid).ok());
    let rss_kib = match (rss_before, peak, rss_after) {
        (Some(b), Some(p), Some(a)) => Some((b, p.max(b), a)),
        _ => None,
    };
    if let Some(e) = first_error {
        eprintln!("{} x{}: a stream failed: {e}", path.name(), level.streams);
    }
    let per_token = |d: Duration| d.as_secs_f64() * 1e6 / tokens.max(1) as f64;
    Row {
        path,
        level,
        samples: ttfts.len(),
        ttft: summarize(ttfts),
        gap: summarize(gaps),
        failed,
        tokens_per_sec: tokens as f64 / elapsed.as_secs_f64(),
        server_us_per_token: pids.server.map(|_| per_token(server)),
        fake_us_per_token: per_token(fake),
        clients_us_per_token: per_token(clients),
        rss_kib,
    }
}

/// The servers a level's paths go through.
#[derive(Debug, Clone, Copy)]
pub struct Servers<'a> {
    pub coachd: &'a Coachd,
    pub litellm: Option<&'a LiteLlm>,
}

/// One level on each of `paths`, one after another, against the same fake and servers.
pub async fn run_level(
    fake: &mut FakeProcess,
    servers: Servers<'_>,
    level: Level,
    paths: &[PathKind],
) -> Result<Vec<Row>, BoxError> {
    let n = level.streams;
    fake.set_script(level.tokens, level.interval)?;
    let new_client = || {
        reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(2 * n + 16)
            .build()
    };
    let client = new_client()?;
    let coachd = servers.coachd;
    let rss_start = crate::measure::rss_kib(coachd.pid()).ok();
    let needs_sessions = paths
        .iter()
        .any(|p| matches!(p, PathKind::SessionSse | PathKind::WebSocket));
    let mut sessions = Vec::new();
    if needs_sessions {
        for i in 0..n {
            sessions.push(clients::create_session(&client, &coachd.base, i).await?);
        }
    }
    let openai = |client: &reqwest::Client, url: String, key: &str, model: &str| {
        let target = Arc::new(OpenAiTarget {
            url,
            key: key.to_owned(),
            model: model.to_owned(),
        });
        (0..n)
            .map(|_| Conn::OpenAi(client.clone(), target.clone()))
            .collect::<Vec<_>>()
    };
    let mut rows = Vec::new();
    for &path in paths {
        // A client (and pool) per path: at 10 000 streams the previous path's idle connections
        // would otherwise hold this process's descriptors.
        let client = new_client()?;
        let mut server = Some(coachd.pid());
        let conns = match path {
            PathKind::Direct => {
                server = None;
                openai(
                    &client,
                    format!("{}/chat/completions", fake.base_url()),
                    "bench",
                    "bench",
                )
            }
            PathKind::ChatCompletions => openai(
                &client,
                format!("{}/v1/chat/completions", coachd.base),
                API_KEY,
                "chat",
            ),
            PathKind::LiteLlm => {
                let litellm = servers.litellm.ok_or("no LiteLLM running")?;
                server = Some(litellm.pid());
                openai(
                    &client,
                    format!("{}/v1/chat/completions", litellm.base),
                    crate::litellm::MASTER_KEY,
                    crate::litellm::MODEL,
                )
            }
            PathKind::LlmStream => (0..n)
                .map(|_| Conn::LlmStream(client.clone(), coachd.base.clone()))
                .collect(),
            PathKind::SessionSse => sessions
                .iter()
                .map(|(id, _)| Conn::SessionSse(client.clone(), coachd.base.clone(), id.clone()))
                .collect(),
            PathKind::WebSocket => {
                let mut conns = Vec::new();
                for (id, token) in &sessions {
                    conns.push(Conn::Ws(Box::new(
                        clients::ws_open(coachd.port, id, token).await?,
                    )));
                }
                conns
            }
        };
        let pids = Pids {
            server,
            fake: fake.pid(),
        };
        rows.push(run_path(path, level, pids, conns, rss_start).await);
    }
    for (id, _) in &sessions {
        clients::end_session(&client, &coachd.base, id).await;
    }
    Ok(rows)
}

/// Warms the servers up, then runs every level on `paths`.
pub async fn run_levels(
    fake: &mut FakeProcess,
    servers: Servers<'_>,
    levels: &[Level],
    paths: &[PathKind],
) -> Result<Vec<Row>, BoxError> {
    let paths = PathKind::selected(paths);
    run_level(fake, servers, Level::warm_up(), &paths).await?;
    let mut rows = Vec::new();
    for &level in levels {
        rows.extend(run_level(fake, servers, level, &paths).await?);
    }
    Ok(rows)
}

/// One level of session WebSocket turns on sessions created on `owner`, with the WebSockets
/// opened on `attach`: the same node (local delivery) or another node on the same Redis
/// (cross-node: every token relayed through Redis, every turn forwarded to the owner).
pub async fn run_ws_level(
    fake: &mut FakeProcess,
    level: Level,
    owner: &Coachd,
    attach: &Coachd,
) -> Result<Row, BoxError> {
    let n = level.streams;
    fake.set_script(level.tokens, level.interval)?;
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(2 * n + 16)
        .build()?;
    let mut sessions = Vec::new();
    for i in 0..n {
        sessions.push(clients::create_session(&client, &owner.base, i).await?);
    }
    let mut conns = Vec::new();
    for (id, token) in &sessions {
        conns.push(Conn::Ws(Box::new(
            clients::ws_open(attach.port, id, token).await?,
        )));
    }
    let pids = Pids {
        server: Some(attach.pid()),
        fake: fake.pid(),
    };
    let row = run_path(PathKind::WebSocket, level, pids, conns, None).await;
    for (id, _) in &sessions {
        clients::end_session(&client, &owner.base, id).await;
    }
    Ok(row)
}

/// What a set of workers did: tokens received, streams failed, and the first failure.
#[derive(Debug, Default)]
pub struct MixedOut {
    pub tokens: usize,
    pub failed: usize,
    pub first_error: Option<String>,
}

/// `n` workers over a mix of transports, a third each (session WebSocket, session SSE,
/// `/v1/chat/completions`), their starts spread over `ramp`, streaming back to back until `end`
/// (the soak). Returns once every worker has ended.
pub async fn run_mixed(
    coachd: &Coachd,
    n: usize,
    ramp: Duration,
    end: Instant,
) -> Result<MixedOut, BoxError> {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(2 * n + 16)
        .build()?;
    let target = Arc::new(OpenAiTarget {
        url: format!("{}/v1/chat/completions", coachd.base),
        key: API_KEY.to_owned(),
        model: "chat".to_owned(),
    });
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(match i % 3 {
            0 => {
                let (id, token) = clients::create_session(&client, &coachd.base, i).await?;
                Conn::Ws(Box::new(clients::ws_open(coachd.port, &id, &token).await?))
            }
            1 => {
                let (id, _) = clients::create_session(&client, &coachd.base, i).await?;
                Conn::SessionSse(client.clone(), coachd.base.clone(), id)
            }
            _ => Conn::OpenAi(client.clone(), target.clone()),
        });
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let start = t0 + ramp.mul_f64(i as f64 / n.max(1) as f64);
            tokio::spawn(worker(conn, start, end, end))
        })
        .collect();
    let mut out = MixedOut::default();
    for t in tasks {
        match t.await {
            Ok(w) => {
                out.tokens += w.tokens;
                out.failed += w.failed;
                out.first_error = out.first_error.or(w.first_error);
            }
            Err(_) => out.failed += 1,
        }
    }
    Ok(out)
}
