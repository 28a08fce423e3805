//! Faults under load (issue 15.1): sessions stream over WebSocket, SSE and HTTP turns on two
//! `coachd serve` processes while the harness restarts a Redis and a PostgreSQL of its own,
//! stalls the upstream, cuts upstream streams mid-reply, kills a `coachd worker` and then a node
//! with SIGKILL. Noop jobs are submitted throughout. Afterwards it counts what every client saw
//! and what the stores hold:
//!
//! - every turn a client started ends with a `turn_end` (possibly after an explicit `error`) or
//!   was refused with a typed error: 0 left hanging;
//! - every turn a session counts as finished is in the Redis context and in PostgreSQL memory,
//!   exactly once: 0 missing;
//! - every job accepted reaches a final status: 0 lost;
//! - how long each fault took to recover from (printed, and recorded in RELIABILITY.md).
//!
//! The size is bounded for the test command (100 sessions, a few seconds per phase);
//! `scripts/faults` runs it longer and bigger through the `COACHD_FAULTS_*` variables.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use common::realtime::assert_valid_event;
use common::services::{Coachd, OwnPostgres, OwnRedis, ScratchDir, free_port, redis_client};
use eventsource_stream::Eventsource;
use fred::interfaces::{ClientLike, ListInterface};
use futures::{SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "faults-api-key";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sizes of one run; the defaults are the bounded run of the test command.
#[derive(Debug, Clone, Copy)]
struct Plan {
    sessions: usize,
    /// Seconds of load between two faults.
    settle: Duration,
    /// How many times the whole sequence of faults runs.
    rounds: usize,
    tokens: usize,
    token_ms: u64,
    think_ms: u64,
}

impl Plan {
    fn from_env() -> Self {
        Plan {
            sessions: env_num("COACHD_FAULTS_SESSIONS", 100) as usize,
            settle: Duration::from_secs(env_num("COACHD_FAULTS_SETTLE_SECS", 4)),
            rounds: env_num("COACHD_FAULTS_ROUNDS", 1) as usize,
            tokens: env_num("COACHD_FAULTS_TOKENS", 12) as usize,
            token_ms: env_num("COACHD_FAULTS_TOKEN_MS", 40),
            think_ms: env_num("COACHD_FAULTS_THINK_MS", 300),
        }
    }

    fn script(&self) -> Script {
        Script::counted(self.tokens).paced(Duration::from_millis(20), Duration::from_millis(self.token_ms))
    }
}

/// How long a turn may take, faults included, before it counts as hanging.
const TURN_DEADLINE: Duration = Duration::from_secs(30);
/// After a connection was lost with a message sent but not yet acknowledged by its `turn_start`,
/// how long the replayed log gets to show it before the message counts as lost with the node.
const START_GRACE: Duration = Duration::from_secs(6);

/// The settings every node and worker shares.
fn shared_env(fake: &FakeUpstream, redis: &str, db: &str, prefix: &str) -> Vec<(String, String)> {
    [
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "test-key"),
        ("OPENAI_MODEL", "gpt-test"),
        ("COACHD_OPENAI_BASE_URL", fake.base_url().as_str()),
        ("COACHD_LLM_MAX_RETRIES", "0"),
        ("COACHD_LLM_IDLE_TIMEOUT_MS", "1500"),
        ("COACHD_LLM_FIRST_TOKEN_TIMEOUT_MS", "3000"),
        ("DATABASE_URL", db),
        ("REDIS_URL", redis),
        ("COACHD_REDIS_KEY_PREFIX", prefix),
        (
            "COACHD_SESSION_TOKEN_SECRET",
            "faults-session-token-secret-0123456789",
        ),
        ("XENIOS_BACKEND_API_KEY", KEY),
        ("RATE_LIMIT_REQUESTS", "1000000"),
        ("COACHD_CONTEXT_MAX_MESSAGES", "100000"),
        ("COACHD_CLUSTER_LEASE_MS", "1500"),
        ("COACHD_CLUSTER_HEARTBEAT_SECS", "1"),
        ("COACHD_EMBEDDING_PROVIDER", "offline"),
        ("COACHD_JOBS_ENABLE_NOOP", "true"),
        ("COACHD_JOBS_POLL_MS", "50"),
        ("COACHD_JOBS_POLL_MAX_MS", "200"),
        ("COACHD_JOBS_RETRY_BASE_MS", "100"),
        ("COACHD_JOBS_HEARTBEAT_SECS", "1"),
        ("COACHD_JOBS_ORPHAN_AFTER_SECS", "3"),
        ("COACHD_JOBS_MAX_ATTEMPTS_NOOP", "10"),
        // One job at a time per worker: the worker-kill phase relies on it.
        ("COACHD_JOBS_CONCURRENCY_LLM", "1"),
        // Takeovers, registrations and fencing are logged at info: the logs of a failed run tell.
        ("COACHD_LOG", "info"),
        ("COACHD_LOG_FORMAT", "json"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The two nodes' base URLs; a node that was killed stays in the list (clients find it refuses).
type Nodes = Arc<Vec<String>>;

fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", KEY.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Transport {
    Ws,
    Sse,
    Http,
}

/// How one attempted turn came out, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// `turn_end` with this finish reason (after an `error` event when `error` is set).
    Ended {
        finish_reason: String,
        error: Option<String>,
    },
    /// Refused before it started, with this typed error code.
    Refused(String),
    /// The HTTP turn answered an error after it started (502/504: no text at all).
    Failed(String),
    /// The log's history was lost (an epoch change): the client was told to resync.
    Resync,
    /// Sent on a connection that died before the server acknowledged it, and never started.
    LostBeforeStart,
    /// No end within the deadline.
    Hanging,
}

#[derive(Debug, Clone)]
struct TurnLog {
    session: usize,
    transport: Transport,
    turn_number: Option<u64>,
    started: Duration,
    ended: Duration,
    outcome: Outcome,
    reconnects: u32,
}

/// A source of session events: a WebSocket, or an SSE body.
enum Conn {
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>),
    Sse(Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>),
}

impl Conn {
    /// The next event; `None` when the connection ended or broke.
    async fn next(&mut self) -> Option<Value> {
        loop {
            let text = match self {
                Conn::Ws(ws) => match ws.next().await? {
                    Ok(Message::Text(t)) => t.as_str().to_owned(),
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => continue,
                },
                Conn::Sse(s) => match s.next().await? {
                    Ok(ev) => ev.data,
                    Err(_) => return None,
                },
            };
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("event is JSON: {text}"));
            assert_valid_event(&v);
            return Some(v);
        }
    }
}

fn sse_conn(resp: reqwest::Response) -> Conn {
    Conn::Sse(Box::pin(
        resp.bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string())),
    ))
}

fn error_code(body: &Value) -> String {
    body["error"]["code"].as_str().unwrap_or("unknown").to_owned()
}

/// One session's client.
struct Client {
    index: usize,
    transport: Transport,
    session_id: String,
    token: String,
    nodes: Nodes,
    at: usize,
    http: reqwest::Client,
    /// Highest seq seen (WebSocket and SSE resume from it).
    last_seq: u64,
    conn: Option<Conn>,
    epoch: Instant,
}

impl Client {
    fn node(&self) -> &str {
        &self.nodes[self.at % self.nodes.len()]
    }

    fn switch(&mut self) {
        self.at = (self.at + 1) % self.nodes.len();
        self.conn = None;
    }

    async fn connect_ws(&mut self) -> bool {
        let ws_base = self.node().replacen("http://", "ws://", 1);
        let mut url = format!(
            "{ws_base}/realtime/sessions/{}/ws?token={}",
            self.session_id, self.token
        );
        if self.last_seq > 0 {
            url.push_str(&format!("&after_seq={}", self.last_seq));
        }
        match tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((ws, _))) => {
                self.conn = Some(Conn::Ws(Box::new(ws)));
                true
            }
            _ => false,
        }
    }

    /// Follows the session's events from `after` over SSE (after a lost connection).
    async fn follow(&mut self, after: u64) -> bool {
        let url = format!(
            "{}/realtime/sessions/{}/events?token={}&after_seq={after}",
            self.node(),
            self.session_id,
            self.token
        );
        match self.http.get(url).send().await {
            Ok(r) if r.status() == 200 => {
                self.conn = Some(sse_conn(r));
                true
            }
            _ => false,
        }
    }

    async fn turn(&mut self, text: String) -> TurnLog {
        let started = self.epoch.elapsed();
        let deadline = tokio::time::Instant::now() + TURN_DEADLINE;
        let mut turn_number: Option<u64> = None;
        let mut sent = false;
        let mut error: Option<String> = None;
        let mut reconnects = 0u32;
        // Set once a connection was lost after sending and before the acknowledgement.
        let mut start_by: Option<tokio::time::Instant> = None;
        let outcome = 'turn: loop {
            if tokio::time::Instant::now() >= deadline {
                break Outcome::Hanging;
            }
            if self.conn.is_none() {
                let ok = match (self.transport, sent) {
                    (Transport::Ws, _) => self.connect_ws().await,
                    (_, true) => {
                        let after = if self.transport == Transport::Sse {
                            self.last_seq
                        } else {
                            0
                        };
                        self.follow(after).await
                    }
                    (transport, false) => {
                        let url = format!("{}/realtime/sessions/{}/turn", self.node(), self.session_id);
                        let mut req = self.http.post(url).json(&json!({"text": text}));
                        if transport == Transport::Sse {
                            req = req.header("accept", "text/event-stream");
                        }
                        match req.send().await {
                            Ok(resp) if resp.status() == 200 && transport == Transport::Sse => {
                                sent = true;
                                self.conn = Some(sse_conn(resp));
                                true
                            }
                            Ok(resp) => {
                                let status = resp.status().as_u16();
                                match resp.json::<Value>().await {
                                    Ok(body) if status == 200 => {
                                        turn_number = body["turn_number"].as_u64();
                                        break 'turn Outcome::Ended {
                                            finish_reason: body["finish_reason"].as_str().unwrap().to_owned(),
                                            error: None,
                                        };
                                    }
                                    Ok(body) if status == 502 || status == 504 => {
                                        break 'turn Outcome::Failed(error_code(&body));
                                    }
                                    Ok(body) => {
                                        break 'turn Outcome::Refused(format!(
                                            "{status} {}",
                                            error_code(&body)
                                        ));
                                    }
                                    // The node died while answering: the turn may be running.
                                    Err(_) => {
                                        sent = true;
                                        false
                                    }
                                }
                            }
                            Err(e) => {
                                // Refused at connect: it never arrived. Otherwise it may have.
                                sent |= !e.is_connect();
                                false
                            }
                        }
                    }
                };
                if !ok {
                    self.switch();
                    reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                if sent && turn_number.is_none() && start_by.is_none() {
                    start_by = Some(tokio::time::Instant::now() + START_GRACE);
                }
            }
            if self.transport == Transport::Ws && !sent {
                let frame = json!({"type": "user_message", "text": text});
                let Some(Conn::Ws(ws)) = self.conn.as_mut() else {
                    unreachable!()
                };
                if ws.send(Message::text(frame.to_string())).await.is_err() {
                    self.switch();
                    reconnects += 1;
                    continue;
                }
                sent = true;
            }
            let limit = match (turn_number, start_by) {
                (None, Some(by)) => by.min(deadline),
                _ => deadline,
            };
            let conn = self.conn.as_mut().unwrap();
            match tokio::time::timeout_at(limit, conn.next()).await {
                Err(_) if limit < deadline => break Outcome::LostBeforeStart,
                Err(_) => break Outcome::Hanging,
                Ok(None) => {
                    self.switch();
                    reconnects += 1;
                    if turn_number.is_none() && sent {
                        start_by.get_or_insert(tokio::time::Instant::now() + START_GRACE);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Some(ev)) => {
                    if let Some(seq) = ev["seq"].as_u64() {
                        self.last_seq = self.last_seq.max(seq);
                    }
                    let n = ev["turn_number"].as_u64();
                    match ev["type"].as_str().unwrap() {
                        "turn_start" if ev["user_text"] == text.as_str() => turn_number = n,
                        "error" if n.is_some() && n == turn_number => {
                            error = Some(error_code(&json!({"error": ev})))
                        }
                        "error"
                            if n.is_none() && turn_number.is_none() && self.transport == Transport::Ws =>
                        {
                            // A refusal of the frame (queue full, bad input): nothing started.
                            break Outcome::Refused(ev["code"].as_str().unwrap_or_default().to_owned());
                        }
                        "turn_end" if n.is_some() && n == turn_number => {
                            break Outcome::Ended {
                                finish_reason: ev["finish_reason"].as_str().unwrap().to_owned(),
                                error,
                            };
                        }
                        "resync" => {
                            // History is gone; start the next attach from now.
                            self.last_seq = ev["state"]["last_seq"].as_u64().unwrap_or(self.last_seq);
                            break Outcome::Resync;
                        }
                        _ => {}
                    }
                }
            }
        };
        // An SSE turn's own stream ends after its turn_end; a follow stream is not kept either.
        if self.transport != Transport::Ws {
            self.conn = None;
        }
        TurnLog {
            session: self.index,
            transport: self.transport,
            turn_number,
            started,
            ended: self.epoch.elapsed(),
            outcome,
            reconnects,
        }
    }
}

async fn create_session(http: &reqwest::Client, node: &str, user: &str, transport: &str) -> (String, String) {
    let resp = http
        .post(format!("{node}/realtime/sessions"))
        .json(&json!({"user_id": user, "coach_id": "sales", "transport": transport}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "create session on {node}");
    let body: Value = resp.json().await.unwrap();
    (
        body["session_id"].as_str().unwrap().to_owned(),
        body["token"].as_str().unwrap().to_owned(),
    )
}

/// The jobs side of the load: a noop job every 500 ms on alternating nodes.
#[derive(Default)]
struct Jobs {
    accepted: Vec<String>,
    refused: BTreeMap<String, usize>,
}

async fn submit_job(
    http: &reqwest::Client,
    nodes: &Nodes,
    i: usize,
    sleep_ms: u64,
) -> Result<String, String> {
    let body = json!({"kind": "noop", "user_id": format!("ju{}", i % 7), "coach_id": "sales",
        "text": format!("job {i}"), "options": {"sleep_ms": sleep_ms, "steps": 3}});
    let mut last = String::new();
    for k in 0..nodes.len() {
        let node = &nodes[(i + k) % nodes.len()];
        match http.post(format!("{node}/api/v1/jobs")).json(&body).send().await {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.unwrap();
                return Ok(v["id"].as_str().unwrap().to_owned());
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                return Err(format!("{status} {}", error_code(&v)));
            }
            Err(e) => last = format!("transport: {}", if e.is_connect() { "connect" } else { "io" }),
        }
    }
    Err(last)
}

async fn job_status(http: &reqwest::Client, nodes: &Nodes, id: &str) -> Option<Value> {
    for node in nodes.iter() {
        if let Ok(r) = http.get(format!("{node}/api/v1/jobs/{id}")).send().await
            && r.status() == 200
        {
            return r.json().await.ok();
        }
    }
    None
}

fn is_final(job: &Value) -> bool {
    matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

/// Waits until every job of `ids` is final; returns how long that took, or `None` past `limit`.
async fn jobs_final(
    http: &reqwest::Client,
    nodes: &Nodes,
    ids: &[String],
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut pending: Vec<String> = ids.to_vec();
    while start.elapsed() < limit {
        let mut still = Vec::new();
        for id in pending {
            if !job_status(http, nodes, &id).await.is_some_and(|j| is_final(&j)) {
                still.push(id);
            }
        }
        pending = still;
        if pending.is_empty() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// A probe turn over HTTP; `Ok` when it ended normally.
async fn probe_turn(http: &reqwest::Client, node: &str, session: &str, text: &str) -> bool {
    let Ok(r) = http
        .post(format!("{node}/realtime/sessions/{session}/turn"))
        .json(&json!({"text": text}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
    else {
        return false;
    };
    r.status() == 200
        && r.json::<Value>()
            .await
            .is_ok_and(|b| b["finish_reason"] == "stop")
}

/// Repeats `probe` every 100 ms until it succeeds; the time it took (panics after 60 s).
async fn until<F, Fut>(what: &str, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !probe().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: not recovered in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

/// One injected fault and what it did.
#[derive(Debug)]
struct FaultReport {
    name: String,
    at: Duration,
    /// How long the component was gone (zero for faults that are over at once).
    down: Duration,
    /// Time from healing (or the fault itself) until the probe that needs the component worked.
    recovery: Duration,
    /// How the turns that were in flight at `at` came out.
    in_flight: BTreeMap<String, usize>,
    /// From `at` until the last of those turns ended.
    in_flight_resolved: Duration,
}

fn outcome_label(o: &Outcome) -> String {
    match o {
        Outcome::Ended {
            finish_reason,
            error: None,
        } => finish_reason.clone(),
        Outcome::Ended {
            finish_reason,
            error: Some(e),
        } => format!("{finish_reason} ({e})"),
        Outcome::Refused(c) => format!("refused {c}"),
        Outcome::Failed(c) => format!("failed {c}"),
        Outcome::Resync => "resync".into(),
        Outcome::LostBeforeStart => "lost before start".into(),
        Outcome::Hanging => "HANGING".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_under_load_leave_no_stream_hanging_no_turn_unstored_and_no_job_lost() {
    common::init_tracing();
    let plan = Plan::from_env();
    let scratch = ScratchDir::new("faults");
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(plan.script());
    let redis_dir = scratch.0.join("redis");
    std::fs::create_dir_all(&redis_dir).unwrap();
    let mut redis = Some(OwnRedis::start_persistent(free_port(), &redis_dir).await);
    let pg = OwnPostgres::start().await;
    let prefix = common::fresh_prefix();
    let env = shared_env(&fake, &redis.as_ref().unwrap().url(), &pg.url(), &prefix);
    let node_env = |id: &str| {
        let mut e = env.clone();
        e.push(("COACHD_NODE_ID".into(), id.into()));
        e.push(("COACHD_JOBS_WORKERS".into(), "false".into()));
        e
    };
    let log = |name: &str| scratch.0.join(format!("{name}.log"));
    let a = Coachd::start(&["serve"], &node_env("node-a"), &log("node-a")).await;
    let mut b = Some(Coachd::start(&["serve"], &node_env("node-b"), &log("node-b")).await);
    let mut workers = vec![
        Coachd::start(&["worker", "--queues", "llm"], &env, &log("worker-1")).await,
        Coachd::start(&["worker", "--queues", "llm"], &env, &log("worker-2")).await,
    ];
    let nodes: Nodes = Arc::new(vec![a.base(), b.as_ref().unwrap().base()]);
    let http = http();
    let epoch = Instant::now();
    // Shared references for the probes (their futures must not borrow the probe closures).
    let (h, ns, px) = (&http, &nodes, prefix.as_str());

    // Sessions: created on either node, attached on the same or the other one (relayed).
    let transports = [Transport::Ws, Transport::Sse, Transport::Http];
    let mut clients = Vec::new();
    for i in 0..plan.sessions {
        let transport = transports[i % 3];
        let name = match transport {
            Transport::Ws => "websocket",
            Transport::Sse => "sse",
            Transport::Http => "http",
        };
        let (id, token) = create_session(&http, &nodes[i % 2], &format!("fu{i}"), name).await;
        clients.push(Client {
            index: i,
            transport,
            session_id: id,
            token,
            nodes: nodes.clone(),
            at: (i / 2) % 2,
            http: http.clone(),
            last_seq: 0,
            conn: None,
            epoch,
        });
    }
    let session_ids: Vec<String> = clients.iter().map(|c| c.session_id.clone()).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let turns: Arc<Mutex<Vec<TurnLog>>> = Arc::default();
    let mut tasks = Vec::new();
    for mut client in clients {
        let (stop, turns) = (stop.clone(), turns.clone());
        let think = Duration::from_millis(plan.think_ms);
        tasks.push(tokio::spawn(async move {
            // Spread the starts over one think time.
            tokio::time::sleep(think.mul_f64(client.index as f64 / 100.0 % 1.0)).await;
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let entry = client.turn(format!("session {} message {k}", client.index)).await;
                turns.lock().await.push(entry);
                tokio::time::sleep(think).await;
            }
        }));
    }
    let jobs: Arc<Mutex<Jobs>> = Arc::default();
    let jobs_task = {
        let (stop, jobs, http, nodes) = (stop.clone(), jobs.clone(), http.clone(), nodes.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match submit_job(&http, &nodes, i, 300).await {
                    Ok(id) => jobs.lock().await.accepted.push(id),
                    Err(e) => *jobs.lock().await.refused.entry(e).or_default() += 1,
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // A probe session per node, each used only by the probes.
    let probe_a = create_session(&http, &nodes[0], "probe-a", "http").await.0;
    let pa = probe_a.as_str();
    // (what, when it was injected, when the component was back, how long after that the probe
    // that needs it worked)
    let mut faults: Vec<(String, Duration, Duration, Duration)> = Vec::new();
    let settle = plan.settle;
    tokio::time::sleep(settle).await;

    for round in 1..=plan.rounds {
        // Redis: SIGKILL, down for a second, back from its append-only file.
        let at = epoch.elapsed();
        let (port, dir) = redis.take().unwrap().kill().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        redis = Some(OwnRedis::restart(port, dir).await);
        let healed = epoch.elapsed();
        let redis_client = redis_client(&redis.as_ref().unwrap().url()).await;
        let rc = &redis_client;
        let recovery = until("Redis restart", || async move {
            // A session made now, a turn in it, and that turn in the Redis context.
            let Ok(r) = h
                .post(format!("{}/realtime/sessions", ns[0]))
                .json(&json!({"user_id": "probe-r", "coach_id": "sales", "transport": "http"}))
                .send()
                .await
            else {
                return false;
            };
            if r.status() != 201 {
                return false;
            }
            let id = r.json::<Value>().await.unwrap()["session_id"]
                .as_str()
                .unwrap()
                .to_owned();
            if !probe_turn(h, &ns[0], &id, "probe after the Redis restart").await {
                return false;
            }
            let key = format!("{px}session:{id}:context");
            for _ in 0..50 {
                let stored: Vec<String> = rc.lrange(&key, 0, -1).await.unwrap_or_default();
                if stored.len() >= 2 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        })
        .await;
        redis_client.quit().await.unwrap();
        faults.push((
            format!("round {round}: Redis killed, restarted after 1 s"),
            at,
            healed,
            recovery,
        ));
        tokio::time::sleep(settle).await;

        // PostgreSQL: an immediate stop (every backend killed), two seconds down, crash recovery.
        let at = epoch.elapsed();
        pg.crash().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        pg.start_server().await;
        let healed = epoch.elapsed();
        let recovery = until("PostgreSQL restart", || async move {
            match submit_job(h, ns, 0, 0).await {
                Ok(id) => jobs_final(h, ns, &[id], Duration::from_secs(10)).await.is_some(),
                Err(_) => false,
            }
        })
        .await;
        faults.push((
            format!("round {round}: PostgreSQL crashed, restarted after 2 s"),
            at,
            healed,
            recovery,
        ));
        tokio::time::sleep(settle).await;

        // The upstream stalls mid-reply: the next 15 streams stop after 3 tokens.
        let at = epoch.elapsed();
        for _ in 0..15 {
            fake.enqueue("*", plan.script().with_fault(Fault::Stall { after: 3 }));
        }
        let recovery = until("upstream stall", || {
            probe_turn(h, &ns[0], pa, "probe after the stall")
        })
        .await;
        faults.push((
            format!("round {round}: upstream stalls 15 streams after 3 tokens"),
            at,
            at,
            recovery,
        ));
        tokio::time::sleep(settle).await;

        // The upstream cuts streams mid-reply: the next 15 close after 4 tokens.
        let at = epoch.elapsed();
        for _ in 0..15 {
            fake.enqueue("*", plan.script().with_fault(Fault::Cut { after: 4 }));
        }
        let recovery = until("upstream cut", || {
            probe_turn(h, &ns[0], pa, "probe after the cut")
        })
        .await;
        faults.push((
            format!("round {round}: upstream cuts 15 streams after 4 tokens"),
            at,
            at,
            recovery,
        ));
        tokio::time::sleep(settle).await;

        // A worker with a job in hand is killed; the other finishes it. Each worker runs one
        // job at a time, so once two long jobs both run, each worker holds one of them.
        let mut long = Vec::new();
        for k in 0..2 {
            long.push(
                submit_job(&http, &nodes, 1000 + k, 4000)
                    .await
                    .expect("long job accepted"),
            );
        }
        let lr = &long;
        until("both long jobs running", || async move {
            let mut running = 0;
            for id in lr {
                running += usize::from(
                    job_status(h, ns, id)
                        .await
                        .is_some_and(|j| j["status"] == "running"),
                );
            }
            running == 2
        })
        .await;
        let at = epoch.elapsed();
        let in_hand = pending_jobs(&http, &nodes, &jobs).await;
        workers.remove(0).kill().await;
        let recovery = jobs_final(&http, &nodes, &long, Duration::from_secs(60))
            .await
            .expect("the killed worker's job finished elsewhere within 60 s");
        let mut reruns = 0;
        for id in &long {
            let job = job_status(&http, &nodes, id).await.unwrap();
            assert_eq!(job["status"], "succeeded", "{job}");
            reruns += usize::from(job["attempts"].as_u64().unwrap() > 1);
        }
        assert_eq!(
            reruns, 1,
            "the killed worker's long job ran again on the other worker"
        );
        assert!(
            jobs_final(&http, &nodes, &in_hand, Duration::from_secs(60))
                .await
                .is_some(),
            "every job pending at the kill finished"
        );
        jobs.lock().await.accepted.extend(long);
        faults.push((
            format!(
                "round {round}: kill -9 of a worker ({} other jobs pending)",
                in_hand.len()
            ),
            at,
            at,
            recovery,
        ));
        workers.push(
            Coachd::start(
                &["worker", "--queues", "llm"],
                &env,
                &log(&format!("worker-r{round}")),
            )
            .await,
        );
        tokio::time::sleep(settle).await;

        // Node b is killed; its sessions are taken over by a on their next touch.
        let probe_b = create_session(&http, &nodes[1], &format!("probe-b{round}"), "http")
            .await
            .0;
        assert!(probe_turn(&http, &nodes[1], &probe_b, "b owns this").await);
        let at = epoch.elapsed();
        b.take().unwrap().kill().await;
        let pb = probe_b.as_str();
        let recovery = until("node kill", || probe_turn(h, &ns[0], pb, "served by a")).await;
        faults.push((
            format!("round {round}: kill -9 of node b (lease 1.5 s)"),
            at,
            at,
            recovery,
        ));
        tokio::time::sleep(settle).await;
        if round < plan.rounds {
            // b comes back (on its old port, so clients find it again) for the next round.
            let port: u16 = nodes[1].rsplit(':').next().unwrap().parse().unwrap();
            b = Some(
                Coachd::start_on(
                    port,
                    &["serve"],
                    &node_env("node-b"),
                    &log(&format!("node-b-r{round}")),
                )
                .await,
            );
        }
    }

    // Stop the load: each client finishes the turn it is in.
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    jobs_task.await.unwrap();
    let turns = turns.lock().await.clone();
    let jobs = std::mem::take(&mut *jobs.lock().await);

    // Every job accepted reaches a final status.
    let jobs_done = jobs_final(&http, &nodes, &jobs.accepted, Duration::from_secs(60)).await;
    let mut job_statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut retried = 0usize;
    for id in &jobs.accepted {
        let job = job_status(&http, &nodes, id).await.unwrap_or(Value::Null);
        *job_statuses
            .entry(job["status"].as_str().unwrap_or("unknown").to_owned())
            .or_default() += 1;
        retried += usize::from(job["attempts"].as_u64().unwrap_or(0) > 1);
    }

    // What the stores hold, once write-behind has caught up on the surviving node.
    let redis_client = redis_client(&redis.as_ref().unwrap().url()).await;
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let mut missing_context = Vec::new();
    let mut missing_memory = Vec::new();
    let mut finished_total = 0u64;
    for id in &session_ids {
        let finished = loop {
            let r = http
                .get(format!("{}/realtime/sessions/{id}", nodes[0]))
                .send()
                .await
                .unwrap();
            let body: Value = r.json().await.unwrap();
            // A session mid-takeover answers once it is rebuilt.
            if let Some(n) = body["turn_count"].as_u64()
                && body["streaming_turn"].is_null()
            {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        finished_total += finished;
        let want: BTreeSet<u64> = (1..=finished).collect();
        let key = format!("{prefix}session:{id}:context");
        let mut context = BTreeSet::new();
        let mut memory = BTreeSet::new();
        for _ in 0..100 {
            let stored: Vec<String> = redis_client.lrange(&key, 0, -1).await.unwrap();
            let users: Vec<u64> = stored
                .iter()
                .map(|s| serde_json::from_str::<Value>(s).unwrap())
                .filter(|m| m["role"] == "user")
                .map(|m| m["metadata"]["turn_number"].as_u64().unwrap())
                .collect();
            context = users.iter().copied().collect();
            assert_eq!(
                context.len(),
                users.len(),
                "a turn stored twice in {key}: {users:?}\n{stored:#?}"
            );
            let rows: Vec<(i64,)> = sqlx::query_as(
                "select (metadata->>'turn_number')::bigint from coach_memory \
                 where memory_type = 'conversation' and metadata->>'session_id' = $1",
            )
            .bind(id)
            .fetch_all(&db)
            .await
            .unwrap();
            memory = rows.iter().map(|r| r.0 as u64).collect();
            assert_eq!(memory.len(), rows.len(), "a turn stored twice in memory for {id}");
            if context.is_superset(&want) && memory.is_superset(&want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        missing_context.extend(want.difference(&context).map(|n| format!("{id}#{n}")));
        missing_memory.extend(want.difference(&memory).map(|n| format!("{id}#{n}")));
    }
    redis_client.quit().await.unwrap();

    // The report.
    let mut by_outcome: BTreeMap<(Transport, String), usize> = BTreeMap::new();
    for t in &turns {
        *by_outcome
            .entry((t.transport, outcome_label(&t.outcome)))
            .or_default() += 1;
    }
    let started = turns
        .iter()
        .filter(|t| t.turn_number.is_some() || matches!(t.outcome, Outcome::Failed(_)))
        .count();
    let hanging: Vec<&TurnLog> = turns.iter().filter(|t| t.outcome == Outcome::Hanging).collect();
    let reports: Vec<FaultReport> = faults
        .iter()
        .map(|(name, at, healed, recovery)| {
            let hit: Vec<&TurnLog> = turns
                .iter()
                .filter(|t| t.started <= *at && t.ended >= *at)
                .collect();
            let mut in_flight = BTreeMap::new();
            for t in &hit {
                *in_flight.entry(outcome_label(&t.outcome)).or_default() += 1;
            }
            let resolved = hit
                .iter()
                .map(|t| t.ended.saturating_sub(*at))
                .max()
                .unwrap_or_default();
            FaultReport {
                name: name.clone(),
                at: *at,
                down: healed.saturating_sub(*at),
                recovery: *recovery,
                in_flight,
                in_flight_resolved: resolved,
            }
        })
        .collect();
    println!("plan: {plan:?}");
    println!(
        "turns attempted {}, started {started}, finished by the sessions' count {finished_total}",
        turns.len()
    );
    for ((transport, label), n) in &by_outcome {
        println!("  {transport:?} {label}: {n}");
    }
    println!(
        "reconnects: {}",
        turns.iter().map(|t| u64::from(t.reconnects)).sum::<u64>()
    );
    for r in &reports {
        println!(
            "fault at {:>5.1} s  {:<55} down {:.2} s, then recovered in {:.2} s; in flight {:?}, all ended {:.2} s after the fault",
            r.at.as_secs_f64(),
            r.name,
            r.down.as_secs_f64(),
            r.recovery.as_secs_f64(),
            r.in_flight,
            r.in_flight_resolved.as_secs_f64()
        );
    }
    println!(
        "jobs: {} accepted, refused {:?}, final {:?} ({retried} ran more than once), all final: {}",
        jobs.accepted.len(),
        jobs.refused,
        job_statuses,
        jobs_done.is_some()
    );
    println!(
        "storage: {} finished turns missing from the Redis context, {} from PostgreSQL memory",
        missing_context.len(),
        missing_memory.len()
    );

    // The targets.
    let hanging_turns: Vec<(usize, Transport, Option<u64>)> = hanging
        .iter()
        .map(|t| (t.session, t.transport, t.turn_number))
        .collect();
    assert!(
        hanging.is_empty(),
        "streams left hanging (session, transport, turn): {hanging_turns:?}"
    );
    assert!(
        missing_context.is_empty(),
        "finished turns missing from the context: {missing_context:?}"
    );
    assert!(
        missing_memory.is_empty(),
        "finished turns missing from memory: {missing_memory:?}"
    );
    assert!(jobs_done.is_some(), "jobs lost: {job_statuses:?}");
    // The faults were felt (so the test cannot pass with its subject gone).
    let label_count = |f: &dyn Fn(&str) -> bool| {
        by_outcome
            .iter()
            .filter(|((_, l), _)| f(l))
            .map(|(_, n)| *n)
            .sum::<usize>()
    };
    assert!(
        label_count(&|l| l.contains("upstream_timeout") || l.contains("timeout")) > 0,
        "the stall ended turns with a timeout error: {by_outcome:?}"
    );
    assert!(
        label_count(&|l| l.contains("upstream_incomplete")) > 0,
        "the cut ended turns with an incomplete-stream error: {by_outcome:?}"
    );
    assert!(
        label_count(&|l| l.starts_with("interrupted")) > 0,
        "the node kill interrupted turns: {by_outcome:?}"
    );
    assert!(
        finished_total as usize >= plan.sessions * 5,
        "the load ran: {finished_total} turns"
    );
    assert!(
        retried > 0,
        "a killed worker's job ran again elsewhere: {job_statuses:?}"
    );
    drop(workers);
    drop(a);
    drop(pg);
}

/// Jobs accepted and not final now (the killed worker holds some of them).
async fn pending_jobs(http: &reqwest::Client, nodes: &Nodes, jobs: &Mutex<Jobs>) -> Vec<String> {
    let ids = jobs.lock().await.accepted.clone();
    let mut out = Vec::new();
    for id in ids.iter().rev().take(40) {
        if job_status(http, nodes, id).await.is_some_and(|j| !is_final(&j)) {
            out.push(id.clone());
        }
    }
    out
}
