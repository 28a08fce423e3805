//! What happens to a turn: cancel mid-stream, a client disconnect, upstream failures before and
//! after the first token, and notes.

use std::time::Duration;

use coachd::fake_upstream::{Fault, Script};
use serde_json::{Value, json};

use crate::common::Services;
use crate::common::realtime::{SseReader, WsRead, ws_connect, ws_next, ws_send, ws_until};
use crate::{app_with_fake, redis_client, redis_cmd};

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
