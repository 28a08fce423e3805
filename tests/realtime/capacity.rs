//! Connection capacity (`COACHD_MAX_CONNECTIONS`, `crate::listener`): past it a new connection is
//! answered 503 with `Retry-After` (a WebSocket upgrade: close 1013) and closed, while the
//! connections already open, a live WebSocket among them, carry on; a closed one frees its place.

use std::time::Duration;

use coachd::fake_upstream::Script;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::app_with_fake;
use crate::common::Services;
use crate::common::realtime::{tokens_text, ws_connect, ws_send, ws_until};

#[tokio::test]
async fn connections_past_capacity_are_refused_while_open_ones_carry_on() {
    let (app, fake) = app_with_fake(
        Services::Embedded,
        &[
            ("COACHD_MAX_CONNECTIONS", "2"),
            ("COACHD_CAPACITY_RETRY_AFTER_SECS", "7"),
        ],
    )
    .await;
    fake.set_default(Script::text("still streaming").paced(Duration::ZERO, Duration::from_millis(5)));
    // Connection one: the test client's pooled keep-alive connection. Connection two: a WebSocket.
    let s = app.create_session("u", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_until(&mut ws, "session").await;

    // A third connection is answered and closed.
    let refused = reqwest::Client::new()
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "7");
    assert_eq!(refused.headers()["connection"], "close");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "over_capacity", "{body}");

    // A WebSocket upgrade past capacity is closed with 1013, before any event.
    let url = app.ws_url(&format!("/realtime/sessions/{}/ws?token={}", s.id, s.token));
    let (mut late, resp) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
    assert_eq!(resp.status(), 101);
    match tokio::time::timeout(Duration::from_secs(10), late.next())
        .await
        .expect("a frame")
    {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1013, "{frame:?}"),
        other => panic!("expected close 1013, got {other:?}"),
    }

    // The open WebSocket still streams a whole turn.
    ws_send(&mut ws, json!({"type": "user_message", "text": "go on"})).await;
    let events = ws_until(&mut ws, "turn_end").await;
    assert_eq!(tokens_text(&events), "still streaming");
    // So does the pooled HTTP connection.
    assert_eq!(app.get("/health/live").await.status(), 200);

    // Closing the WebSocket frees its place for a new connection.
    drop(ws);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = reqwest::Client::new()
            .get(app.url("/health/live"))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no place freed: still {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await.unwrap();
}
