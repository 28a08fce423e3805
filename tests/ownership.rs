//! Who may touch what, on every coach, memory and realtime route: with API keys configured a
//! request needs one; a JWT user reaches only their own sessions, memories and notes (user A
//! cannot read, stream, end or delete user B's data); and POST /ai/coach/respond runs through the
//! realtime pipeline, as JSON or SSE.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use coachd::fake_upstream::{FakeUpstream, Script};
use common::realtime::SseReader;
use common::{Services, TestApp, spawn_app_with};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

const KEY: &str = "backend-key-0123456789";
const SECRET: &str = "jwt-secret-for-tests-0123456789";

fn jwt(sub: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": sub, "aud": "authenticated", "exp": now + 600, "nbf": now - 10});
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn app() -> (TestApp, FakeUpstream) {
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::echo());
    let base = fake.base_url();
    let app = spawn_app_with(
        Services::Real,
        &[
            ("XENIOS_BACKEND_API_KEY", KEY),
            ("SUPABASE_JWT_SECRET", SECRET),
            ("LLM_PROVIDER", "openai"),
            ("OPENAI_API_KEY", "k"),
            ("COACHD_OPENAI_BASE_URL", &base),
        ],
    )
    .await;
    (app, fake)
}

/// Sends a request as `who`: None = no credentials, Some("") = the API key only, Some(user) = the
/// API key plus that user's JWT.
async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    who: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = app.client.request(method.parse().unwrap(), app.url(path));
    if let Some(user) = who {
        req = req.header("x-api-key", KEY);
        if !user.is_empty() {
            req = req.bearer_auth(jwt(user));
        }
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn user_a_cannot_read_stream_end_or_delete_user_b_data() {
    let (app, _fake) = app().await;

    // B, acting for themselves, builds up data: a session with a turn, memories, notes.
    let (status, created) = call(
        &app,
        "POST",
        "/realtime/sessions",
        Some("user-b"),
        Some(json!({"user_id": "user-b", "coach_id": "sales"})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let sid = created["session_id"].as_str().unwrap().to_owned();
    let b_token = created["token"].as_str().unwrap().to_owned();
    let (status, _) = call(
        &app,
        "POST",
        &format!("/realtime/sessions/{sid}/turn"),
        Some("user-b"),
        Some(json!({"text": "my secret plan"})),
    )
    .await;
    assert_eq!(status, 200);
    app.wait_written(1).await;

    let a = Some("user-a");
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        (
            "POST",
            "/realtime/sessions".into(),
            Some(json!({"user_id": "user-b", "coach_id": "sales"})),
        ),
        ("GET", format!("/realtime/sessions/{sid}"), None),
        (
            "POST",
            format!("/realtime/sessions/{sid}/turn"),
            Some(json!({"text": "hi"})),
        ),
        ("POST", format!("/realtime/sessions/{sid}/cancel"), None),
        (
            "POST",
            format!("/realtime/sessions/{sid}/end"),
            Some(json!({"generate_notes": false})),
        ),
        ("GET", "/ai/coach/memory/user-b/sales".into(), None),
        ("DELETE", "/ai/coach/memory/user-b/sales".into(), None),
        (
            "DELETE",
            "/ai/coach/memory/user-b/sales/7d1f3b0e-4f5a-4c3e-9a55-2d9e2c7e1a11".into(),
            None,
        ),
        ("DELETE", "/ai/coach/memory/user-b".into(), None),
        (
            "POST",
            "/ai/coach/notes".into(),
            Some(json!({"user_id": "user-b", "coach_id": "sales", "transcript": "x"})),
        ),
        (
            "POST",
            "/ai/coach/respond".into(),
            Some(json!({"user_id": "user-b", "coach_id": "sales", "text": "hi"})),
        ),
        (
            "POST",
            "/ai/coach/respond".into(),
            Some(json!({"user_id": "user-a", "coach_id": "sales", "text": "hi", "session_id": sid})),
        ),
        ("GET", "/realtime/stats".into(), None),
    ];
    for (method, path, body) in &routes {
        let (status, resp) = call(&app, method, path, a, body.clone()).await;
        assert_eq!(status, 403, "{method} {path} as user A: {resp}");
        assert_eq!(resp["error"]["code"], "forbidden", "{method} {path}");
        let (status, _) = call(&app, method, path, None, body.clone()).await;
        assert_eq!(status, 401, "{method} {path} without credentials");
    }

    // A's own session token does not open B's session streams.
    let (_, own) = call(
        &app,
        "POST",
        "/realtime/sessions",
        a,
        Some(json!({"user_id": "user-a", "coach_id": "sales"})),
    )
    .await;
    let a_token = own["token"].as_str().unwrap();
    let resp = app
        .client
        .get(app.url(&format!("/realtime/sessions/{sid}/events?token={a_token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "SSE with another session's token");
    let ws =
        tokio_tungstenite::connect_async(app.ws_url(&format!("/realtime/sessions/{sid}/ws?token={a_token}")))
            .await;
    assert!(ws.is_err(), "WebSocket with another session's token");

    // Nothing of B's was touched: the memories and the session are still there.
    let (status, mem) = call(&app, "GET", "/ai/coach/memory/user-b/sales", Some("user-b"), None).await;
    assert_eq!(status, 200);
    assert_eq!(mem["total"], 1, "{mem}");
    let (status, info) = call(
        &app,
        "GET",
        &format!("/realtime/sessions/{sid}"),
        Some("user-b"),
        None,
    )
    .await;
    assert_eq!((status, info["status"].as_str()), (200, Some("active")));
    // And B's own token still streams B's session.
    let resp = app
        .client
        .get(app.url(&format!("/realtime/sessions/{sid}/events?token={b_token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The backend's API key alone acts for anyone, and B may end their own session.
    let (status, _) = call(&app, "GET", &format!("/realtime/sessions/{sid}"), Some(""), None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&app, "GET", "/realtime/stats", Some(""), None).await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &app,
        "POST",
        &format!("/realtime/sessions/{sid}/end"),
        Some("user-b"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn respond_runs_a_turn_through_the_realtime_pipeline() {
    let (app, fake) = app().await;
    let me = Some("user-r");

    let (status, body) = call(
        &app,
        "POST",
        "/ai/coach/respond",
        me,
        Some(json!({"user_id": "user-r", "coach_id": "finance", "text": "How do I price?"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reply_text"], "echo: How do I price?");
    assert_eq!(body["turn_number"], 1);
    let system = fake.requests()[0].body["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(system.contains("finance coach"), "the persona is used: {system}");
    let one_turn = body["session_id"].as_str().unwrap().to_owned();
    app.wait_written(1).await;

    // A later respond without a session picks up the user–coach context written behind.
    let (status, _) = call(
        &app,
        "POST",
        "/ai/coach/respond",
        me,
        Some(json!({"user_id": "user-r", "coach_id": "finance", "text": "And margins?"})),
    )
    .await;
    assert_eq!(status, 200);
    let prompt = fake.requests().last().unwrap().body.to_string();
    assert!(
        prompt.contains("How do I price?"),
        "context carried over: {prompt}"
    );
    let (_, ended) = call(&app, "GET", &format!("/realtime/sessions/{one_turn}"), me, None).await;
    assert_eq!(ended["status"], "ended", "a one-turn session ends after its turn");

    // Inside a live session, as SSE.
    let (_, created) = call(
        &app,
        "POST",
        "/realtime/sessions",
        me,
        Some(json!({"user_id": "user-r", "coach_id": "finance"})),
    )
    .await;
    let sid = created["session_id"].as_str().unwrap();
    let resp = app
        .client
        .post(app.url("/ai/coach/respond"))
        .header("x-api-key", KEY)
        .bearer_auth(jwt("user-r"))
        .header("accept", "text/event-stream")
        .json(&json!({"user_id": "user-r", "coach_id": "finance", "text": "Stream it", "session_id": sid}))
        .send()
        .await
        .unwrap();
    let events = SseReader::new(resp).until("turn_end").await;
    assert_eq!(events.last().unwrap().data["reply_text"], "echo: Stream it");
    assert_eq!(events.last().unwrap().data["session_id"], sid);

    for bad in [
        json!({"user_id": "user-r", "coach_id": "finance"}),
        json!({"user_id": "user-r", "coach_id": "finance", "text": ""}),
        json!({"user_id": "user-r", "coach_id": "finance", "text": 5}),
        json!({"user_id": "user-r", "coach_id": "finance", "text": "x".repeat(9000)}),
        json!({"user_id": "user-r", "coach_id": "sales", "text": "hi", "session_id": sid}),
    ] {
        let (status, resp) = call(&app, "POST", "/ai/coach/respond", me, Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {resp}");
        assert!(resp["error"]["code"].is_string());
    }
    let (status, _) = call(
        &app,
        "POST",
        "/ai/coach/respond",
        me,
        Some(json!({"user_id": "user-r", "coach_id": "finance", "text": "hi", "session_id": "sess_unknown"})),
    )
    .await;
    assert_eq!(status, 404);
    app.stop().await.unwrap();
}
