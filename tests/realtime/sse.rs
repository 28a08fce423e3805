//! Session SSE: a turn streamed with seq ids, the follow stream resumed after a dropped
//! connection, heartbeat comments, and the slow-client event.

use std::time::Duration;

use coachd::fake_upstream::Script;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::app_with_fake;
use crate::common::Services;
use crate::common::realtime::{SseReader, tokens_text};

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
async fn an_operators_disconnect_ends_the_stream_with_an_event_and_the_turn_request_stays() {
    let (app, fake) = app_with_fake(Services::Embedded, &[]).await;
    fake.set_default(Script::counted(30).paced(Duration::ZERO, Duration::from_millis(10)));
    let s = app.create_session("u", "c", "sse").await;
    let events_url = app.url(&format!("/realtime/sessions/{}/events?token={}", s.id, s.token));
    let mut follow = SseReader::new(app.client.get(&events_url).send().await.unwrap());
    assert_eq!(follow.next().await.unwrap().event, "session");
    let turn = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
        .json(&json!({"text": "go"}))
        .send();
    let watch = async {
        let mut seen = Vec::new();
        while seen.len() < 4 {
            seen.push(follow.next().await.unwrap());
        }
        let resp = app
            .client
            .post(app.url(&format!("/realtime/sessions/{}/disconnect", s.id)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["disconnected"], 1, "the follow stream; not the turn request");

        // What was queued still arrives, then the reason, then the end of the stream.
        let mut close = None;
        while let Some(ev) = follow.next().await {
            if ev.event == "error" {
                close = Some(ev);
                break;
            }
            seen.push(ev);
        }
        let close = close.expect("a disconnected event before the stream ends");
        assert_eq!(
            (close.data["code"].as_str(), close.data["retryable"].as_bool()),
            (Some("disconnected"), Some(true))
        );
        assert!(follow.next().await.is_none(), "then the stream ends");
        seen
    };
    let (turn, seen) = tokio::join!(turn, watch);

    // The HTTP turn was not cut, and a resume from the last seq seen completes the reply.
    let reply: Value = turn.unwrap().json().await.unwrap();
    assert_eq!(
        reply["reply_text"].as_str().unwrap().split_whitespace().count(),
        30
    );
    let last = seen.last().unwrap().id.clone();
    let mut resumed = SseReader::new(
        app.client
            .get(format!("{events_url}&after_seq={last}"))
            .send()
            .await
            .unwrap(),
    );
    let rest = resumed.until("turn_end").await;
    let all: Vec<Value> = seen.iter().chain(&rest).map(|e| e.data.clone()).collect();
    assert_eq!(tokens_text(&all), reply["reply_text"].as_str().unwrap());
    app.stop().await.unwrap();
}
