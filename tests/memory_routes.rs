//! GET and DELETE /ai/coach/memory/...: listing, searching and clearing through the real app,
//! input checks, and the rate limit shared by two coachd instances on one Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use coachd::memory::NewMemory;
use common::{Services, TestApp, spawn_app, spawn_app_with};
use fred::interfaces::KeysInterface;
use serde_json::{Value, json};

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

async fn seed(app: &TestApp, user: &str, coach: &str, texts: &[&str]) -> Vec<uuid::Uuid> {
    let batch = texts
        .iter()
        .map(|t| NewMemory {
            dedup_key: None,
            text: (*t).to_owned(),
            user_id: user.to_owned(),
            coach_id: coach.to_owned(),
            memory_type: "insight".to_owned(),
            metadata: json!({"source": "test"}),
        })
        .collect();
    let outcomes = app.state.memory.store_batch(batch).await.unwrap();
    outcomes.into_iter().map(|o| o.id).collect()
}

async fn lists_searches_and_clears(app: TestApp) {
    seed(&app, "1", "2", &["Wants a better sales funnel"]).await;
    seed(&app, "1", "2", &["Sleeps badly before board meetings"]).await;
    let ids = seed(&app, "1", "2", &["Sales team misses targets"]).await;
    seed(&app, "1", "3", &["Another coach's memory"]).await;

    let (status, body) = json_of(app.get("/ai/coach/memory/1/2").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["user_id"].as_str(), body["coach_id"].as_str()),
        (Some("1"), Some("2"))
    );
    assert_eq!(body["total"], 3);
    let memories = body["memories"].as_array().unwrap();
    assert_eq!(memories.len(), 3);
    let first = &memories[0];
    assert_eq!(first["id"], ids[0].to_string(), "newest first");
    assert_eq!(first["text"], "Sales team misses targets");
    assert_eq!(first["memory_type"], "insight");
    assert_eq!(first["metadata"], json!({"source": "test"}));
    assert!(first["created_at"].as_str().unwrap().contains('T'));
    assert!(first.get("similarity").is_none(), "no similarity without a query");

    let (_, page) = json_of(app.get("/ai/coach/memory/1/2?limit=1&offset=1").await).await;
    assert_eq!(page["total"], 3);
    assert_eq!(page["memories"][0]["text"], "Sleeps badly before board meetings");

    let (status, found) = json_of(
        app.get("/ai/coach/memory/1/2?query=sales%20targets&limit=2")
            .await,
    )
    .await;
    assert_eq!(status, 200, "{found}");
    let found = found["memories"].as_array().unwrap().clone();
    assert_eq!(found.len(), 2);
    assert_eq!(found[0]["text"], "Sales team misses targets");
    let (s0, s1) = (
        found[0]["similarity"].as_f64().unwrap(),
        found[1]["similarity"].as_f64().unwrap(),
    );
    assert!(s0 >= s1 && s0 > 0.2, "{found:?}");

    let (_, strict) = json_of(
        app.get("/ai/coach/memory/1/2?query=sales%20targets&min_similarity=0.5")
            .await,
    )
    .await;
    assert!(
        strict["memories"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["similarity"].as_f64().unwrap() >= 0.5)
    );

    let resp = app
        .client
        .delete(app.url("/ai/coach/memory/1/2"))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"user_id": "1", "coach_id": "2", "deleted": 3}));
    let (_, body) = json_of(app.get("/ai/coach/memory/1/2").await).await;
    assert_eq!(
        (body["total"].as_u64(), body["memories"].as_array().map(Vec::len)),
        (Some(0), Some(0))
    );
    let (_, body) = json_of(app.get("/ai/coach/memory/1/3").await).await;
    assert_eq!(body["total"], 1, "the other coach's memories stay");

    app.stop().await.unwrap();
}

#[tokio::test]
async fn memories_are_listed_searched_and_cleared_with_postgres() {
    lists_searches_and_clears(spawn_app(&[]).await).await;
}

#[tokio::test]
async fn memories_are_listed_searched_and_cleared_in_process() {
    lists_searches_and_clears(spawn_app_with(Services::Embedded, &[]).await).await;
}

#[tokio::test]
async fn one_memory_or_a_whole_user_can_be_erased() {
    let app = spawn_app(&[]).await;
    let ids = seed(&app, "u-1", "c-1", &["one", "two"]).await;
    seed(&app, "u-1", "c-2", &["three"]).await;
    seed(&app, "u-2", "c-1", &["someone else"]).await;

    let one = format!("/ai/coach/memory/u-1/c-1/{}", ids[0]);
    let (status, body) = json_of(app.client.delete(app.url(&one)).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 1);
    let (status, body) = json_of(app.client.delete(app.url(&one)).send().await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let wrong_pair = format!("/ai/coach/memory/u-1/c-2/{}", ids[1]);
    let (status, _) = json_of(app.client.delete(app.url(&wrong_pair)).send().await.unwrap()).await;
    assert_eq!(status, 404, "a memory is only reachable through its own pair");

    let resp = app
        .client
        .delete(app.url("/ai/coach/memory/u-1"))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"user_id": "u-1", "deleted": 2}));
    let (_, body) = json_of(app.get("/ai/coach/memory/u-2/c-1").await).await;
    assert_eq!(body["total"], 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_400_with_a_json_error() {
    let app = spawn_app_with(
        Services::Embedded,
        &[
            ("COACHD_MEMORY_LIST_MAX", "50"),
            ("COACHD_MEMORY_MAX_TEXT_BYTES", "64"),
        ],
    )
    .await;
    let long_query = format!("/ai/coach/memory/1/2?query={}", "x".repeat(65));
    let long_id = format!("/ai/coach/memory/{}/2", "9".repeat(129));
    let cases: Vec<(&str, &str, &str)> = vec![
        ("GET", "/ai/coach/memory/1/2?limit=0", "invalid_query"),
        ("GET", "/ai/coach/memory/1/2?limit=51", "invalid_query"),
        ("GET", "/ai/coach/memory/1/2?limit=abc", "invalid_query"),
        ("GET", "/ai/coach/memory/1/2?offset=-1", "invalid_query"),
        ("GET", "/ai/coach/memory/1/2?limit=5&colour=red", "invalid_query"),
        ("GET", "/ai/coach/memory/1/2?query=", "invalid_input"),
        ("GET", "/ai/coach/memory/1/2?query=%20%20", "invalid_input"),
        ("GET", &long_query, "invalid_input"),
        ("GET", "/ai/coach/memory/1/2?query=x&offset=3", "invalid_query"),
        ("GET", "/ai/coach/memory/1/2?min_similarity=0.5", "invalid_query"),
        (
            "GET",
            "/ai/coach/memory/1/2?query=x&min_similarity=2",
            "invalid_query",
        ),
        (
            "GET",
            "/ai/coach/memory/1/2?query=x&min_similarity=NaN",
            "invalid_query",
        ),
        ("GET", "/ai/coach/memory/u:1/2", "invalid_path"),
        ("GET", "/ai/coach/memory/1/c%20d", "invalid_path"),
        ("GET", &long_id, "invalid_path"),
        ("DELETE", "/ai/coach/memory/1/2/not-a-uuid", "invalid_path"),
        ("DELETE", "/ai/coach/memory/u*1", "invalid_path"),
    ];
    for (method, path, code) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(resp).await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    app.stop().await.unwrap();
}

/// Two coachd instances on one Redis (same key prefix) admit exactly RATE_LIMIT_REQUESTS of many
/// parallel requests from one user, and the refused ones carry the 429 headers.
#[tokio::test]
async fn two_instances_sharing_redis_admit_exactly_the_limit() {
    const LIMIT: usize = 7;
    const REQUESTS: usize = 40;
    let prefix = common::fresh_prefix();
    let limit = LIMIT.to_string();
    let settings = [
        ("COACHD_REDIS_KEY_PREFIX", prefix.as_str()),
        ("RATE_LIMIT_REQUESTS", limit.as_str()),
        ("RATE_LIMIT_TTL", "60"),
    ];
    let a = spawn_app(&settings).await;
    let b = spawn_app(&settings).await;

    let requests = (0..REQUESTS).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.client.get(app.url("/ai/coach/memory/42/7")).send()
    });
    let responses: Vec<reqwest::Response> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let header = |r: &reqwest::Response, name: &str| -> u64 {
        r.headers()
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (ok, limited): (Vec<_>, Vec<_>) = responses.into_iter().partition(|r| r.status() == 200);
    assert_eq!(
        ok.len(),
        LIMIT,
        "exactly the limit is admitted across both instances"
    );
    assert_eq!(limited.len(), REQUESTS - LIMIT);
    let mut remaining: Vec<u64> = ok.iter().map(|r| header(r, "x-ratelimit-remaining")).collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..LIMIT as u64).collect::<Vec<_>>());
    for r in &ok {
        assert_eq!(header(r, "x-ratelimit-limit"), LIMIT as u64);
    }
    for r in limited {
        assert_eq!(r.status(), 429);
        let retry_after = header(&r, "retry-after");
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
        assert_eq!(header(&r, "x-ratelimit-limit"), LIMIT as u64);
        assert_eq!(header(&r, "x-ratelimit-remaining"), 0);
        assert_eq!(header(&r, "x-ratelimit-reset"), retry_after);
        let (_, body) = json_of(r).await;
        assert_eq!(body["error"]["code"], "rate_limited");
    }

    // The counter lives under the reference key pattern, with the endpoint as the route template.
    let key = format!("{prefix}ratelimit:42:/ai/coach/memory/{{user_id}}/{{coach_id}}");
    let redis = a.state.redis.clone().unwrap();
    let count: i64 = redis.get(&key).await.unwrap();
    assert_eq!(count, REQUESTS as i64);
    let ttl: i64 = redis.ttl(&key).await.unwrap();
    assert!((1..=60).contains(&ttl), "TTL {ttl}");

    // Another user has a window of its own.
    assert_eq!(a.get("/ai/coach/memory/43/7").await.status(), 200);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn rate_limit_disabled_sends_no_headers_and_never_429() {
    let app = spawn_app_with(
        Services::Embedded,
        &[("RATE_LIMIT_ENABLED", "false"), ("RATE_LIMIT_REQUESTS", "1")],
    )
    .await;
    for _ in 0..3 {
        let resp = app.get("/ai/coach/memory/1/2").await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("x-ratelimit-limit").is_none());
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_in_process_limiter_answers_429_too() {
    let app = spawn_app_with(Services::Embedded, &[("RATE_LIMIT_REQUESTS", "2")]).await;
    let statuses: Vec<u16> = futures::future::join_all((0..4).map(|_| app.get("/ai/coach/memory/1/2")))
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 2);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn requests_are_admitted_without_headers_when_the_limiter_store_is_down() {
    // Port 1 on loopback: nothing listens there, so the Redis limiter cannot answer.
    let app = spawn_app(&[
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("COACHD_REDIS_COMMAND_TIMEOUT_MS", "200"),
        ("RATE_LIMIT_REQUESTS", "1"),
    ])
    .await;
    for _ in 0..2 {
        let resp = app.get("/ai/coach/memory/1/2").await;
        assert_eq!(
            resp.status(),
            200,
            "an outage of Redis does not take the route down"
        );
        assert!(resp.headers().get("x-ratelimit-limit").is_none());
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn with_fail_open_off_a_down_limiter_store_refuses_with_503() {
    let app = spawn_app(&[
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("COACHD_REDIS_COMMAND_TIMEOUT_MS", "200"),
        ("RATE_LIMIT_FAIL_OPEN", "false"),
    ])
    .await;
    let resp = app.get("/ai/coach/memory/1/2").await;
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    app.stop().await.unwrap();
}
