//! One id rule on every route that takes a user or coach id (defect 7a of issue 10): ids are
//! 1–128 letters, digits, `-`, `_`, `.` or `@`, given as a JSON string or integer. Before the fix
//! the realtime and coach routes took any printable id, `:` included, so user `a:coach:b` with
//! coach `c` and user `a` with coach `b:coach:c` shared the context key `user:…:coach:…:context`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Services, spawn_app_with};
use serde_json::{Value, json};

async fn post(app: &common::TestApp, path: &str, body: Value) -> (u16, Value) {
    let resp = app.client.post(app.url(path)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn ids_with_a_colon_are_refused_by_every_route_that_takes_one() {
    let app = spawn_app_with(Services::Embedded, &[("LLM_PROVIDER", "offline")]).await;

    let colliding = [
        json!({"user_id": "a:coach:b", "coach_id": "c"}),
        json!({"user_id": "a", "coach_id": "b:coach:c"}),
    ];
    for ids in &colliding {
        let mut create = ids.clone();
        create["transport"] = json!("http");
        let mut respond = ids.clone();
        respond["text"] = json!("hello");
        let mut notes = ids.clone();
        notes["transcript"] = json!("coach: hi\nuser: hello");
        for (path, body) in [
            ("/realtime/sessions", create),
            ("/ai/coach/respond", respond),
            ("/ai/coach/notes", notes),
        ] {
            let (status, answer) = post(&app, path, body.clone()).await;
            assert_eq!(status, 400, "{path} {body}: {answer}");
            assert_eq!(answer["error"]["code"], "invalid_field", "{path}: {answer}");
            let message = answer["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("user_id") || message.contains("coach_id"),
                "the message names the field: {message}"
            );
        }
    }

    // The memory routes refuse the same ids, in their path.
    for path in ["/ai/coach/memory/a:coach:b/c", "/ai/coach/memory/a/b:coach:c"] {
        let resp = app.get(path).await;
        assert_eq!(resp.status(), 400, "{path}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "invalid_path", "{path}");
    }

    app.stop().await.unwrap();
}

#[tokio::test]
async fn ids_that_follow_the_rule_are_accepted_as_strings_or_integers() {
    let app = spawn_app_with(Services::Embedded, &[("LLM_PROVIDER", "offline")]).await;

    for ids in [
        json!({"user_id": "user.name@example-1_x", "coach_id": "finance"}),
        json!({"user_id": 42, "coach_id": 7}),
        json!({"user_id": "7d1f3b0e-4f5a-4c3e-9a55-2d9e2c7e1a11", "coach_id": "sales"}),
    ] {
        let (status, created) = post(&app, "/realtime/sessions", ids.clone()).await;
        assert_eq!(status, 201, "{ids}: {created}");
        let user = match &ids["user_id"] {
            Value::Number(n) => n.to_string(),
            v => v.as_str().unwrap().to_owned(),
        };
        assert_eq!(created["user_id"], user.as_str());
    }

    for bad in [
        json!({"user_id": "", "coach_id": "c"}),
        json!({"user_id": "has space", "coach_id": "c"}),
        json!({"user_id": "u", "coach_id": "ü"}),
        json!({"user_id": "u", "coach_id": "x".repeat(129)}),
        json!({"user_id": 1.5, "coach_id": "c"}),
        json!({"user_id": "u", "coach_id": null}),
    ] {
        let (status, answer) = post(&app, "/realtime/sessions", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_field", "{bad}: {answer}");
    }

    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_llm_routes_take_the_same_user_ids() {
    let key = "ids-test-key";
    let app = spawn_app_with(
        Services::Embedded,
        &[("LLM_PROVIDER", "offline"), ("COACHD_API_KEYS", key)],
    )
    .await;
    let complete = |user_id: Value| {
        app.client
            .post(app.url("/api/v1/llm/complete"))
            .header("x-api-key", key)
            .json(&json!({"task": "chat", "prompt": "hi", "user_id": user_id}))
            .send()
    };

    let resp = complete(json!("a:coach:b")).await.unwrap();
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "invalid_field", "{answer}");

    let resp = complete(json!(42)).await.unwrap();
    assert_eq!(resp.status(), 200, "an integer id is accepted here too");

    app.stop().await.unwrap();
}
