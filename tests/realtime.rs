//! Realtime sessions over all three transports, against the real Redis and PostgreSQL and the
//! fake upstream: multi-turn sessions, context carried between turns, memory recalled in a later
//! session, replay after a dropped connection, cancel mid-stream, slow and malformed WebSocket
//! clients, upstream failures before and after the first token, notes, limits and stats. Every
//! event received is validated against `proto/server.schema.json`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use common::realtime::{SseReader, WsRead, tokens_text, ws_connect, ws_next, ws_send, ws_until};
use common::{Services, TestApp, spawn_app_with};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// An app whose default provider is OpenAI at the fake, with fast retries.
async fn app_with_fake(services: Services, extra: &[(&str, &str)]) -> (TestApp, FakeUpstream) {
    let fake = FakeUpstream::start().await.unwrap();
    let base = fake.base_url();
    let mut vars = vec![
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "test-key"),
        ("OPENAI_MODEL", "gpt-test"),
        ("COACHD_OPENAI_BASE_URL", base.as_str()),
        ("COACHD_LLM_MAX_RETRIES", "0"),
        ("COACHD_LLM_RETRY_BASE_MS", "1"),
    ];
    vars.extend_from_slice(extra);
    let app = spawn_app_with(services, &vars).await;
    (app, fake)
}

fn user_messages(body: &Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn http_turns_carry_context_and_are_written_behind_to_redis() {
    let (app, fake) = app_with_fake(Services::Real, &[]).await;
    fake.set_default(Script::echo());
    let s = app.create_session("42", "sales", "http").await;
    assert_eq!(s.body["persona"]["domain"], "sales");
    assert!(
        s.body["endpoints"]["websocket"]
            .as_str()
            .unwrap()
            .contains("token=")
    );

    for (i, text) in [
        "We sell solar panels",
        "Our close rate is 10%",
        "What should I fix first?",
    ]
    .iter()
    .enumerate()
    {
        let (status, body) = app.turn(&s, text).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["turn_number"], i + 1);
        assert_eq!(body["reply_text"], format!("echo: {text}"));
        assert_eq!(body["finish_reason"], "stop");
        assert_eq!(body["interrupted"], false);
        assert!(body["actions"].is_array());
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    }
    // The third prompt carries the first two turns, and the persona.
    let third = &fake.requests()[2].body;
    assert_eq!(
        user_messages(third),
        [
            "We sell solar panels",
            "Our close rate is 10%",
            "What should I fix first?"
        ]
    );
    assert!(
        third["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains("sales coach")
    );

    // Written behind to Redis under the reference key patterns, with their TTLs.
    app.wait_written(3).await;
    let redis = redis_client().await;
    let key = format!("{}session:{}:context", app.redis_prefix, s.id);
    let items: Vec<String> = redis_cmd(&redis, &["LRANGE", &key, "0", "-1"]).await;
    assert_eq!(items.len(), 6, "three user and three assistant messages");
    let ttl: i64 = redis_ttl(&redis, &key).await;
    assert!(ttl > 3500 && ttl <= 3600, "SESSION_CONTEXT_TTL applies: {ttl}");
    let last: Vec<String> = redis_cmd(
        &redis,
        &["GET", &format!("{}user:42:last_session", app.redis_prefix)],
    )
    .await;
    assert_eq!(last, vec![s.id.clone()]);

    // Each turn's prompt assembly and first token are counted in the stats' latency figures.
    let stats: Value = app.get("/realtime/stats").await.json().await.unwrap();
    for figure in ["prompt", "first_token"] {
        let h = &stats["sessions"][figure];
        assert_eq!(h["count"], 3, "{figure}: {h}");
        let (p50, max) = (h["p50_le_ms"].as_f64(), h["max_ms"].as_f64());
        assert!(p50.is_some() && max.is_some_and(|m| m >= 0.0), "{figure}: {h}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_memory_is_recalled_in_a_later_session() {
    let (app, fake) = app_with_fake(Services::Real, &[("COACHD_PROMPT_MIN_SIMILARITY", "0.05")]).await;
    fake.set_default(Script::text("Noted."));
    let first = app.create_session("u-mem", "marketing", "http").await;
    app.turn(&first, "My bakery in Lisbon sells sourdough bread to cafes")
        .await;
    let resp = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/end", first.id)))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    app.wait_written(1).await;

    let second = app.create_session("u-mem", "marketing", "http").await;
    app.turn(&second, "How should I price sourdough bread for cafes?")
        .await;
    let prompt = fake.requests().last().unwrap().body.clone();
    let prompt = &prompt;
    let system = prompt["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.contains("bakery in Lisbon"),
        "the earlier session is remembered: {system}"
    );
    // And the new session starts from the user–coach context of the last one.
    assert!(
        user_messages(prompt)
            .iter()
            .any(|m| m.contains("bakery in Lisbon"))
    );

    // Another user's session sees none of it.
    let other = app.create_session("someone-else", "marketing", "http").await;
    app.turn(&other, "How should I price sourdough bread for cafes?")
        .await;
    let prompt = fake.requests().last().unwrap().body.to_string();
    assert!(!prompt.contains("Lisbon"), "memories are per user: {prompt}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn sse_turns_stream_tokens_with_seq_ids() {
    let (app, fake) = app_with_fake(Services::Real, &[]).await;
    fake.set_default(Script::text("One two three four five").paced(Duration::ZERO, Duration::from_millis(5)));
    let s = app.create_session("7", "1", "sse").await;
    let resp = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
        .header("accept", "text/event-stream")
        .json(&json!({"text": "count"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut sse = SseReader::new(resp);
    let events = sse.until("turn_end").await;
    assert_eq!(events[0].event, "turn_start");
    let data: Vec<Value> = events.iter().map(|e| e.data.clone()).collect();
    assert_eq!(tokens_text(&data), "One two three four five");
    let ids: Vec<u64> = events.iter().map(|e| e.id.parse().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive seqs: {ids:?}"
    );
    assert_eq!(
        events.last().unwrap().data["reply_text"],
        "One two three four five"
    );
    assert!(
        sse.next().await.is_none(),
        "the turn's stream ends after its turn_end"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn sse_follow_resumes_after_a_dropped_connection_without_gaps() {
    let (app, fake) = app_with_fake(Services::Embedded, &[]).await;
    fake.set_default(Script::counted(40).paced(Duration::ZERO, Duration::from_millis(10)));
    let s = app.create_session("u", "c", "sse").await;
    let events_url = app.url(&format!("/realtime/sessions/{}/events?token={}", s.id, s.token));

    let mut first = SseReader::new(app.client.get(&events_url).send().await.unwrap());
    let hello = first.next().await.unwrap();
    assert_eq!(hello.event, "session");
    app.client
        .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
        .header("accept", "text/event-stream")
        .json(&json!({"text": "go"}))
        .send()
        .await
        .unwrap();
    let mut seen = vec![hello];
    while seen.len() < 8 {
        seen.push(first.next().await.unwrap());
    }
    let last_id = seen.last().unwrap().id.clone();
    drop(first); // the client goes away mid-reply

    // The reply keeps streaming into the log meanwhile.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let resumed = app
        .client
        .get(&events_url)
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    let mut resumed = SseReader::new(resumed);
    let rest = resumed.until("turn_end").await;
    let ids: Vec<u64> = seen.iter().chain(&rest).map(|e| e.id.parse().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap and no duplicate across the reconnect: {ids:?}"
    );
    let all: Vec<Value> = seen.iter().chain(&rest).map(|e| e.data.clone()).collect();
    assert_eq!(tokens_text(&all).split_whitespace().count(), 40);

    // A missing or wrong token is refused.
    let no_token = app
        .client
        .get(app.url(&format!("/realtime/sessions/{}/events", s.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let wrong = app
        .client
        .get(app.url(&format!("/realtime/sessions/{}/events?token={}x", s.id, s.token)))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn websocket_session_of_several_turns_with_ping_and_resume() {
    let (app, fake) = app_with_fake(Services::Real, &[]).await;
    fake.set_default(Script::echo());
    let s = app.create_session("ws-user", "leadership", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    let WsRead::Event(hello) = ws_next(&mut ws).await else {
        panic!("no session event")
    };
    assert_eq!(
        (hello["type"].as_str(), hello["status"].as_str()),
        (Some("session"), Some("active"))
    );

    ws_send(
        &mut ws,
        json!({"type": "user_message", "text": "first", "client_id": "m1"}),
    )
    .await;
    let turn1 = ws_until(&mut ws, "turn_end").await;
    assert_eq!(turn1[0]["client_id"], "m1");
    assert_eq!(turn1.last().unwrap()["reply_text"], "echo: first");
    ws_send(&mut ws, json!({"type": "user_message", "text": "second"})).await;
    let turn2 = ws_until(&mut ws, "turn_end").await;
    assert_eq!(turn2.last().unwrap()["turn_number"], 2);
    assert_eq!(user_messages(&fake.requests()[1].body), ["first", "second"]);

    ws_send(&mut ws, json!({"type": "ping", "nonce": "n1"})).await;
    let WsRead::Event(pong) = ws_next(&mut ws).await else {
        panic!()
    };
    assert_eq!(
        (pong["type"].as_str(), pong["nonce"].as_str()),
        (Some("pong"), Some("n1"))
    );

    // Reconnect and resume from the end of turn 1: turn 2 is replayed exactly.
    let resume_from = turn1.last().unwrap()["seq"].as_u64().unwrap();
    drop(ws);
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    ws_send(&mut ws, json!({"type": "resume", "after_seq": resume_from})).await;
    let replayed = ws_until(&mut ws, "turn_end").await;
    assert_eq!(replayed, turn2);

    // Too old a seq gets a resync.
    ws_send(&mut ws, json!({"type": "resume", "after_seq": 0})).await;
    let WsRead::Event(first) = ws_next(&mut ws).await else {
        panic!()
    };
    assert_eq!(
        first["type"], "session",
        "seq 1 is still in the log, so it replays"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_resync_replaces_replay_for_a_client_too_far_behind() {
    let (app, fake) = app_with_fake(Services::Embedded, &[("COACHD_SESSION_LOG_EVENTS", "16")]).await;
    fake.set_default(Script::counted(30));
    let s = app.create_session("u", "c", "websocket").await;
    app.turn(&s, "long one").await;
    let mut ws = ws_connect(&app, &s, "&after_seq=1").await;
    ws_next(&mut ws).await;
    let WsRead::Event(resync) = ws_next(&mut ws).await else {
        panic!()
    };
    assert_eq!(resync["type"], "resync");
    assert_eq!(resync["state"]["turn_count"], 1);
    assert!(resync["state"]["oldest_seq"].as_u64().unwrap() > 2);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_mid_stream_stops_the_upstream_and_stores_an_interrupted_turn() {
    let (app, fake) = app_with_fake(Services::Real, &[]).await;
    fake.set_default(Script::counted(1000).paced(Duration::ZERO, Duration::from_millis(20)));
    let s = app.create_session("c-user", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    ws_send(&mut ws, json!({"type": "user_message", "text": "talk a lot"})).await;
    let mut tokens = 0;
    while tokens < 3 {
        if let WsRead::Event(e) = ws_next(&mut ws).await {
            tokens += usize::from(e["type"] == "token");
        }
    }
    ws_send(&mut ws, json!({"type": "cancel"})).await;
    let end = ws_until(&mut ws, "turn_end").await.pop().unwrap();
    assert_eq!(
        (end["finish_reason"].as_str(), end["interrupted"].as_bool()),
        (Some("cancelled"), Some(true))
    );
    assert!(!end["reply_text"].as_str().unwrap().is_empty());
    assert_eq!(
        fake.wait_disconnects(1, Duration::from_secs(5)).await,
        1,
        "the upstream request was aborted"
    );

    // The HTTP cancel route does the same.
    app.client
        .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
        .header("accept", "text/event-stream")
        .json(&json!({"text": "again"}))
        .send()
        .await
        .unwrap();
    ws_until(&mut ws, "token").await;
    let resp: Value = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/cancel", s.id)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["cancelled"], true);
    assert_eq!(
        ws_until(&mut ws, "turn_end").await.pop().unwrap()["finish_reason"],
        "cancelled"
    );
    assert_eq!(fake.wait_disconnects(2, Duration::from_secs(5)).await, 2);

    app.wait_written(2).await;
    let redis = redis_client().await;
    let items: Vec<String> = redis_cmd(
        &redis,
        &[
            "LRANGE",
            &format!("{}session:{}:context", app.redis_prefix, s.id),
            "0",
            "-1",
        ],
    )
    .await;
    let stored: Value = serde_json::from_str(&items[1]).unwrap();
    assert_eq!(stored["role"], "assistant");
    assert_eq!(
        stored["metadata"]["interrupted"], true,
        "stored as interrupted: {stored}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_disconnect_does_not_stop_the_generation() {
    let (app, fake) = app_with_fake(Services::Embedded, &[]).await;
    fake.set_default(Script::counted(30).paced(Duration::ZERO, Duration::from_millis(10)));
    let s = app.create_session("u", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    ws_send(&mut ws, json!({"type": "user_message", "text": "go"})).await;
    ws_until(&mut ws, "token").await;
    drop(ws);
    app.wait_written(1).await;
    let info: Value = app
        .get(&format!("/realtime/sessions/{}", s.id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(info["turn_count"], 1);
    assert_eq!(fake.streams(), (1, 1), "the upstream stream ran to its end");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_websocket_client_is_closed_with_4001_and_the_reply_still_completes() {
    let (app, fake) = app_with_fake(
        Services::Embedded,
        &[
            ("COACHD_CLIENT_QUEUE_EVENTS", "8"),
            ("COACHD_SEND_TIMEOUT_MS", "3000"),
        ],
    )
    .await;
    // 3 000 tokens of 4 KiB: far more than socket buffers hold, so a client that stops reading
    // backs the server up into its bounded queue.
    let mut script = Script::counted(3000);
    script.tokens = (0..3000).map(|i| format!("{i:>4096}")).collect();
    fake.set_default(script);
    let s = app.create_session("u", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    ws_send(&mut ws, json!({"type": "user_message", "text": "flood"})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // not reading
    let mut code = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .unwrap()
    {
        match msg {
            Ok(Message::Close(frame)) => {
                code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(code, Some(4001), "slow client close code");
    let started = std::time::Instant::now();
    app.wait_written_for(1, Duration::from_secs(120)).await;
    eprintln!("turn finished {:?} after the close", started.elapsed());
    let stats: Value = app.get("/realtime/stats").await.json().await.unwrap();
    assert!(
        stats["sessions"]["slow_clients"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert_eq!(
        stats["sessions"]["turns_completed"], 1,
        "the generation finished without the client: {stats}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_websocket_frames_get_errors_or_close_codes() {
    let (app, _fake) = app_with_fake(
        Services::Embedded,
        &[
            ("COACHD_WS_MAX_MESSAGE_BYTES", "1024"),
            ("COACHD_WS_MAX_BAD_FRAMES", "2"),
        ],
    )
    .await;
    let s = app.create_session("u", "c", "websocket").await;

    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    for bad in ["not json", r#"{"type":"shout"}"#, r#"{"type":"user_message"}"#] {
        ws.send(Message::text(bad)).await.unwrap();
        if bad == r#"{"type":"user_message"}"# {
            assert!(
                matches!(ws_next(&mut ws).await, WsRead::Close(Some(1008))),
                "third bad frame in a row closes 1008"
            );
        } else {
            let WsRead::Event(e) = ws_next(&mut ws).await else {
                panic!()
            };
            assert_eq!(
                (e["type"].as_str(), e["code"].as_str()),
                (Some("error"), Some("invalid_frame"))
            );
        }
    }

    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    ws_send(&mut ws, json!({"type": "user_message", "text": " "})).await;
    let WsRead::Event(e) = ws_next(&mut ws).await else {
        panic!()
    };
    assert_eq!(e["code"], "empty_text");
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert!(matches!(ws_next(&mut ws).await, WsRead::Close(Some(1003))));

    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    ws.send(Message::text("x".repeat(4096))).await.unwrap();
    assert!(
        matches!(ws_next(&mut ws).await, WsRead::Close(Some(1009))),
        "oversized frame closes 1009"
    );

    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let invalid_utf8 = Frame::message(vec![0xFFu8, 0xFE, 0xFD], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(invalid_utf8)).await.unwrap();
    assert!(
        matches!(ws_next(&mut ws).await, WsRead::Close(Some(1007))),
        "invalid UTF-8 closes 1007"
    );

    // The session survived all of it.
    assert_eq!(
        app.get(&format!("/realtime/sessions/{}", s.id)).await.status(),
        200
    );
    let bad_token =
        tokio_tungstenite::connect_async(app.ws_url(&format!("/realtime/sessions/{}/ws?token=nope", s.id)))
            .await;
    assert!(bad_token.is_err(), "no upgrade without a valid token");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn upstream_failure_before_the_first_token_is_a_clean_error() {
    let (app, fake) = app_with_fake(Services::Embedded, &[]).await;
    fake.set_default(Script::status(500));
    let s = app.create_session("u", "c", "http").await;
    let (status, body) = app.turn(&s, "hello").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "all_models_failed");

    // Over SSE: an error event for the turn, then its turn_end.
    let resp = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
        .header("accept", "text/event-stream")
        .json(&json!({"text": "again"}))
        .send()
        .await
        .unwrap();
    let events = SseReader::new(resp).until("turn_end").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["turn_start", "error", "turn_end"]);
    assert_eq!(events[1].data["retryable"], true);
    assert_eq!(events[2].data["finish_reason"], "error");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn upstream_failure_after_the_first_token_ends_the_turn_with_an_error() {
    let (app, fake) = app_with_fake(Services::Embedded, &[]).await;
    fake.set_default(Script::counted(10).with_fault(Fault::MidStreamError { after: 3 }));
    let s = app.create_session("u", "c", "http").await;
    let resp = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
        .header("accept", "text/event-stream")
        .json(&json!({"text": "go"}))
        .send()
        .await
        .unwrap();
    let events = SseReader::new(resp).until("turn_end").await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        ["turn_start", "token", "token", "token", "error", "turn_end"]
    );
    assert_eq!(events[4].data["code"], "upstream_stream_error");
    let end = &events[5].data;
    assert_eq!(
        (end["reply_text"].as_str(), end["interrupted"].as_bool()),
        (Some("t0 t1 t2"), Some(true))
    );
    assert_eq!(
        fake.request_count("/chat/completions"),
        1,
        "no fallback after the first token"
    );

    let (status, body) = app.turn(&s, "and over http").await;
    assert_eq!(status, 200, "partial text is returned: {body}");
    assert_eq!(body["error"]["code"], "upstream_stream_error");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn ending_with_notes_returns_and_stores_them() {
    let (app, fake) = app_with_fake(Services::Real, &[]).await;
    fake.set_default(Script::text("Call three leads this week."));
    let s = app.create_session("notes-user", "sales", "http").await;
    app.turn(&s, "I need more customers").await;
    let notes = json!({
        "summary": "The client wants more customers.",
        "key_points": ["pipeline is thin"],
        "action_items": [{"task": "Call three leads", "owner": "client", "due": "this week", "priority": "high"}]
    });
    fake.enqueue("*", Script::text(&notes.to_string()));
    let resp = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/end", s.id)))
        .json(&json!({"generate_notes": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "ended");
    assert_eq!(body["notes"], notes);
    let summary_request = fake.requests().last().unwrap().body.clone();
    assert_eq!(
        summary_request["response_format"]["type"], "json_schema",
        "notes use generate_json"
    );
    assert!(
        summary_request.to_string().contains("I need more customers"),
        "the transcript is sent"
    );

    let pool = sqlx::PgPool::connect(app.database_url.as_ref().unwrap())
        .await
        .unwrap();
    let (summary, items): (String, Value) =
        sqlx::query_as("select summary, action_items from session_notes where session_id = $1")
            .bind(&s.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(summary, "The client wants more customers.");
    assert_eq!(items[0]["task"], "Call three leads");

    // The session is over: turns get 410, status says ended.
    assert_eq!(app.turn(&s, "more?").await.0, 410);
    let status: Value = app
        .get(&format!("/realtime/sessions/{}", s.id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "ended");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn notes_from_a_raw_transcript() {
    let (app, fake) = app_with_fake(Services::Real, &[]).await;
    fake.set_default(Script::text(
        r#"{"summary":"s","key_points":["k"],"action_items":[]}"#,
    ));
    let resp = app
        .client
        .post(app.url("/ai/coach/notes"))
        .json(&json!({"user_id": 1, "coach_id": 1, "transcript": "User: How can I improve sales?\nCoach: Let me help..."}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["user_id"].as_str(), body["summary"].as_str()),
        (Some("1"), Some("s"))
    );
    assert!(body["id"].is_string());

    for bad in [
        json!({"user_id": 1, "coach_id": 1, "transcript": ""}),
        json!({"user_id": 1, "coach_id": 1}),
        json!({"user_id": [1], "coach_id": 1, "transcript": "x"}),
    ] {
        let resp = app
            .client
            .post(app.url("/ai/coach/notes"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
        let e: Value = resp.json().await.unwrap();
        assert!(e["error"]["code"].is_string());
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn queueing_interrupting_and_limits() {
    let (app, fake) = app_with_fake(
        Services::Embedded,
        &[("COACHD_MAX_QUEUED_TURNS", "1"), ("COACHD_MAX_TEXT_CHARS", "50")],
    )
    .await;
    fake.set_default(Script::counted(200).paced(Duration::ZERO, Duration::from_millis(10)));
    let s = app.create_session("u", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    ws_send(&mut ws, json!({"type": "user_message", "text": "one"})).await;
    ws_until(&mut ws, "token").await;
    ws_send(&mut ws, json!({"type": "user_message", "text": "two (queued)"})).await;
    ws_send(
        &mut ws,
        json!({"type": "user_message", "text": "three (refused)"}),
    )
    .await;
    let refused = loop {
        let WsRead::Event(e) = ws_next(&mut ws).await else {
            panic!()
        };
        if e["type"] == "error" {
            break e;
        }
    };
    assert_eq!(refused["code"], "turn_queue_full");
    ws_send(
        &mut ws,
        json!({"type": "user_message", "text": "four", "mode": "interrupt"}),
    )
    .await;
    let end = ws_until(&mut ws, "turn_end").await.pop().unwrap();
    assert_eq!(
        (end["turn_number"].as_u64(), end["finish_reason"].as_str()),
        (Some(1), Some("interrupted"))
    );

    let (status, body) = app.turn(&s, &"x".repeat(51)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("text_too_long"))
    );
    let (status, _) = app
        .turn(
            &common::realtime::Session {
                id: "sess_nope".into(),
                token: String::new(),
                body: Value::Null,
            },
            "hi",
        )
        .await;
    assert_eq!(status, 404);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn session_cap_idle_expiry_and_bad_creation_input() {
    let (app, _fake) = app_with_fake(
        Services::Embedded,
        &[("COACHD_MAX_SESSIONS", "1"), ("COACHD_SESSION_IDLE_SECS", "1")],
    )
    .await;
    let s = app.create_session("u", "c", "http").await;
    let resp = app
        .client
        .post(app.url("/realtime/sessions"))
        .json(&json!({"user_id": "u2", "coach_id": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "the cap holds");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status: Value = app
        .get(&format!("/realtime/sessions/{}", s.id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (status["status"].as_str(), status["ended_by"].as_str()),
        (Some("ended"), Some("expired"))
    );
    let resp = app
        .client
        .post(app.url("/realtime/sessions"))
        .json(&json!({"user_id": "u2", "coach_id": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "room again after the expiry");

    for bad in [
        json!({"coach_id": "c"}),
        json!({"user_id": "", "coach_id": "c"}),
        json!({"user_id": "u", "coach_id": "c", "transport": "carrier-pigeon"}),
        json!({"user_id": {"a": 1}, "coach_id": "c"}),
    ] {
        let resp = app
            .client
            .post(app.url("/realtime/sessions"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad}");
    }
    let stats: Value = app.get("/realtime/stats").await.json().await.unwrap();
    assert_eq!(stats["sessions"]["expired"], 1);
    assert_eq!(stats["sessions"]["rejected_at_capacity"], 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_drains_the_write_behind_queue() {
    let (app, fake) = app_with_fake(Services::Real, &[("COACHD_WRITE_BEHIND_WORKERS", "1")]).await;
    fake.set_default(Script::text("ok"));
    let mut sessions = Vec::new();
    for i in 0..20 {
        let s = app.create_session(&format!("drain-{i}"), "c", "http").await;
        app.turn(&s, "remember this").await;
        sessions.push(s);
    }
    let prefix = app.redis_prefix.clone();
    app.stop().await.unwrap();
    let redis = redis_client().await;
    for s in &sessions {
        let n: Vec<String> = redis_cmd(
            &redis,
            &["LRANGE", &format!("{prefix}session:{}:context", s.id), "0", "-1"],
        )
        .await;
        assert_eq!(n.len(), 2, "every finished turn was stored before exit");
    }
}

async fn redis_client() -> fred::clients::Client {
    use fred::prelude::*;
    let client = Builder::from_config(Config::from_url(&common::redis_url()).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

async fn redis_cmd(client: &fred::clients::Client, args: &[&str]) -> Vec<String> {
    use fred::prelude::*;
    let cmd = fred::types::CustomCommand::new_static(leak(args[0]), None, false);
    let value: fred::types::Value = client
        .custom(cmd, args[1..].iter().map(|a| a.to_string()).collect::<Vec<_>>())
        .await
        .unwrap();
    match value {
        fred::types::Value::Array(items) => items.into_iter().filter_map(|v| v.into_string()).collect(),
        fred::types::Value::Null => Vec::new(),
        other => other.into_string().into_iter().collect(),
    }
}

async fn redis_ttl(client: &fred::clients::Client, key: &str) -> i64 {
    use fred::prelude::*;
    client.ttl(key).await.unwrap()
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

#[tokio::test]
async fn a_websocket_client_that_never_answers_pings_is_closed_with_4002() {
    let (app, _fake) = app_with_fake(
        Services::Embedded,
        &[("COACHD_WS_PING_SECS", "1"), ("COACHD_WS_PONG_TIMEOUT_SECS", "1")],
    )
    .await;
    let s = app.create_session("u", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    // Not reading means tungstenite never sends the automatic pong.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut pings = 0;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert!(pings >= 1, "the server pinged");
    // The client sees 4002, or (when tungstenite's automatic pong hits the closed socket first) an
    // error; either way the server closed it, for the reason its counter names.
    assert!(
        matches!(code, Some(4002) | None),
        "closed by the server: {code:?}"
    );
    let stats = app.state.sessions.stats();
    assert_eq!(stats.no_pong_closes.get(), 1, "closed for the missing pong");
    assert_eq!(stats.slow_clients.get(), 0);
    // The session itself lives on.
    assert_eq!(
        app.get(&format!("/realtime/sessions/{}", s.id)).await.status(),
        200
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_sse_stream_carries_heartbeat_comments() {
    let (app, _fake) = app_with_fake(Services::Embedded, &[("COACHD_SSE_HEARTBEAT_SECS", "1")]).await;
    let s = app.create_session("u", "c", "sse").await;
    let resp = app
        .client
        .get(app.url(&format!("/realtime/sessions/{}/events?token={}", s.id, s.token)))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen.contains(": keepalive") {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("a heartbeat within 5 s")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        seen.starts_with("id: 1\nevent: session\n"),
        "the log replays first: {seen}"
    );
    app.stop().await.unwrap();
}

/// A redis-server of the test's own, so it can be stopped and started again.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services makes sure)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnRedis {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn write_behind_retries_while_redis_is_down_and_stores_the_turn_once_it_is_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("coachd-redis-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut redis = OwnRedis::start(port, &dir);
    let url = format!("redis://127.0.0.1:{port}");
    let (app, fake) = app_with_fake(
        Services::Real,
        &[
            ("REDIS_URL", url.as_str()),
            ("COACHD_WRITE_BEHIND_MAX_ATTEMPTS", "60"),
            ("COACHD_PROMPT_FETCH_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    fake.set_default(Script::text("Still here."));
    let s = app.create_session("outage", "c", "http").await;

    redis.kill();
    // The reply does not depend on Redis: the prompt goes out without the cache's context.
    let (status, body) = app.turn(&s, "Are you there?").await;
    assert_eq!(
        (status, body["reply_text"].as_str()),
        (200, Some("Still here.")),
        "{body}"
    );
    let wb = app.state.write_behind.stats();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    // Each attempt fails after the Redis command timeout (2 s); wait for the first retry.
    for _ in 0..200 {
        if wb.retries.load(relaxed) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(wb.retries.load(relaxed) >= 1, "failed writes are retried");
    assert_eq!(
        wb.written.load(relaxed),
        0,
        "nothing is written while Redis is down"
    );

    let redis = OwnRedis::start(redis.port, &redis.dir.clone());
    app.wait_written_for(1, Duration::from_secs(30)).await;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    use std::io::{Read, Write};
    let key = format!("{}session:{}:context", app.redis_prefix, s.id);
    write!(conn, "*2\r\n$4\r\nLLEN\r\n${}\r\n{}\r\n", key.len(), key).unwrap();
    let mut reply = [0u8; 16];
    let n = conn.read(&mut reply).unwrap();
    assert_eq!(
        &reply[..n],
        b":2\r\n",
        "both messages of the turn were stored after the outage"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_the_configured_limit() {
    let (app, _fake) = app_with_fake(Services::Embedded, &[("COACHD_MAX_BODY_BYTES", "2048")]).await;
    let s = app.create_session("u", "c", "http").await;
    let (status, body) = app.turn(&s, &"x".repeat(4096)).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("2048"),
        "names the real limit: {body}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_waits_for_websocket_connections_and_closes_them_with_1001_after_their_last_event() {
    let (app, fake) = app_with_fake(Services::Embedded, &[]).await;
    // A long reply, so the shutdown lands mid-turn.
    fake.set_default(Script::counted(500).paced(Duration::ZERO, Duration::from_millis(10)));
    let s = app.create_session("u", "c", "websocket").await;
    let tracked_before = app.state.tasks.len();
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    assert_eq!(
        app.state.tasks.len(),
        tracked_before + 1,
        "the connection task is tracked by the shutdown tracker"
    );
    ws_send(&mut ws, json!({"type": "user_message", "text": "talk"})).await;
    ws_until(&mut ws, "token").await;

    let read = async {
        let mut events = Vec::new();
        loop {
            match ws_next(&mut ws).await {
                WsRead::Event(v) => events.push(v),
                WsRead::Close(code) => return (events, code),
            }
        }
    };
    let (stopped, (events, code)) = tokio::join!(app.stop(), read);
    stopped.unwrap();
    assert_eq!(code, Some(1001), "closed as going away");
    let tail: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["type"] != "token")
        .map(|e| {
            let detail = e["finish_reason"]
                .as_str()
                .or(e["code"].as_str())
                .or(e["status"].as_str());
            (e["type"].as_str().unwrap(), detail.unwrap_or_default())
        })
        .collect();
    assert_eq!(
        tail,
        [
            ("turn_end", "server_shutdown"),
            ("error", "server_shutdown"),
            ("session", "ended")
        ],
        "the session's last events come before the close"
    );
}

#[tokio::test]
async fn a_slow_sse_client_gets_a_schema_valid_slow_client_event_before_its_stream_closes() {
    let (app, fake) = app_with_fake(Services::Embedded, &[("COACHD_CLIENT_QUEUE_EVENTS", "8")]).await;
    // 3 000 tokens of 4 KiB: far more than socket buffers hold, so a client that stops reading
    // backs the server up into its bounded queue.
    let mut script = Script::counted(3000);
    script.tokens = (0..3000).map(|i| format!("{i:>4096}")).collect();
    fake.set_default(script);
    let s = app.create_session("u", "c", "sse").await;
    let events_url = app.url(&format!("/realtime/sessions/{}/events?token={}", s.id, s.token));
    let mut follow = SseReader::new(app.client.get(&events_url).send().await.unwrap());
    assert_eq!(follow.next().await.unwrap().event, "session");
    // The turn's own stream is dropped at once; the follower stops reading.
    drop(
        app.client
            .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
            .header("accept", "text/event-stream")
            .json(&json!({"text": "flood"}))
            .send()
            .await
            .unwrap(),
    );
    let status_url = format!("/realtime/sessions/{}", s.id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info: Value = app.get(&status_url).await.json().await.unwrap();
        if info["streaming_turn"].is_number() && info["connections"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the follower was never detached: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every event SseReader returns is validated against proto/server.schema.json.
    let mut last = None;
    while let Some(event) = follow.next().await {
        last = Some(event);
    }
    let last = last.expect("events before the close");
    assert_eq!(last.event, "error", "the stream ends with its reason: {last:?}");
    assert_eq!(last.data["code"], "slow_client");
    assert_eq!(last.data["session_id"], s.id.as_str());
    assert!(last.data["seq"].as_u64().unwrap() > 0);
    assert_eq!(last.data["retryable"], true);
    assert!(app.state.sessions.stats().slow_clients.get() >= 1);
    app.wait_written_for(1, Duration::from_secs(120)).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn end_body_and_after_seq_rejections_answer_in_the_json_error_shape() {
    let (app, _fake) = app_with_fake(Services::Embedded, &[]).await;
    let s = app.create_session("u", "c", "sse").await;
    let end_url = app.url(&format!("/realtime/sessions/{}/end", s.id));
    let json_error = |status: u16, body: &str, code: &str, why: &str| {
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{why}: not JSON: {body}"));
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some(code)),
            "{why}: {body}"
        );
        assert!(v["error"]["message"].is_string(), "{why}: {body}");
    };

    let resp = app
        .client
        .post(&end_url)
        .json(&json!({"generate_notes": "yes"}))
        .send()
        .await
        .unwrap();
    json_error(
        resp.status().as_u16(),
        &resp.text().await.unwrap(),
        "invalid_field",
        "mistyped end body",
    );
    let resp = app
        .client
        .post(&end_url)
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    json_error(
        resp.status().as_u16(),
        &resp.text().await.unwrap(),
        "invalid_json",
        "malformed end body",
    );

    for path in ["events", "ws"] {
        let url = app.url(&format!(
            "/realtime/sessions/{}/{path}?token={}&after_seq=abc",
            s.id, s.token
        ));
        let resp = app.client.get(url).send().await.unwrap();
        json_error(
            resp.status().as_u16(),
            &resp.text().await.unwrap(),
            "invalid_query",
            path,
        );
    }

    // Without a body, end still ends.
    let resp = app.client.post(&end_url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    app.stop().await.unwrap();
}
