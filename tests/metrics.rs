//! `GET /metrics` against the real app (real Redis and PostgreSQL, the fake LLM upstream): after a
//! WebSocket turn, an SSE turn, a streamed `/v1/chat/completions` and `/api/v1/llm/stream`, the
//! scrape names every figure, its histograms moved by exactly the requests made, and its token
//! counters equal the usage the turns reported; retries, fallbacks and upstream errors by kind; a
//! no-pong close, a rate-limit refusal and a job run; the bearer token; the switch; and every
//! scrape parses as the Prometheus text format (a strict parser below).
//!
//! The `metrics` recorder is global to the process, so every app of this binary writes to one
//! registry. The tests therefore (1) run one at a time (the `SERIAL` lock), (2) compare a scrape
//! taken after the action with one taken before it (deltas, never absolute values), and (3) give
//! each app an upstream model name of its own, so the model-labelled series are the test's alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use common::realtime::{SseReader, WsRead, ws_connect, ws_next, ws_send, ws_until};
use common::{TestApp, spawn_app};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "metrics-test-key";

/// One test at a time: they share the process's metrics registry.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An upstream model name no other test uses.
fn unique_model(tag: &str) -> String {
    format!("m-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// coachd on the real services, OpenAI pointed at the fake with `model` as its model, API keys
/// on (the app's client sends one).
async fn app_with(fake: &FakeUpstream, model: &str, extra: &[(&str, &str)]) -> TestApp {
    let base = fake.base_url();
    let mut vars = vec![
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "upstream-key"),
        ("OPENAI_MODEL", model),
        ("COACHD_OPENAI_BASE_URL", base.as_str()),
        ("COACHD_LLM_MAX_RETRIES", "0"),
        ("COACHD_API_KEYS", KEY),
    ];
    vars.extend_from_slice(extra);
    let mut app = spawn_app(&vars).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", KEY.parse().unwrap());
    app.client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    app
}

/// A scrape, checked by the strict parser.
async fn scrape(app: &TestApp) -> Exposition {
    let resp = app.get("/metrics").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Exposition::parse(&resp.text().await.unwrap())
}

/// `after - before` of one series (absent = 0).
fn delta(before: &Exposition, after: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels).unwrap_or(0.0) - before.value(name, labels).unwrap_or(0.0)
}

fn usage_of(v: &Value) -> (f64, f64) {
    (
        v["prompt_tokens"].as_f64().expect("prompt_tokens"),
        v["completion_tokens"].as_f64().expect("completion_tokens"),
    )
}

#[tokio::test]
async fn a_websocket_turn_moves_every_turn_figure_and_the_token_counters_equal_its_usage() {
    let _serial = SERIAL.lock().await;
    let fake = FakeUpstream::start().await.unwrap();
    // Paced, so the scrape in the middle of the reply sees the stream in flight.
    fake.set_default(Script::counted(12).paced(Duration::ZERO, Duration::from_millis(60)));
    let model = unique_model("ws");
    let app = app_with(&fake, &model, &[]).await;
    let m = model.as_str();
    let before = scrape(&app).await;

    let s = app
        .create_session("metrics-ws-user", "leadership", "websocket")
        .await;
    let mut ws = ws_connect(&app, &s, "").await;
    let WsRead::Event(hello) = ws_next(&mut ws).await else {
        panic!("no session event")
    };
    assert_eq!(hello["type"], "session");
    ws_send(
        &mut ws,
        json!({"type": "user_message", "text": "how do I delegate?"}),
    )
    .await;
    let first = ws_until(&mut ws, "token").await;
    assert_eq!(first.last().unwrap()["index"], 0);

    // Mid-reply: this app's connection and session, and its upstream stream, are counted now.
    let during = scrape(&app).await;
    assert_eq!(
        during.value("coachd_connections", &[("transport", "websocket")]),
        Some(1.0)
    );
    assert_eq!(during.value("coachd_sessions_live", &[]), Some(1.0));
    assert_eq!(
        during.value("coachd_llm_streams_in_flight", &[("provider", "openai")]),
        Some(1.0)
    );

    let rest = ws_until(&mut ws, "turn_end").await;
    let end = rest.last().unwrap();
    assert_eq!(end["model"], m);
    let (prompt, completion) = usage_of(&end["usage"]);
    assert_eq!(completion, 12.0, "the fake streamed 12 tokens");
    app.wait_written(1).await;
    let after = scrape(&app).await;

    let by_model = [("provider", "openai"), ("model", m)];
    let turn = [("provider", "openai"), ("model", m), ("transport", "websocket")];
    assert_eq!(
        after.value("coachd_llm_prompt_tokens_total", &by_model),
        Some(prompt)
    );
    assert_eq!(
        after.value("coachd_llm_completion_tokens_total", &by_model),
        Some(completion)
    );
    assert_eq!(after.value("coachd_first_token_seconds_count", &turn), Some(1.0));
    assert_eq!(
        after.value("coachd_first_token_overhead_seconds_count", &turn),
        Some(1.0)
    );
    assert_eq!(
        after.value("coachd_llm_upstream_first_token_seconds_count", &by_model),
        Some(1.0)
    );
    let total = after.value("coachd_first_token_seconds_sum", &turn).unwrap();
    let overhead = after
        .value("coachd_first_token_overhead_seconds_sum", &turn)
        .unwrap();
    assert!(
        overhead >= 0.0 && overhead <= total,
        "overhead {overhead} within the time to first token {total}"
    );
    assert_eq!(
        after.value("coachd_llm_streams_in_flight", &[("provider", "openai")]),
        Some(0.0),
        "the stream was counted out when the turn ended"
    );

    // The prompt searched the memory store (pgvector) once; write-behind wrote the turn.
    let search = [("backend", "pgvector"), ("outcome", "ok")];
    assert_eq!(
        delta(
            &before,
            &after,
            "coachd_memory_search_duration_seconds_count",
            &search
        ),
        1.0
    );
    assert_eq!(
        delta(&before, &after, "coachd_write_behind_written_total", &[]),
        1.0
    );
    assert_eq!(after.value("coachd_write_behind_queue_depth", &[]), Some(0.0));
    assert_eq!(after.value("coachd_write_behind_backlog", &[]), Some(0.0));

    // HTTP requests by route template: the session's id never becomes a label.
    let created = [
        ("method", "POST"),
        ("route", "/realtime/sessions"),
        ("status", "201"),
    ];
    assert_eq!(
        delta(&before, &after, "coachd_http_requests_total", &created),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "coachd_http_request_duration_seconds_count",
            &created
        ),
        1.0
    );
    let upgrade = [
        ("method", "GET"),
        ("route", "/realtime/sessions/{id}/ws"),
        ("status", "101"),
    ];
    assert_eq!(
        delta(&before, &after, "coachd_http_requests_total", &upgrade),
        1.0
    );
    let scraped = [("method", "GET"), ("route", "/metrics"), ("status", "200")];
    assert_eq!(
        delta(&before, &after, "coachd_http_requests_total", &scraped),
        2.0,
        "the scrapes in between (each counted after its own body was rendered)"
    );
    assert!(!after.text.contains(&s.id), "a raw path reached a label");

    drop(ws);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn sse_turns_and_the_stateless_streams_count_first_tokens_and_tokens_per_request() {
    let _serial = SERIAL.lock().await;
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("Start with one task you can hand over this week."));
    let model = unique_model("sse");
    let app = app_with(&fake, &model, &[]).await;
    let m = model.as_str();
    let before = scrape(&app).await;

    // A realtime SSE turn.
    let s = app.create_session("metrics-sse-user", "leadership", "sse").await;
    let resp = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
        .header("accept", "text/event-stream")
        .json(&json!({"text": "where do I start?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = SseReader::new(resp).until("turn_end").await;
    let (p1, c1) = usage_of(&events.last().unwrap().data["usage"]);

    // A streamed /v1/chat/completions with the usage chunk.
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(
            &json!({"model": "chat", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "and then?"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let usage_chunk: Value = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| c["usage"].is_object())
        .expect("a usage chunk");
    let (p2, c2) = usage_of(&usage_chunk["usage"]);
    assert!(body.trim_end().ends_with("data: [DONE]"));

    // A streamed /api/v1/llm/stream.
    let resp = app
        .client
        .post(app.url("/api/v1/llm/stream"))
        .json(&json!({"prompt": "one more tip"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = eventsource_stream::Eventsource::eventsource(resp.bytes_stream());
    let mut done = None;
    while let Some(ev) = stream.next().await {
        let ev = ev.unwrap();
        if ev.event == "done" {
            done = Some(serde_json::from_str::<Value>(&ev.data).unwrap());
        }
    }
    let (p3, c3) = usage_of(&done.expect("a done event")["usage"]);
    app.wait_written(1).await;
    let after = scrape(&app).await;

    let by_model = [("provider", "openai"), ("model", m)];
    let sse = [("provider", "openai"), ("model", m), ("transport", "sse")];
    assert_eq!(
        after.value("coachd_llm_prompt_tokens_total", &by_model),
        Some(p1 + p2 + p3)
    );
    assert_eq!(
        after.value("coachd_llm_completion_tokens_total", &by_model),
        Some(c1 + c2 + c3)
    );
    assert_eq!(c1, 10.0, "ten words, one token each");
    assert_eq!(after.value("coachd_first_token_seconds_count", &sse), Some(3.0));
    assert_eq!(
        after.value("coachd_first_token_overhead_seconds_count", &sse),
        Some(3.0)
    );
    assert_eq!(
        after.value("coachd_llm_upstream_first_token_seconds_count", &by_model),
        Some(3.0)
    );
    for (route, status) in [
        ("/v1/chat/completions", "200"),
        ("/api/v1/llm/stream", "200"),
        ("/realtime/sessions/{id}/turn", "200"),
    ] {
        let labels = [("method", "POST"), ("route", route), ("status", status)];
        assert_eq!(
            delta(
                &before,
                &after,
                "coachd_http_request_duration_seconds_count",
                &labels
            ),
            1.0,
            "{route}"
        );
    }
    // Every bucket series of the histogram moved together: the +Inf bucket is the count.
    let mut inf = sse.to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(after.value("coachd_first_token_seconds_bucket", &inf), Some(3.0));
    app.stop().await.unwrap();
}

const TASKS: &str = r#"
[tasks.chat]
description = "primary, then a fallback"
primary = { provider = "openai", model = "PRIMARY" }
fallbacks = [{ provider = "openai", model = "FALLBACK" }]
"#;

#[tokio::test]
async fn retries_fallbacks_and_upstream_errors_are_counted_by_model_and_kind() {
    let _serial = SERIAL.lock().await;
    let fake = FakeUpstream::start().await.unwrap();
    let primary = unique_model("primary");
    let fallback = unique_model("fallback");
    let path = std::env::temp_dir().join(format!(
        "coachd-metrics-tasks-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(
        &path,
        TASKS.replace("PRIMARY", &primary).replace("FALLBACK", &fallback),
    )
    .unwrap();
    let file = path.to_string_lossy().into_owned();
    let app = app_with(
        &fake,
        &primary,
        &[
            ("COACHD_LLM_TASKS_FILE", &file),
            ("COACHD_LLM_MAX_RETRIES", "1"),
            ("COACHD_LLM_RETRY_BASE_MS", "10"),
        ],
    )
    .await;
    // The primary: a 500 (retried), then a 400 (a prompt too long: not retried, so fall back);
    // the fallback answers.
    fake.enqueue(
        &primary,
        Script::default().with_fault(Fault::Status {
            status: 500,
            retry_after: None,
        }),
    );
    fake.enqueue(
        &primary,
        Script::default().with_fault(Fault::Status {
            status: 400,
            retry_after: None,
        }),
    );
    fake.set_model(&fallback, Script::text("From the fallback."));
    let before = scrape(&app).await;

    let resp = app
        .client
        .post(app.url("/api/v1/llm/complete"))
        .json(&json!({"prompt": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["model"], fallback.as_str());

    // Then the primary cuts its stream after two tokens: an error after the first token.
    fake.enqueue(&primary, Script::counted(5).with_fault(Fault::Cut { after: 2 }));
    let resp = app
        .client
        .post(app.url("/api/v1/llm/stream"))
        .json(&json!({"prompt": "again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("upstream_incomplete"), "{text}");
    let after = scrape(&app).await;

    let p = primary.as_str();
    assert_eq!(
        after.value(
            "coachd_llm_retries_total",
            &[("provider", "openai"), ("model", p)]
        ),
        Some(1.0)
    );
    assert_eq!(
        after.value(
            "coachd_llm_fallbacks_total",
            &[("provider", "openai"), ("model", p)]
        ),
        Some(1.0)
    );
    let errors = |kind, stage| {
        delta(
            &before,
            &after,
            "coachd_llm_upstream_errors_total",
            &[("provider", "openai"), ("kind", kind), ("stage", stage)],
        )
    };
    assert_eq!(errors("unavailable", "before_first_token"), 1.0);
    // The fake's 400 is OpenAI's `context_length_exceeded`, typed as such.
    assert_eq!(errors("context_too_long", "before_first_token"), 1.0);
    assert_eq!(errors("bad_request", "before_first_token"), 0.0);
    assert_eq!(errors("incomplete", "after_first_token"), 1.0);
    // The fallback served the completion; the cut stream counted its first token too.
    assert_eq!(
        after.value(
            "coachd_llm_upstream_first_token_seconds_count",
            &[("provider", "openai"), ("model", fallback.as_str())]
        ),
        Some(1.0)
    );
    assert_eq!(
        after.value(
            "coachd_first_token_seconds_count",
            &[("provider", "openai"), ("model", p), ("transport", "sse")]
        ),
        Some(1.0)
    );
    let _ = std::fs::remove_file(&path);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn no_pong_closes_rate_limit_refusals_and_job_runs_are_counted() {
    let _serial = SERIAL.lock().await;
    let fake = FakeUpstream::start().await.unwrap();
    let model = unique_model("ops");
    let app = app_with(
        &fake,
        &model,
        &[
            ("COACHD_WS_PING_SECS", "1"),
            ("COACHD_WS_PONG_TIMEOUT_SECS", "1"),
            ("RATE_LIMIT_REQUESTS", "1"),
            ("COACHD_JOBS_ENABLE_NOOP", "true"),
            ("COACHD_JOBS_POLL_MS", "20"),
            ("COACHD_JOBS_POLL_MAX_MS", "100"),
        ],
    )
    .await;
    let before = scrape(&app).await;

    // A WebSocket client that never reads never answers a ping.
    let s = app
        .create_session("metrics-ops-user", "leadership", "websocket")
        .await;
    let mut ws = ws_connect(&app, &s, "").await;
    let stats = app.state.sessions.stats().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stats.no_pong_closes.get() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never closed for the missing pong"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if matches!(msg, Message::Close(_)) {
            break;
        }
    }

    // The memory routes allow one request per window here: the second is refused.
    let route = "/ai/coach/memory/metrics-ops-user/leadership";
    assert_eq!(app.get(route).await.status(), 200);
    let refused = app.get(route).await;
    assert_eq!(refused.status(), 429);

    // A job runs to its end.
    let resp = app
        .client
        .post(app.url("/api/v1/jobs"))
        .json(&json!({"kind": "noop", "user_id": "metrics-ops-user", "coach_id": "c", "text": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job: Value = app.get(&format!("/api/v1/jobs/{id}")).await.json().await.unwrap();
        if job["status"] == "succeeded" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never succeeded: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = scrape(&app).await;

    let no_pong = [("transport", "websocket"), ("reason", "no_pong")];
    assert_eq!(delta(&before, &after, "coachd_disconnects_total", &no_pong), 1.0);
    let slow = [("transport", "websocket"), ("reason", "slow_client")];
    assert_eq!(delta(&before, &after, "coachd_disconnects_total", &slow), 0.0);
    assert!(after.value("coachd_disconnects_total", &slow).is_some());
    let endpoint = [("endpoint", "/ai/coach/memory/{user_id}/{coach_id}")];
    assert_eq!(
        delta(&before, &after, "coachd_rate_limit_refusals_total", &endpoint),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "coachd_http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/ai/coach/memory/{user_id}/{coach_id}"),
                ("status", "429"),
            ]
        ),
        1.0
    );
    let run = [("kind", "noop"), ("status", "succeeded")];
    assert_eq!(
        delta(&before, &after, "coachd_job_duration_seconds_count", &run),
        1.0
    );
    for queue in ["extraction", "transcription", "llm"] {
        assert_eq!(
            after.value("coachd_job_queue_depth", &[("queue", queue), ("state", "queued")]),
            Some(0.0),
            "{queue}"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_bearer_token_guards_the_route_and_the_switch_turns_it_off() {
    let _serial = SERIAL.lock().await;
    let fake = FakeUpstream::start().await.unwrap();
    let model = unique_model("auth");
    let app = app_with(&fake, &model, &[("COACHD_METRICS_TOKEN", "scrape-me")]).await;
    for auth in [None, Some("Bearer wrong"), Some("Bearer scrape-mee"), Some(KEY)] {
        let mut req = app.client.get(app.url("/metrics"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        assert!(body["error"]["message"].is_string());
    }
    let resp = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let scraped = Exposition::parse(&resp.text().await.unwrap());
    assert!(scraped.types.contains_key("coachd_http_requests_total"));
    app.stop().await.unwrap();

    let off = app_with(&fake, &model, &[("COACHD_METRICS_ENABLED", "false")]).await;
    let resp = off.get("/metrics").await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    off.stop().await.unwrap();
}

#[tokio::test]
async fn every_metric_of_the_readme_is_described_with_its_type() {
    let _serial = SERIAL.lock().await;
    let fake = FakeUpstream::start().await.unwrap();
    let model = unique_model("names");
    let app = app_with(&fake, &model, &[]).await;
    // One turn, so the families recorded only when something happens have been created.
    let s = app
        .create_session("metrics-names-user", "leadership", "http")
        .await;
    let (status, _) = app.turn(&s, "hello").await;
    assert_eq!(status, 200);
    let scraped = scrape(&app).await;
    let readme = std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a Metrics section in the README");
    let section = section.split("\n## ").next().unwrap();
    let mut listed = 0;
    for line in section.lines().filter(|l| l.starts_with("| `coachd_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`');
        let kind = cells[2];
        listed += 1;
        if let Some(t) = scraped.types.get(name) {
            assert_eq!(t, kind, "{name}: README says {kind}, the scrape {t}");
            assert!(scraped.helps.contains_key(name), "{name} has no HELP");
        }
    }
    assert!(listed >= 24, "the README lists {listed} metrics");
    for name in [
        "coachd_http_requests_total",
        "coachd_http_request_duration_seconds",
        "coachd_first_token_seconds",
        "coachd_first_token_overhead_seconds",
        "coachd_llm_upstream_first_token_seconds",
        "coachd_llm_streams_in_flight",
        "coachd_llm_prompt_tokens_total",
        "coachd_llm_completion_tokens_total",
        "coachd_sessions_live",
        "coachd_connections",
        "coachd_disconnects_total",
        "coachd_write_behind_queue_depth",
        "coachd_write_behind_backlog",
        "coachd_write_behind_failures_total",
        "coachd_rate_limiter_errors_total",
        "coachd_memory_search_duration_seconds",
        "coachd_job_queue_depth",
    ] {
        assert!(scraped.types.contains_key(name), "{name} missing from the scrape");
        assert!(
            section.contains(&format!("| `{name}` |")),
            "{name} missing from the README"
        );
    }
    app.stop().await.unwrap();
}

/// A series' labels, as sorted pairs.
type LabelSet = Vec<(String, String)>;

/// One sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape, parsed strictly as the Prometheus text exposition format 0.0.4: `# HELP` and
/// `# TYPE` at most once per family and before its samples, valid metric and label names,
/// escaped label values, float values, no duplicate series, counters not negative, and each
/// histogram with ascending `le` buckets whose counts never fall, ending in `+Inf` = `_count`,
/// with a `_sum`.
#[derive(Debug)]
struct Exposition {
    text: String,
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
    samples: Vec<Sample>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// `{a="x",b="y"}` at the start of `s`: the labels and the rest of the line.
fn parse_labels(s: &str, line: usize) -> (BTreeMap<String, String>, &str) {
    let mut labels = BTreeMap::new();
    let Some(mut rest) = s.strip_prefix('{') else {
        return (labels, s);
    };
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let eq = rest
            .find('=')
            .unwrap_or_else(|| panic!("line {line}: label without ="));
        let name = &rest[..eq];
        assert!(is_label_name(name), "line {line}: bad label name {name:?}");
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .unwrap_or_else(|| panic!("line {line}: unquoted label value"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("line {line}: bad escape {other:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("line {line}: unterminated label value"),
            }
        };
        assert!(
            labels.insert(name.to_owned(), value).is_none(),
            "line {line}: label {name} twice"
        );
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            assert!(rest.starts_with('}'), "line {line}: expected , or }}");
        }
    }
}

impl Exposition {
    fn parse(text: &str) -> Self {
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "the last line ends with \\n"
        );
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashMap<String, String> = HashMap::new();
        let mut samples: Vec<Sample> = Vec::new();
        let mut seen_families: Vec<String> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.is_empty() {
                continue;
            }
            if let Some(comment) = raw.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                match words.next() {
                    Some("HELP") => {
                        let name = words.next().unwrap_or_default();
                        assert!(is_metric_name(name), "line {line}: HELP of {name:?}");
                        let help = words.next().unwrap_or_default().to_owned();
                        assert!(
                            helps.insert(name.to_owned(), help).is_none(),
                            "line {line}: second HELP"
                        );
                    }
                    Some("TYPE") => {
                        let name = words.next().unwrap_or_default();
                        let kind = words.next().unwrap_or_default();
                        assert!(is_metric_name(name), "line {line}: TYPE of {name:?}");
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                            "line {line}: type {kind:?}"
                        );
                        assert!(
                            !seen_families.iter().any(|f| f == name),
                            "line {line}: TYPE of {name} after its samples"
                        );
                        assert!(
                            types.insert(name.to_owned(), kind.to_owned()).is_none(),
                            "line {line}: second TYPE"
                        );
                    }
                    _ => {}
                }
                continue;
            }
            let name_end = raw
                .find(['{', ' '])
                .unwrap_or_else(|| panic!("line {line}: no value"));
            let name = &raw[..name_end];
            assert!(is_metric_name(name), "line {line}: bad metric name {name:?}");
            let (labels, rest) = parse_labels(&raw[name_end..], line);
            let mut parts = rest.trim_start_matches(' ').split(' ');
            let value = parts
                .next()
                .and_then(parse_value)
                .unwrap_or_else(|| panic!("line {line}: bad value in {raw:?}"));
            if let Some(ts) = parts.next() {
                assert!(ts.parse::<i64>().is_ok(), "line {line}: bad timestamp {ts:?}");
            }
            assert!(parts.next().is_none(), "line {line}: trailing fields");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix).filter(|base| {
                        matches!(
                            types.get(*base).map(String::as_str),
                            Some("histogram" | "summary")
                        )
                    })
                })
                .unwrap_or(name);
            let kind = types
                .get(family)
                .unwrap_or_else(|| panic!("line {line}: {name} has no TYPE"));
            if kind == "counter" {
                assert!(value >= 0.0, "line {line}: negative counter");
            }
            if !seen_families.iter().any(|f| f == family) {
                seen_families.push(family.to_owned());
            }
            assert!(
                !samples.iter().any(|s| s.name == name && s.labels == labels),
                "line {line}: duplicate series {raw}"
            );
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        let exposition = Exposition {
            text: text.to_owned(),
            types,
            helps,
            samples,
        };
        exposition.check_histograms();
        exposition
    }

    fn check_histograms(&self) {
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let bucket = format!("{family}_bucket");
            let mut series: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket) {
                let le =
                    parse_value(s.labels.get("le").expect("a bucket without le")).expect("le is a number");
                let rest: LabelSet = s
                    .labels
                    .iter()
                    .filter(|(k, _)| *k != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                series.entry(rest).or_default().push((le, s.value));
            }
            assert!(!series.is_empty(), "histogram {family} has no buckets");
            for (labels, buckets) in series {
                let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                for pair in buckets.windows(2) {
                    assert!(pair[0].0 < pair[1].0, "{family}{labels:?}: le not ascending");
                    assert!(pair[0].1 <= pair[1].1, "{family}{labels:?}: bucket counts fall");
                }
                let last = buckets.last().unwrap();
                assert!(last.0.is_infinite(), "{family}{labels:?}: no +Inf bucket");
                let count = self
                    .value(&format!("{family}_count"), &l)
                    .unwrap_or_else(|| panic!("{family}{labels:?}: no _count"));
                assert_eq!(last.1, count, "{family}{labels:?}: +Inf bucket is not _count");
                assert!(
                    self.value(&format!("{family}_sum"), &l).is_some(),
                    "{family}{labels:?}: no _sum"
                );
            }
        }
    }

    /// The value of the series `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }
}

#[test]
fn the_parser_refuses_what_is_not_the_text_format() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"q\"} 3\n\
        # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    let e = Exposition::parse(good);
    assert_eq!(e.value("a_total", &[("x", "1\"q")]), Some(3.0));
    assert_eq!(e.value("h_count", &[]), Some(2.0));
    for bad in [
        "a 1\n",                                                             // no TYPE
        "# TYPE a gauge\na{x=1} 1\n",                                        // unquoted value
        "# TYPE a gauge\na one\n",                                           // not a number
        "# TYPE a gauge\na 1\n# TYPE a gauge\n",                             // TYPE twice
        "# TYPE a gauge\na 1\na 2\n",                                        // duplicate series
        "# TYPE 1a gauge\n1a 1\n",                                           // bad name
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", // +Inf != count
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE a counter\na -1\n",
        "# TYPE a gauge\na 1", // no final newline
    ] {
        let r = std::panic::catch_unwind(|| Exposition::parse(bad));
        assert!(r.is_err(), "accepted: {bad:?}");
    }
}
