//! The /api/v1 routes against the fake upstream: status, tasks, complete, stream (event format,
//! headers, events flushed as produced, error events), classify-intent and extract-entities, with
//! their bad-input answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use common::{Services, TestApp, spawn_app_with};
use futures::StreamExt;
use serde_json::{Value, json};

const KEY: &str = "test-api-key";

async fn app_with(fake: &FakeUpstream, extra: &[(&str, &str)]) -> TestApp {
    let base = fake.base_url();
    let mut vars = vec![
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "upstream-key"),
        ("OPENAI_MODEL", "gpt-4o-mini"),
        ("COACHD_OPENAI_BASE_URL", base.as_str()),
        ("COACHD_LLM_MAX_RETRIES", "0"),
        ("XENIOS_BACKEND_API_KEY", KEY),
    ];
    vars.extend_from_slice(extra);
    spawn_app_with(Services::Embedded, &vars).await
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let resp = app
        .client
        .get(app.url(path))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let resp = app
        .client
        .post(app.url(path))
        .header("x-api-key", KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

async fn post_raw(app: &TestApp, path: &str, body: &str) -> (u16, Value) {
    let resp = app
        .client
        .post(app.url(path))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// `(event, data)` pairs of an SSE body.
fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut event = "message".to_owned();
            let mut data = None;
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(d).unwrap());
                }
            }
            data.map(|d| (event, d))
        })
        .collect()
}

#[tokio::test]
async fn status_and_tasks_describe_the_service() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(&fake, &[]).await;

    let (status, body) = get(&app, "/api/v1/status").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["service"], "coachd");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(body["default_provider"], "openai");
    assert_eq!(body["providers"], json!(["openai", "offline"]));
    assert_eq!(
        body["storage"],
        json!({"database": "embedded", "redis": "embedded"})
    );
    assert!(body["uptime_secs"].is_u64());

    let (status, body) = get(&app, "/api/v1/llm/tasks").await;
    assert_eq!(status, 200);
    let tasks = body["tasks"].as_array().unwrap();
    for name in coachd::llm::router::BUILTIN_TASKS {
        let task = tasks.iter().find(|t| t["name"] == name).unwrap();
        assert_eq!(task["primary"]["provider"], "openai");
        assert_eq!(task["primary"]["model"], "gpt-4o-mini");
        assert!(task["fallbacks"].is_array() && task["description"].is_string());
        assert!(task["params"].is_object());
    }
    let chat = tasks.iter().find(|t| t["name"] == "chat").unwrap();
    assert_eq!(chat["params"]["temperature"], 0.7);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn complete_returns_the_completion_with_usage() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("Set one goal for this week."));
    let app = app_with(&fake, &[]).await;

    let (status, body) = post(
        &app,
        "/api/v1/llm/complete",
        json!({
            "task": "session_summary",
            "system": "You are a coach.",
            "messages": [{"role": "user", "content": "I procrastinate."}, {"role": "assistant", "content": "Why?"}],
            "prompt": "Fear, probably.",
            "params": {"temperature": 0.2, "max_tokens": 50},
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], "Set one goal for this week.");
    assert_eq!(
        (&body["task"], &body["provider"], &body["model"]),
        (&json!("session_summary"), &json!("openai"), &json!("gpt-4o-mini"))
    );
    assert_eq!(body["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 6);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + 6
    );

    let sent = fake.requests().pop().unwrap().body;
    assert_eq!(sent["temperature"], 0.2, "the override wins over the task's 0.3");
    assert_eq!(sent["max_tokens"], 50);
    let roles: Vec<&str> = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(sent["messages"][3]["content"], "Fear, probably.");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn complete_refuses_bad_input_with_400() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(
        &fake,
        &[
            ("COACHD_API_MAX_TEXT_CHARS", "100"),
            ("COACHD_API_MAX_MESSAGES", "2"),
            ("COACHD_MAX_BODY_BYTES", "2048"),
        ],
    )
    .await;
    let long = "x".repeat(101);
    let m = |c: &str| json!({"role": "user", "content": c});
    let cases = [
        (json!({"task": "chat"}), "missing_field"),
        (json!({"messages": "hello"}), "invalid_field"),
        (json!({"prompt": 42}), "invalid_field"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "invalid_field",
        ),
        (json!({"messages": [{"role": "user"}]}), "invalid_field"),
        (json!({"prompt": "  "}), "invalid_field"),
        (json!({"prompt": long}), "text_too_long"),
        (json!({"prompt": "hi", "system": long}), "text_too_long"),
        (json!({"messages": [m("a"), m("b"), m("c")]}), "too_many_messages"),
        (json!({"task": "no_such_task", "prompt": "hi"}), "unknown_task"),
        (
            json!({"prompt": "hi", "params": {"temperature": 5}}),
            "invalid_field",
        ),
        (
            json!({"prompt": "hi", "params": {"max_tokens": 0}}),
            "invalid_field",
        ),
        (
            json!({"prompt": "hi", "params": {"stop": ["a", "b", "c", "d", "e"]}}),
            "invalid_field",
        ),
    ];
    for (body, code) in cases {
        for path in ["/api/v1/llm/complete", "/api/v1/llm/stream"] {
            let (status, answer) = post(&app, path, body.clone()).await;
            assert_eq!(status, 400, "{path} {body}: {answer}");
            assert_eq!(answer["error"]["code"], code, "{path} {body}: {answer}");
            assert!(answer["error"]["message"].is_string());
        }
    }
    let (status, answer) = post_raw(&app, "/api/v1/llm/complete", "{not json").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let huge = json!({"prompt": "y".repeat(4096)}).to_string();
    let (status, answer) = post_raw(&app, "/api/v1/llm/complete", &huge).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("2048"));
    assert_eq!(
        fake.request_count("/chat/completions"),
        0,
        "nothing reached the LLM"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn complete_reports_an_upstream_failure_as_502() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::status(500));
    let app = app_with(&fake, &[]).await;
    let (status, body) = post(&app, "/api/v1/llm/complete", json!({"prompt": "hi"})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "all_models_failed");
    assert!(!body.to_string().contains("upstream-key"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn stream_sends_start_tokens_and_done_with_streaming_headers() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("Hello! How can I help?"));
    let app = app_with(&fake, &[]).await;
    let resp = app
        .client
        .post(app.url("/api/v1/llm/stream"))
        .header("x-api-key", KEY)
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(h["cache-control"], "no-cache, no-transform");
    assert_eq!(h["x-accel-buffering"], "no");
    assert!(h.get("content-encoding").is_none());

    let events = sse_events(&resp.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names.first(), Some(&"start"));
    assert_eq!(names.last(), Some(&"done"));
    assert!(
        names[1..names.len() - 1].iter().all(|n| *n == "token"),
        "{names:?}"
    );
    assert_eq!(
        events[0].1,
        json!({"task": "chat", "provider": "openai", "model": "gpt-4o-mini"})
    );
    let text: String = events
        .iter()
        .filter(|(e, _)| e == "token")
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello! How can I help?");
    let done = &events.last().unwrap().1;
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["model"], "gpt-4o-mini");
    assert_eq!(done["provider"], "openai");
    assert_eq!(done["usage"]["completion_tokens"], 5);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn stream_flushes_each_token_as_it_is_produced() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(6).paced(Duration::ZERO, Duration::from_millis(300)));
    let app = app_with(&fake, &[]).await;
    let start = Instant::now();
    let resp = app
        .client
        .post(app.url("/api/v1/llm/stream"))
        .header("x-api-key", KEY)
        .json(&json!({"prompt": "count"}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("event: token") {
        seen.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    let first_token = start.elapsed();
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let total = start.elapsed();
    assert!(seen.contains("event: done"), "{seen}");
    assert!(
        first_token < Duration::from_millis(800) && total >= Duration::from_millis(1400),
        "first token after {first_token:?}, whole stream {total:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn stream_errors_after_the_first_token_end_with_an_error_event() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(6).with_fault(Fault::MidStreamError { after: 2 }));
    let app = app_with(&fake, &[]).await;
    let resp = app
        .client
        .post(app.url("/api/v1/llm/stream"))
        .header("x-api-key", KEY)
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = sse_events(&resp.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["start", "token", "token", "error"]);
    let error = &events[3].1["error"];
    assert!(
        error["code"].is_string() && error["message"].is_string(),
        "{error}"
    );

    // A failure before any token is an HTTP error, not a 200 stream.
    fake.set_default(Script::status(503));
    let (status, body) = post(&app, "/api/v1/llm/stream", json!({"prompt": "hi"})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "all_models_failed");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn classify_intent_returns_a_label_of_the_set() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(&fake, &[]).await;

    fake.enqueue(
        "*",
        Script::text(r#"{"intent": "goal_setting", "confidence": 0.92}"#),
    );
    let (status, body) = post(
        &app,
        "/api/v1/llm/classify-intent",
        json!({"text": "I want to close three new clients this month"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["intent"], "goal_setting");
    assert_eq!(body["confidence"], 0.92);
    let defaults: Vec<&str> = coachd::config::DEFAULT_INTENT_LABELS.to_vec();
    assert_eq!(body["labels"], json!(defaults));
    let sent = fake.requests().pop().unwrap().body;
    assert_eq!(sent["response_format"]["type"], "json_schema");
    assert_eq!(
        sent["response_format"]["json_schema"]["schema"]["properties"]["intent"]["enum"],
        json!(defaults)
    );

    fake.enqueue("*", Script::text(r#"{"intent": "billing", "confidence": 0.5}"#));
    let (status, body) = post(
        &app,
        "/api/v1/llm/classify-intent",
        json!({"text": "Why was I charged twice?", "labels": ["billing", "other"]}),
    )
    .await;
    assert_eq!((status, body["intent"].as_str()), (200, Some("billing")));
    assert_eq!(body["labels"], json!(["billing", "other"]));

    // A label outside the set, twice (the reply and its repair): refused, never passed on.
    fake.enqueue("*", Script::text(r#"{"intent": "hacked", "confidence": 1}"#));
    fake.enqueue("*", Script::text(r#"{"intent": "hacked", "confidence": 1}"#));
    let (status, body) = post(&app, "/api/v1/llm/classify-intent", json!({"text": "hi"})).await;
    assert_eq!(status, 502, "{body}");
    assert!(!body.to_string().contains("\"intent\""));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn classify_intent_and_extract_entities_refuse_bad_input() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(
        &fake,
        &[
            ("COACHD_API_MAX_TEXT_CHARS", "50"),
            ("COACHD_API_MAX_LABELS", "3"),
        ],
    )
    .await;
    let long = "x".repeat(51);
    for (path, list) in [
        ("/api/v1/llm/classify-intent", "labels"),
        ("/api/v1/llm/extract-entities", "types"),
    ] {
        let cases = [
            json!({}),
            json!({"text": 7}),
            json!({"text": ""}),
            json!({"text": long}),
            json!({"text": "hi", list: []}),
            json!({"text": "hi", list: ["a", "a"]}),
            json!({"text": "hi", list: ["a", "b", "c", "d"]}),
            json!({"text": "hi", list: ["has space"]}),
            json!({"text": "hi", list: "a"}),
        ];
        for body in cases {
            let (status, answer) = post(&app, path, body.clone()).await;
            assert_eq!(status, 400, "{path} {body}: {answer}");
            assert!(answer["error"]["code"].is_string());
        }
    }
    assert_eq!(fake.request_count("/chat/completions"), 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn extract_entities_computes_spans_from_the_input() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(&fake, &[]).await;
    let text = "Call Zoë at Acme on Friday, then Acme's CFO about the €5,000 renewal.";
    fake.enqueue(
        "*",
        Script::text(
            &json!({"entities": [
                {"type": "person", "text": "Zoë"},
                {"type": "organization", "text": "Acme"},
                {"type": "organization", "text": "Acme"},
                {"type": "organization", "text": "Acme"},
                {"type": "date", "text": "friday"},
                {"type": "money", "text": "€5,000"},
                {"type": "person", "text": "Bob"},
            ]})
            .to_string(),
        ),
    );
    let (status, body) = post(&app, "/api/v1/llm/extract-entities", json!({"text": text})).await;
    assert_eq!(status, 200, "{body}");
    let chars: Vec<char> = text.chars().collect();
    let entities = body["entities"].as_array().unwrap();
    let got: Vec<(&str, &str, u64, u64)> = entities
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["text"].as_str().unwrap(),
                e["start"].as_u64().unwrap(),
                e["end"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("person", "Zoë", 5, 8),
            ("organization", "Acme", 12, 16),
            ("date", "Friday", 20, 26),
            ("organization", "Acme", 33, 37),
            ("money", "€5,000", 54, 60),
        ],
        "Bob is not in the text and the third Acme has no third occurrence"
    );
    for (_, t, start, end) in &got {
        let span: String = chars[*start as usize..*end as usize].iter().collect();
        assert_eq!(&span, t);
    }
    let sent = fake.requests().pop().unwrap().body;
    assert_eq!(
        sent["response_format"]["json_schema"]["schema"]["properties"]["entities"]["items"]["properties"]["type"]
            ["enum"][0],
        "person"
    );

    fake.enqueue(
        "*",
        Script::text(r#"{"entities": [{"type": "goal", "text": "run a marathon"}]}"#),
    );
    let (status, body) = post(
        &app,
        "/api/v1/llm/extract-entities",
        json!({"text": "I will run a marathon", "types": ["goal"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["entities"],
        json!([{"type": "goal", "text": "run a marathon", "start": 7, "end": 21}])
    );
    assert_eq!(body["types"], json!(["goal"]));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn before_the_first_token_every_llm_route_answers_504_on_timeouts_and_502_otherwise() {
    let fake = FakeUpstream::start().await.unwrap();
    let base = fake.base_url();
    // Two models per task (OpenAI, then OpenRouter as its fallback), so "every model" is tried.
    let app = app_with(
        &fake,
        &[
            ("OPENROUTER_API_KEY", "upstream-key"),
            ("COACHD_OPENROUTER_BASE_URL", &base),
            ("COACHD_LLM_FIRST_TOKEN_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    let routes = [
        ("/api/v1/llm/complete", json!({"prompt": "hi"})),
        ("/api/v1/llm/stream", json!({"prompt": "hi"})),
        ("/api/v1/llm/classify-intent", json!({"text": "hi"})),
        ("/api/v1/llm/extract-entities", json!({"text": "Call Zoë"})),
    ];

    // Headers come, then no token: the first-token timeout fires on each model.
    fake.set_default(Script::counted(3).with_fault(Fault::Stall { after: 0 }));
    for (path, body) in &routes {
        let before = fake.request_count("/chat/completions");
        let (status, answer) = post(&app, path, body.clone()).await;
        assert_eq!(status, 504, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "upstream_timeout", "{path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("first token timeout"), "{path}: {message}");
        assert_eq!(
            fake.request_count("/chat/completions") - before,
            2,
            "{path}: both models were tried"
        );
    }

    // Every model answers 500: a 502 listing the attempts.
    fake.set_default(Script::status(500));
    for (path, body) in &routes {
        let (status, answer) = post(&app, path, body.clone()).await;
        assert_eq!(status, 502, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "all_models_failed", "{path}: {answer}");
    }
    app.stop().await.unwrap();
}
