//! Health routes against the real Redis and PostgreSQL, in embedded mode, and with Redis down.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Services, spawn_app, spawn_app_with};
use serde_json::Value;

async fn json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

fn assert_component(v: &Value, status: &str, backend: &str) {
    assert_eq!(v["status"], status, "component: {v}");
    assert_eq!(v["backend"], backend, "component: {v}");
    assert!(
        v["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "latency_ms missing: {v}"
    );
}

#[tokio::test]
async fn every_health_route_answers_with_both_services_up() {
    let app = spawn_app(&[]).await;

    let (status, body) = json(app.get("/health").await).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("healthy")));

    let (status, body) = json(app.get("/health/live").await).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("alive")));

    let (status, body) = json(app.get("/health/ready").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_component(&body["checks"]["db"], "up", "postgresql");
    assert_component(&body["checks"]["redis"], "up", "redis");

    let (status, body) = json(app.get("/health/db").await).await;
    assert_eq!(status, 200);
    assert_component(&body, "up", "postgresql");

    let (status, body) = json(app.get("/health/redis").await).await;
    assert_eq!(status, 200);
    assert_component(&body, "up", "redis");

    let (status, body) = json(app.get("/health/llm").await).await;
    assert_eq!(status, 200);
    assert_component(&body, "embedded", "offline");

    let (status, body) = json(app.get("/health/all").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "healthy");
    assert_component(&body["components"]["db"], "up", "postgresql");
    assert_component(&body["components"]["redis"], "up", "redis");
    assert_component(&body["components"]["llm"], "embedded", "offline");

    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn embedded_mode_needs_no_external_service() {
    let app = spawn_app_with(Services::Embedded, &[]).await;

    let (status, body) = json(app.get("/health/all").await).await;
    assert_eq!(status, 200, "{body}");
    assert_component(&body["components"]["db"], "embedded", "embedded");
    assert_component(&body["components"]["redis"], "embedded", "embedded");

    let (status, body) = json(app.get("/health/ready").await).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));

    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn ready_answers_503_when_redis_is_unreachable() {
    // Port 1 on loopback: nothing listens there, so every connect is refused.
    let app = spawn_app(&[
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("COACHD_HEALTH_TIMEOUT_MS", "500"),
    ])
    .await;

    let (status, body) = json(app.get("/health/ready").await).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["redis"]["status"], "down");
    assert_eq!(body["checks"]["db"]["status"], "up");

    let (status, body) = json(app.get("/health/redis").await).await;
    assert_eq!(status, 503);
    assert!(body["detail"].is_string(), "a down component says why: {body}");

    let (status, body) = json(app.get("/health/all").await).await;
    assert_eq!((status, body["status"].as_str()), (503, Some("unhealthy")));

    // Liveness never touches a dependency.
    let (status, _) = json(app.get("/health/live").await).await;
    assert_eq!(status, 200);

    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = spawn_app_with(Services::Embedded, &[]).await;

    let resp = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123");

    let resp = app.get("/health").await;
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        uuid::Uuid::parse_str(&generated).is_ok(),
        "generated id is a UUID: {generated}"
    );

    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = spawn_app_with(Services::Embedded, &[]).await;

    let (status, body) = json(app.get("/nope").await).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");

    let resp = app.client.post(app.url("/health")).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");

    app.stop().await.expect("clean stop");
}

#[tokio::test]
async fn ready_answers_503_through_the_drain_delay_then_the_listener_closes() {
    let app = spawn_app_with(Services::Embedded, &[("COACHD_SHUTDOWN_DRAIN_DELAY_SECS", "2")]).await;
    let (status, _) = json(app.get("/health/ready").await).await;
    assert_eq!(status, 200, "ready before the stop");

    // A stop signal: readiness goes 503 at once, so a load balancer stops routing here, while
    // the server keeps serving for the drain delay. Each answer below is a real HTTP response:
    // a refused connection would fail the test.
    let started = std::time::Instant::now();
    app.shutdown.cancel();
    let resp = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .expect("the listener is still open while draining");
    let (status, body) = json(resp).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("shutting_down")),
        "{body}"
    );
    let resp = app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .expect("other routes are still served while draining");
    assert_eq!(resp.status(), 200);

    // After the delay the listener closes and the server stops.
    app.task.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "the server served for the whole drain delay"
    );
    let refused = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/health/live", app.port))
        .send()
        .await;
    assert!(refused.is_err(), "no longer accepting once stopped");
}
