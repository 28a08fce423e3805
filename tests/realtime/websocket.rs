//! WebSocket sessions end to end: several turns with ping and resume, resync, the close codes
//! a real client sees (slow client, no pong, malformed frames), and shutdown.

use std::time::Duration;

use coachd::fake_upstream::Script;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::common::Services;
use crate::common::realtime::{WsRead, ws_connect, ws_next, ws_send, ws_until};
use crate::{app_with_fake, user_messages, wait_for};

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
async fn a_frame_larger_than_the_read_buffer_arrives_whole() {
    // The read buffer is small (COACHD_WS_READ_BUFFER_BYTES, 1 KiB by default) because every
    // idle connection holds one; a larger frame must still arrive in one piece.
    let (app, fake) = app_with_fake(Services::Embedded, &[("COACHD_WS_READ_BUFFER_BYTES", "256")]).await;
    fake.set_default(Script::echo());
    let s = app.create_session("u", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    let text: String = (0..3_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    ws_send(&mut ws, json!({"type": "user_message", "text": text})).await;
    let turn = ws_until(&mut ws, "turn_end").await;
    assert_eq!(turn[0]["user_text"], text.as_str());
    assert_eq!(turn.last().unwrap()["reply_text"], format!("echo: {text}"));
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
async fn a_slow_websocket_client_is_closed_with_4001_and_the_reply_still_completes() {
    let (app, fake) = app_with_fake(
        Services::Embedded,
        &[
            ("COACHD_CLIENT_QUEUE_EVENTS", "8"),
            ("COACHD_SEND_TIMEOUT_MS", "300"),
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
    // Not reading until the server gave up on this client (the drive loop's unit tests cover
    // when it does; this checks the close reaches a real client).
    let stats = app.state.sessions.stats().clone();
    wait_for(|| stats.slow_clients.get() >= 1, "the client detached as slow").await;
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
async fn a_websocket_client_that_never_answers_pings_is_closed_with_4002() {
    let (app, _fake) = app_with_fake(
        Services::Embedded,
        &[("COACHD_WS_PING_SECS", "1"), ("COACHD_WS_PONG_TIMEOUT_SECS", "1")],
    )
    .await;
    let s = app.create_session("u", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    // Not reading means tungstenite never sends the automatic pong (the drive loop's unit tests
    // cover the timing; this checks the close reaches a real client).
    let stats = app.state.sessions.stats().clone();
    wait_for(
        || stats.no_pong_closes.get() >= 1,
        "the connection closed for the missing pong",
    )
    .await;
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
async fn an_operators_disconnect_closes_with_4004_and_a_resume_loses_nothing() {
    let (app, fake) = app_with_fake(Services::Real, &[]).await;
    fake.set_default(Script::counted(30).paced(Duration::ZERO, Duration::from_millis(10)));
    let s = app.create_session("u", "c", "websocket").await;
    let mut ws = ws_connect(&app, &s, "").await;
    ws_next(&mut ws).await;
    ws_send(&mut ws, json!({"type": "user_message", "text": "go"})).await;
    let mut seen = Vec::new();
    while seen.iter().filter(|e: &&Value| e["type"] == "token").count() < 3 {
        let WsRead::Event(ev) = ws_next(&mut ws).await else {
            panic!("closed early")
        };
        seen.push(ev);
    }

    let resp = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/disconnect", s.id)))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["disconnected"], 1);
    let code = loop {
        match ws_next(&mut ws).await {
            WsRead::Event(ev) => seen.push(ev),
            WsRead::Close(code) => break code,
        }
    };
    assert_eq!(code, Some(4004));

    let last = seen.last().unwrap()["seq"].as_u64().unwrap();
    let mut ws = ws_connect(&app, &s, &format!("&after_seq={last}")).await;
    ws_next(&mut ws).await;
    let rest = ws_until(&mut ws, "turn_end").await;
    let all: Vec<Value> = seen.into_iter().chain(rest).collect();
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap, no duplicate: {seqs:?}"
    );
    let text = crate::common::realtime::tokens_text(&all);
    assert_eq!(text, all.last().unwrap()["reply_text"].as_str().unwrap());
    assert_eq!(text.split_whitespace().count(), 30);
    app.stop().await.unwrap();
}
