//! OpenTelemetry traces end to end: the real `coachd` binary (a child process, because the
//! tracer provider is process-global) on the real PostgreSQL and Redis, with the fake LLM
//! upstream, exports over OTLP/HTTP protobuf to a receiver this test runs; the receiver decodes
//! the requests with the `opentelemetry-proto` types. Checked: the span tree of one turn, the
//! first-token marker, the write-behind span in the turn's trace, the trace id in the JSON log
//! lines, and that without the variable no exporter starts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::disallowed_methods
)]

#[path = "common/mod.rs"]
mod common;

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use coachd::fake_upstream::{FakeUpstream, Script};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};

/// What the receiver got: each request's content type, and every span with its service name.
#[derive(Default)]
struct Received {
    content_types: Vec<String>,
    spans: Vec<(String, Span)>,
}

/// The receiver's server task, stopped when the test drops it.
struct Server(tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An OTLP/HTTP traces receiver on a free port; returns its base URL.
async fn receiver() -> (String, Arc<Mutex<Received>>, Server) {
    async fn traces(State(got): State<Arc<Mutex<Received>>>, headers: HeaderMap, body: Bytes) -> StatusCode {
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            return StatusCode::BAD_REQUEST;
        };
        let mut got = got.lock().unwrap();
        let ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        got.content_types.push(ct.to_owned());
        for rs in request.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.spans.push((service.clone(), span));
                }
            }
        }
        StatusCode::OK
    }
    let got = Arc::new(Mutex::new(Received::default()));
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got, Server(task))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running coachd, and the thread that collects its stdout (read as it comes, so a full pipe
/// never stalls the child).
struct Coachd {
    child: Child,
    stdout: std::thread::JoinHandle<String>,
}

/// The coachd binary on the real services and the fake upstream, JSON logs on stdout.
async fn start_coachd(fake: &FakeUpstream, port: u16, extra: &[(&str, &str)]) -> Coachd {
    let db = common::fresh_database().await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coachd"));
    let dir = std::env::temp_dir().join(format!("coachd-traces-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    cmd.current_dir(dir)
        .env_clear()
        .envs([
            ("PORT", port.to_string()),
            ("COACHD_HOST", "127.0.0.1".into()),
            ("COACHD_LOG_FORMAT", "json".into()),
            ("COACHD_SHUTDOWN_DRAIN_DELAY_SECS", "0".into()),
            ("DATABASE_URL", db),
            ("REDIS_URL", common::redis_url()),
            ("COACHD_REDIS_KEY_PREFIX", common::fresh_prefix()),
            ("LLM_PROVIDER", "openai".into()),
            ("OPENAI_API_KEY", "test-key".into()),
            ("OPENAI_MODEL", "gpt-test".into()),
            ("COACHD_OPENAI_BASE_URL", fake.base_url()),
        ])
        .envs(extra.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    Coachd { child, stdout }
}

async fn wait_live(client: &reqwest::Client, base: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/health/live")).send().await
            && r.status() == 200
        {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("coachd exited with {status}: {err}");
        }
        assert!(Instant::now() < deadline, "coachd did not become live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The names of the child's threads (Linux truncates them to 15 bytes).
fn thread_names(child: &Child) -> Vec<String> {
    let dir = format!("/proc/{}/task", child.id());
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// The SDK's batch span processor runs on a thread of this name.
const EXPORTER_THREAD: &str = "OpenTelemetry.T";

/// One turn over HTTP; returns the session id.
async fn one_turn(client: &reqwest::Client, base: &str) -> String {
    let resp = client
        .post(format!("{base}/realtime/sessions"))
        .json(&json!({"user_id": "trace-user", "coach_id": "sales", "transport": "http"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let session: Value = resp.json().await.unwrap();
    let id = session["session_id"].as_str().unwrap().to_owned();
    let resp = client
        .post(format!("{base}/realtime/sessions/{id}/turn"))
        .json(&json!({"text": "How do I open a pricing talk?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply["reply_text"], "t0 t1 t2 t3 t4", "{reply}");
    id
}

/// SIGTERM, then the exit code and the stdout log lines. Waits without blocking the runtime:
/// the receiver and the fake upstream run on it, and the child's last export goes there.
async fn stop(coachd: Coachd) -> (Option<i32>, Vec<Value>) {
    let Coachd { mut child, stdout } = coachd;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "coachd did not stop after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = stdout.join().unwrap();
    let lines = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}")))
        .collect();
    (exit.code(), lines)
}

fn one<'a>(spans: &'a [&'a Span], name: &str) -> &'a Span {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span: {:?}", names(spans));
    found[0]
}

fn names(spans: &[&Span]) -> Vec<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_is_one_trace_from_prompt_to_write_behind_and_its_logs_carry_the_trace_id() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(5));
    let (otlp, received, _server) = receiver().await;
    let port = free_port();
    let mut coachd = start_coachd(
        &fake,
        port,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
            ("OTEL_SERVICE_NAME", "coachd-trace-test"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ],
    )
    .await;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_live(&client, &base, &mut coachd.child).await;
    assert!(
        thread_names(&coachd.child).iter().any(|n| n == EXPORTER_THREAD),
        "the span exporter runs: {:?}",
        thread_names(&coachd.child)
    );

    let session_id = one_turn(&client, &base).await;
    // The spans are flushed by the ordered shutdown, after the write-behind drained.
    let (code, logs) = stop(coachd).await;
    assert_eq!(code, Some(0), "graceful stop");

    let got = received.lock().unwrap();
    assert!(!got.content_types.is_empty(), "the receiver got no export");
    assert!(
        got.content_types.iter().all(|c| c == "application/x-protobuf"),
        "OTLP/HTTP protobuf: {:?}",
        got.content_types
    );
    assert!(
        got.spans
            .iter()
            .all(|(service, _)| service == "coachd-trace-test"),
        "OTEL_SERVICE_NAME is the resource's service.name"
    );
    let spans: Vec<&Span> = got.spans.iter().map(|(_, s)| s).collect();

    let turn = one(&spans, "turn");
    assert!(
        turn.parent_span_id.is_empty(),
        "the turn is the root of its trace"
    );
    assert_eq!(
        attr(turn, "session_id"),
        Some(&AnyValue::StringValue(session_id.clone()))
    );
    assert_eq!(attr(turn, "tokens"), Some(&AnyValue::IntValue(5)));
    assert_eq!(attr(turn, "turn"), Some(&AnyValue::IntValue(1)));
    assert_eq!(
        attr(turn, "finish_reason"),
        Some(&AnyValue::StringValue("stop".into()))
    );
    let in_trace: Vec<&Span> = spans
        .iter()
        .copied()
        .filter(|s| s.trace_id == turn.trace_id)
        .collect();
    let prompt = one(&in_trace, "prompt.assemble");
    let memory = one(&in_trace, "memory.search");
    let llm = one(&in_trace, "llm.call");
    let write = one(&in_trace, "write_behind");
    assert_eq!(
        prompt.parent_span_id, turn.span_id,
        "prompt assembly is under the turn"
    );
    assert_eq!(
        memory.parent_span_id, prompt.span_id,
        "the memory search is part of the prompt assembly"
    );
    assert_eq!(
        llm.parent_span_id, turn.span_id,
        "the provider call is under the turn"
    );
    assert_eq!(
        write.parent_span_id, turn.span_id,
        "the write-behind, done by another task later, is parented under the turn"
    );
    assert_eq!(
        attr(llm, "model"),
        Some(&AnyValue::StringValue("gpt-test".into()))
    );
    assert_eq!(
        attr(llm, "provider"),
        Some(&AnyValue::StringValue("openai".into()))
    );
    let first: Vec<_> = llm.events.iter().filter(|e| e.name == "first_token").collect();
    assert_eq!(first.len(), 1, "one first-token marker: {:?}", llm.events);
    assert!(
        first[0].time_unix_nano >= llm.start_time_unix_nano
            && first[0].time_unix_nano <= llm.end_time_unix_nano,
        "the marker lies within the provider call"
    );
    assert!(
        matches!(attr(llm, "first_token_ms"), Some(AnyValue::DoubleValue(ms)) if *ms >= 0.0),
        "{:?}",
        llm.attributes
    );
    assert!(
        prompt.end_time_unix_nano <= llm.start_time_unix_nano,
        "the prompt is assembled before the provider is called"
    );
    assert!(
        llm.end_time_unix_nano <= turn.end_time_unix_nano,
        "the turn ends with its stream"
    );
    assert!(
        write.start_time_unix_nano >= llm.end_time_unix_nano,
        "the turn is written after it ended"
    );
    assert_eq!(attr(write, "written"), Some(&AnyValue::BoolValue(true)));
    // No span per token: five tokens, and the turn's trace holds exactly these spans.
    let mut all = names(&in_trace);
    all.sort();
    assert_eq!(
        all,
        [
            "llm.call",
            "memory.search",
            "prompt.assemble",
            "turn",
            "write_behind"
        ]
    );

    let trace_hex = hex::encode(&turn.trace_id);
    let ended: Vec<&Value> = logs
        .iter()
        .filter(|l| l["message"] == "turn ended" && l["session_id"] == session_id.as_str())
        .collect();
    assert_eq!(ended.len(), 1, "one turn-ended line");
    assert_eq!(
        ended[0]["trace_id"],
        trace_hex.as_str(),
        "the JSON log line carries the turn's trace id: {}",
        ended[0]
    );
    assert_eq!(ended[0]["span_id"], hex::encode(&turn.span_id).as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_otlp_endpoint_no_exporter_starts_and_logs_carry_no_trace_id() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(5));
    let port = free_port();
    // A service name alone turns nothing on.
    let mut coachd = start_coachd(&fake, port, &[("OTEL_SERVICE_NAME", "coachd-trace-test")]).await;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_live(&client, &base, &mut coachd.child).await;
    let threads = thread_names(&coachd.child);
    assert!(!threads.is_empty());
    assert!(
        !threads.iter().any(|n| n.starts_with("OpenTelemetry")),
        "no span exporter without OTEL_EXPORTER_OTLP_ENDPOINT: {threads:?}"
    );

    let session_id = one_turn(&client, &base).await;
    let (code, logs) = stop(coachd).await;
    assert_eq!(code, Some(0));
    let ended: Vec<&Value> = logs
        .iter()
        .filter(|l| l["message"] == "turn ended" && l["session_id"] == session_id.as_str())
        .collect();
    assert_eq!(ended.len(), 1, "the turn's line is written");
    assert!(
        logs.iter().all(|l| l.get("trace_id").is_none()),
        "no trace id without traces"
    );
    assert!(
        !logs
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.starts_with("traces:"))),
        "no traces set-up line"
    );
}
