//! The OpenAI-compatible routes against the fake upstream: `chat.completion` objects, streamed
//! chunks checked key by key against captured OpenAI traffic (`tests/wire/openai_stream_*.sse`),
//! `stream_options.include_usage`, tasks and `provider/model` names, OpenAI-shaped errors, and
//! `/v1/models`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use common::{Services, TestApp, spawn_app_with};
use serde_json::{Value, json};

const KEY: &str = "sk-coachd-test";

async fn app_with(fake: &FakeUpstream) -> TestApp {
    app_with_extra(fake, &[]).await
}

async fn app_with_extra(fake: &FakeUpstream, extra: &[(&str, &str)]) -> TestApp {
    let base = fake.base_url();
    let mut vars = vec![
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "upstream-key"),
        ("OPENAI_MODEL", "gpt-4o-mini"),
        ("COACHD_OPENAI_BASE_URL", &base),
        ("OPENROUTER_API_KEY", "upstream-key"),
        ("COACHD_OPENROUTER_BASE_URL", &base),
        ("COACHD_LLM_MAX_RETRIES", "0"),
        ("COACHD_API_KEYS", KEY),
    ];
    vars.extend_from_slice(extra);
    spawn_app_with(Services::Embedded, &vars).await
}

async fn chat(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The JSON of every `data:` line, and whether the stream ended with `data: [DONE]`.
fn data_lines(body: &str) -> (Vec<Value>, bool) {
    let mut chunks = Vec::new();
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        assert!(!done, "nothing may follow [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(data).unwrap());
        }
    }
    (chunks, done)
}

fn wire(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/wire/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// `ours` has every key of `theirs` (but those OpenAI adds for its own bookkeeping), with
/// values of the same JSON type where OpenAI's is not null.
fn same_shape(ours: &Value, theirs: &Value, ignore: &[&str]) {
    for key in keys(theirs) {
        if ignore.contains(&key.as_str()) {
            continue;
        }
        let (a, b) = (&ours[&key], &theirs[&key]);
        assert!(ours.get(&key).is_some(), "missing {key} in {ours}");
        let kind = |v: &Value| std::mem::discriminant(v);
        if !b.is_null() && !a.is_null() {
            assert_eq!(kind(a), kind(b), "{key}: {a} vs {b}");
        }
    }
}

#[tokio::test]
async fn a_non_streaming_request_gets_a_chat_completion_object() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("Hello! How can I assist you today?"));
    let app = app_with(&fake).await;
    let resp = chat(
        &app,
        json!({"model": "chat", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]}
        ], "temperature": 0.1, "max_completion_tokens": 20, "stop": "\n\n", "user": "u1"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let reference: Value = serde_json::from_str(&wire_nonstream()).unwrap();
    same_shape(&body, &reference, &["service_tier"]);
    same_shape(&body["choices"][0], &reference["choices"][0], &[]);
    same_shape(
        &body["choices"][0]["message"],
        &reference["choices"][0]["message"],
        &["annotations"],
    );
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], "openai/gpt-4o-mini");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello! How can I assist you today?"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let u = &body["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );

    let sent = fake.requests().pop().unwrap().body;
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["temperature"], 0.1);
    assert_eq!(sent["max_tokens"], 20);
    assert_eq!(sent["stop"], json!(["\n\n"]));
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(sent["messages"][1]["content"], "Hello!");
    app.stop().await.unwrap();
}

fn wire_nonstream() -> String {
    // Captured `chat.completion` object (shared/wire/openai_chat_nonstream.json), trimmed to the
    // fields an SDK reads.
    r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion","created":1741569952,
        "model":"gpt-5.4","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!",
        "refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],
        "usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29},"service_tier":"default"}"#
        .to_owned()
}

#[tokio::test]
async fn streamed_chunks_have_openais_exact_shape() {
    let fake = FakeUpstream::start().await.unwrap();
    // The reference stream's pieces, so both streams have the same chunks.
    let mut script = Script::text("");
    script.tokens = [
        "Hello", "!", " How", " can", " I", " assist", " you", " today", "?",
    ]
    .map(String::from)
    .to_vec();
    fake.set_default(script);
    let app = app_with(&fake).await;
    let resp = chat(
        &app,
        json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    let (ours, done) = data_lines(&resp.text().await.unwrap());
    let (theirs, their_done) = data_lines(&wire("openai_stream_basic.sse"));
    assert!(done && their_done);

    // Same sequence: role chunk, content chunks, finish chunk; each chunk with the same keys.
    assert_eq!(
        ours.len(),
        theirs.len(),
        "the reference says the same text in as many pieces"
    );
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(keys(a), keys(b), "{a}");
        same_shape(a, b, &[]);
        assert_eq!(keys(&a["choices"][0]), keys(&b["choices"][0]));
        assert_eq!(keys(&a["choices"][0]["delta"]), keys(&b["choices"][0]["delta"]));
        assert_eq!(a["choices"][0]["finish_reason"], b["choices"][0]["finish_reason"]);
        assert_eq!(a["object"], "chat.completion.chunk");
        assert_eq!(a["id"], ours[0]["id"], "one id for the whole stream");
    }
    assert_eq!(
        ours[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let text = |chunks: &[Value]| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect()
    };
    assert_eq!(text(&ours), text(&theirs));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn include_usage_adds_a_last_usage_chunk_as_openai_does() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("Plan the week on Sunday."));
    let app = app_with(&fake).await;
    let resp = chat(
        &app,
        json!({"model": "chat", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let (ours, done) = data_lines(&resp.text().await.unwrap());
    assert!(done);
    let (theirs, _) = data_lines(&wire("openai_stream_usage.sse"));
    let (our_last, their_last) = (ours.last().unwrap(), theirs.last().unwrap());
    assert_eq!(our_last["choices"], json!([]));
    same_shape(our_last, their_last, &["service_tier", "obfuscation"]);
    let u = &our_last["usage"];
    assert_eq!(u["completion_tokens"], 5);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + 5
    );
    for chunk in &ours[..ours.len() - 1] {
        same_shape(chunk, &theirs[1], &["service_tier", "obfuscation"]);
        assert!(
            chunk["usage"].is_null() && chunk.get("usage").is_some(),
            "{chunk}"
        );
    }
    let finish = &ours[ours.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn provider_models_are_named_provider_slash_model() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("ok"));
    let app = app_with(&fake).await;
    for (model, upstream) in [
        ("openai/gpt-4.1-nano", "gpt-4.1-nano"),
        (
            "openrouter/anthropic/claude-sonnet-4",
            "anthropic/claude-sonnet-4",
        ),
    ] {
        let resp = chat(
            &app,
            json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(resp.status(), 200, "{model}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["model"], model);
        assert_eq!(fake.requests().pop().unwrap().body["model"], upstream);
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn errors_use_openais_error_shape() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(&fake).await;
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (json!({"model": "nope", "messages": user}), 404, "model_not_found"),
        (
            json!({"model": "groq/llama", "messages": user}),
            404,
            "model_not_found",
        ),
        (
            json!({"model": "openai/", "messages": user}),
            404,
            "model_not_found",
        ),
        (json!({"messages": user}), 400, "invalid_field"),
        (json!({"model": "chat"}), 400, "invalid_field"),
        (json!({"model": "chat", "messages": []}), 400, "invalid_field"),
        (json!({"model": "chat", "messages": "hi"}), 400, "invalid_field"),
        (json!({"model": 5, "messages": user}), 400, "invalid_field"),
        (
            json!({"model": "chat", "messages": [{"role": "tool", "content": "x"}]}),
            400,
            "invalid_field",
        ),
        (
            json!({"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            "invalid_field",
        ),
        (
            json!({"model": "chat", "messages": user, "n": 2}),
            400,
            "invalid_field",
        ),
        (
            json!({"model": "chat", "messages": user, "tools": [{"type": "function"}]}),
            400,
            "invalid_field",
        ),
        (
            json!({"model": "chat", "messages": user, "temperature": 9}),
            400,
            "invalid_field",
        ),
        (
            json!({"model": "chat", "messages": user, "response_format": {"type": "xml"}}),
            400,
            "invalid_field",
        ),
    ];
    for (body, status, code) in cases {
        let resp = chat(&app, body.clone()).await;
        assert_eq!(resp.status().as_u16(), status, "{body}");
        assert_eq!(resp.headers()["x-should-retry"], "false");
        let answer: Value = resp.json().await.unwrap();
        let e = &answer["error"];
        assert_eq!(
            keys(e),
            ["code", "message", "param", "type"].map(String::from).into()
        );
        assert_eq!(e["code"], code, "{body}: {answer}");
        assert_eq!(e["type"], "invalid_request_error", "{body}");
    }
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": user}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["type"], "authentication_error");

    // Every model failed before the first token: a 502 the SDKs may retry.
    fake.set_default(Script::status(500));
    let resp = chat(&app, json!({"model": "chat", "stream": true, "messages": user})).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-should-retry"], "true");
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["type"], "server_error");
    assert_eq!(
        fake.request_count("/chat/completions"),
        2,
        "only the last case reached the LLM: the task's model, then its fallback (OpenRouter)"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_failure_mid_stream_is_an_error_chunk_without_done() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(5).with_fault(Fault::MidStreamError { after: 2 }));
    let app = app_with(&fake).await;
    let resp = chat(
        &app,
        json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (chunks, done) = data_lines(&resp.text().await.unwrap());
    assert!(!done, "an error is never followed by [DONE]");
    let last = chunks.last().unwrap();
    assert!(
        last["error"]["message"].is_string() && last["error"]["type"].is_string(),
        "{last}"
    );
    assert_eq!(chunks.len(), 4, "role chunk, two tokens, error: {chunks:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn json_modes_reach_the_upstream() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text(r#"{"ok": true}"#));
    let app = app_with(&fake).await;
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}});
    let resp = chat(
        &app,
        json!({"model": "chat", "messages": [{"role": "user", "content": "ok?"}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let sent = fake.requests().pop().unwrap().body;
    assert_eq!(sent["response_format"]["type"], "json_schema");
    assert_eq!(sent["response_format"]["json_schema"]["name"], "answer");
    assert_eq!(sent["response_format"]["json_schema"]["schema"], schema);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn models_lists_tasks_and_provider_models() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with(&fake).await;
    let get = |path: &str| app.client.get(app.url(path)).bearer_auth(KEY).send();

    let body: Value = get("/v1/models").await.unwrap().json().await.unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "chat",
        "session_summary",
        "intent_classification",
        "openai/gpt-4o-mini",
        "openrouter/anthropic/claude-sonnet-4",
        "offline/coachd-offline-1",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    let first = &body["data"][0];
    assert_eq!(
        keys(first),
        ["created", "id", "object", "owned_by"].map(String::from).into()
    );

    let one = get("/v1/models/openai/gpt-4o-mini").await.unwrap();
    assert_eq!(one.status(), 200);
    let one: Value = one.json().await.unwrap();
    assert_eq!(
        (one["id"].as_str(), one["owned_by"].as_str()),
        (Some("openai/gpt-4o-mini"), Some("openai"))
    );
    let missing = get("/v1/models/nope").await.unwrap();
    assert_eq!(missing.status(), 404);
    let e: Value = missing.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn before_the_first_token_a_timeout_on_every_model_is_a_504_and_other_failures_a_502() {
    let fake = FakeUpstream::start().await.unwrap();
    let app = app_with_extra(&fake, &[("COACHD_LLM_FIRST_TOKEN_TIMEOUT_MS", "300")]).await;
    let user = json!([{"role": "user", "content": "hi"}]);
    // A task (two models: OpenAI, then OpenRouter) and one provider model, streamed and not.
    let cases = [
        ("chat", true, 2),
        ("chat", false, 2),
        ("openai/gpt-4o-mini", true, 1),
        ("openai/gpt-4o-mini", false, 1),
    ];

    fake.set_default(Script::counted(3).with_fault(Fault::Stall { after: 0 }));
    for (model, stream, tried) in cases {
        let before = fake.request_count("/chat/completions");
        let resp = chat(&app, json!({"model": model, "stream": stream, "messages": user})).await;
        assert_eq!(resp.status(), 504, "{model} stream={stream}");
        assert_eq!(resp.headers()["x-should-retry"], "true");
        let answer: Value = resp.json().await.unwrap();
        let e = &answer["error"];
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("server_error"), Some("upstream_timeout")),
            "{model} stream={stream}: {answer}"
        );
        assert_eq!(fake.request_count("/chat/completions") - before, tried);
    }

    fake.set_default(Script::status(500));
    for (model, stream, _) in cases {
        let resp = chat(&app, json!({"model": model, "stream": stream, "messages": user})).await;
        assert_eq!(resp.status(), 502, "{model} stream={stream}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "all_models_failed", "{answer}");
    }
    app.stop().await.unwrap();
}

/// 50 streams at once through coachd (the fake answers each after 1.5 s, so all are open at
/// once); every one answered 200 must end with the whole reply. Returns their statuses.
async fn fifty_streams(fake: &FakeUpstream, app: &TestApp) -> Vec<u16> {
    let reqs = (0..50).map(|i| async move {
        let resp = chat(
            app,
            json!({"model": "openai/gpt-4o-mini", "stream": true,
                   "messages": [{"role": "user", "content": format!("stream {i}")}]}),
        )
        .await;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        if status == 200 {
            let (chunks, done) = data_lines(&body);
            let text: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert!(done, "stream {i} ended with [DONE]");
            assert_eq!(text, "shared connection", "stream {i}");
        }
        status
    });
    let statuses = futures::future::join_all(reqs).await;
    assert_eq!(fake.streams().1, statuses.iter().filter(|s| **s == 200).count());
    statuses
}

#[tokio::test]
async fn streams_share_one_h2c_connection_to_the_upstream() {
    let fake = FakeUpstream::start().await.unwrap();
    // A first token after 1.5 s keeps all 50 streams open at once.
    fake.set_default(Script::text("shared connection").paced(
        std::time::Duration::from_millis(1_500),
        std::time::Duration::from_millis(5),
    ));
    let app = app_with_extra(&fake, &[("COACHD_OPENAI_HTTP_VERSION", "h2")]).await;
    let statuses = fifty_streams(&fake, &app).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.connections(), 1, "50 streams over one HTTP/2 connection");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_connection_opens_another_and_over_http1_each_stream_has_its_own() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("shared connection").paced(
        std::time::Duration::from_millis(1_500),
        std::time::Duration::from_millis(5),
    ));
    let app = app_with_extra(
        &fake,
        &[
            ("COACHD_OPENAI_HTTP_VERSION", "h2"),
            ("COACHD_LLM_STREAMS_PER_CONNECTION", "10"),
        ],
    )
    .await;
    let statuses = fifty_streams(&fake, &app).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.connections(), 5, "10 streams per connection");
    app.stop().await.unwrap();

    // The default on a plain-HTTP base URL is HTTP/1.1: a connection per stream.
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("shared connection").paced(
        std::time::Duration::from_millis(1_500),
        std::time::Duration::from_millis(5),
    ));
    let app = app_with(&fake).await;
    let statuses = fifty_streams(&fake, &app).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(fake.connections(), 50);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn past_the_stream_limit_a_stream_waits_for_a_place_then_gets_504() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("shared connection").paced(
        std::time::Duration::from_millis(1_500),
        std::time::Duration::from_millis(5),
    ));
    let app = app_with_extra(
        &fake,
        &[
            ("COACHD_OPENAI_HTTP_VERSION", "h2"),
            ("COACHD_LLM_MAX_STREAMS", "40"),
            ("COACHD_LLM_CONNECT_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    let statuses = fifty_streams(&fake, &app).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let timed_out = statuses.iter().filter(|s| **s == 504).count();
    assert_eq!((ok, timed_out), (40, 10), "{statuses:?}");
    assert_eq!(
        fake.streams().0,
        40,
        "the ten past the limit never reached the upstream"
    );
    app.stop().await.unwrap();
}
