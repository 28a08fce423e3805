//! Hostile clients (issue 15, part 4; RELIABILITY.md "4. Hostile clients"): each gets a bounded,
//! documented answer and leaves nothing behind. Slowloris heads and bodies, oversized heads, ten
//! thousand connections opened and dropped, a flood of session creations from one user, and a
//! session token replayed after its session ended. (A WebSocket that never reads is
//! `websocket::a_slow_websocket_client_is_closed_with_4001_and_the_reply_still_completes`; a JWT
//! with `alg: none` or another algorithm is `tests/auth.rs`.)

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app_with_fake;
use crate::common::{Services, TestApp};

async fn raw(app: &TestApp) -> TcpStream {
    TcpStream::connect(("127.0.0.1", app.port)).await.unwrap()
}

/// Everything the server writes until it closes the connection; fails past `limit`.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => {}
        // A reset after the answer is a close too.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("read failed: {e}"),
        Err(_) => panic!(
            "the server kept the connection open past {limit:?}; it wrote {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a raw HTTP/1.1 answer.
fn json_body(answer: &str) -> Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"))
}

#[tokio::test]
async fn slowloris_heads_and_bodies_and_oversized_heads_get_bounded_answers() {
    let (app, _fake) = app_with_fake(
        Services::Embedded,
        &[
            ("COACHD_HTTP_HEADER_TIMEOUT_SECS", "1"),
            ("COACHD_HTTP_BODY_TIMEOUT_SECS", "1"),
            ("COACHD_HTTP_MAX_HEADER_BYTES", "16384"),
            ("COACHD_HTTP_MAX_HEADERS", "50"),
        ],
    )
    .await;
    let bound = Duration::from_secs(10);

    // A connection that sends nothing, and one that sends half a head and stalls: closed.
    let mut silent = raw(&app).await;
    let mut half = raw(&app).await;
    half.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    assert_eq!(until_closed(&mut silent, bound).await, "");
    let answer = until_closed(&mut half, bound).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    // A body that stops: the request fails with a JSON error and the connection closes.
    let mut slow_body = raw(&app).await;
    slow_body
        .write_all(
            b"POST /realtime/sessions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 1000\r\n\r\n{\"user_id\": ",
        )
        .await
        .unwrap();
    let answer = until_closed(&mut slow_body, bound).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(json_body(&answer)["error"]["code"], "invalid_body", "{answer}");

    // A head past the size limit, and one of too many fields: 431 and closed.
    let mut big = raw(&app).await;
    let head = format!(
        "GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    // The server may close before it has read everything sent: a write error is an answer too.
    let _ = big.write_all(head.as_bytes()).await;
    let answer = until_closed(&mut big, bound).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let mut many = raw(&app).await;
    let fields: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    many.write_all(format!("GET /health/live HTTP/1.1\r\nhost: x\r\n{fields}\r\n").as_bytes())
        .await
        .unwrap();
    let answer = until_closed(&mut many, bound).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A well-behaved client is served throughout.
    assert_eq!(app.get("/health/live").await.status(), 200);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn ten_thousand_connections_opened_and_dropped_leave_no_place_taken() {
    const CAPACITY: usize = 64;
    let capacity = CAPACITY.to_string();
    let (app, _fake) = app_with_fake(Services::Embedded, &[("COACHD_MAX_CONNECTIONS", &capacity)]).await;
    // Twenty waves of 500: each opened at once (most past capacity: refused or closed
    // unanswered), half with the start of a request, then all dropped.
    for _ in 0..20 {
        let mut wave = Vec::with_capacity(500);
        for i in 0..500 {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", app.port)).await else {
                continue;
            };
            if i % 2 == 0 {
                let _ = s.write_all(b"GET /health/live HTTP/1.1\r\nho").await;
            }
            wave.push(s);
        }
        drop(wave);
    }
    // Every place comes back: CAPACITY − 4 clients at once (room for the test client's pooled
    // connection and stragglers still closing) are each served, none refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut clients = Vec::new();
        for _ in 0..CAPACITY - 4 {
            let mut s = raw(&app).await;
            s.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            clients.push(s);
        }
        let mut statuses = Vec::new();
        for mut s in clients {
            let answer = until_closed(&mut s, Duration::from_secs(10)).await;
            statuses.push(answer.get(9..12).unwrap_or("none").to_owned());
        }
        if statuses.iter().all(|s| s == "200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "places still taken after the flood: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_flood_of_session_creations_from_one_user_is_rate_limited() {
    let (app, _fake) = app_with_fake(
        Services::Real,
        &[("RATE_LIMIT_REQUESTS", "5"), ("RATE_LIMIT_TTL", "60")],
    )
    .await;
    let create = |user: &'static str| {
        app.client
            .post(app.url("/realtime/sessions"))
            .json(&json!({"user_id": user, "coach_id": "c", "transport": "websocket"}))
            .send()
    };
    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..50 {
        let resp = create("flooder").await.unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            let retry_after = resp.headers()["retry-after"].to_str().unwrap().to_owned();
            let body: Value = resp.json().await.unwrap();
            refusal = Some((retry_after, body));
        }
    }
    assert_eq!(&statuses[..5], &[201; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let (retry_after, body) = refusal.unwrap();
    assert!(retry_after.parse::<u64>().unwrap() >= 1, "{retry_after}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // Only the admitted ones hold a session, and another user is not affected.
    assert_eq!(app.state.sessions.stats().sessions_created.get(), 5);
    assert_eq!(create("someone-else").await.unwrap().status(), 201);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_token_replayed_after_the_session_ended_gets_410_everywhere() {
    let (app, _fake) = app_with_fake(Services::Real, &[]).await;
    let s = app.create_session("u-replay", "c", "websocket").await;
    let ended = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/end", s.id)))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(ended.status(), 200);

    let check = |what: &str, status: u16, body: &Value| {
        assert_eq!(status, 410, "{what}: {body}");
        assert_eq!(body["error"]["code"], "session_ended", "{what}: {body}");
    };
    let sse = app
        .client
        .get(app.url(&format!("/realtime/sessions/{}/events?token={}", s.id, s.token)))
        .send()
        .await
        .unwrap();
    check("sse", sse.status().as_u16(), &sse.json().await.unwrap());
    let turn = app
        .client
        .post(app.url(&format!("/realtime/sessions/{}/turn", s.id)))
        .header("x-session-token", &s.token)
        .json(&json!({"text": "again"}))
        .send()
        .await
        .unwrap();
    check("turn", turn.status().as_u16(), &turn.json().await.unwrap());
    let url = app.ws_url(&format!("/realtime/sessions/{}/ws?token={}", s.id, s.token));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            check("websocket", resp.status().as_u16(), &body);
        }
        other => panic!("a WebSocket attach to an ended session was not refused: {other:?}"),
    }
    app.stop().await.unwrap();
}
