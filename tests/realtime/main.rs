//! Realtime sessions over all three transports, against the real Redis and PostgreSQL and the
//! fake upstream, as one test binary (one link) with a module per seam: `http` turns and limits,
//! `sse` streams, `websocket` sessions and close codes, what happens to `turns` (cancel,
//! disconnect, upstream failures, notes), and the `write_behind` queue. Every event received is
//! validated against `proto/server.schema.json`. `capacity`: connections past
//! `COACHD_MAX_CONNECTIONS` are refused. `hostile`: slowloris, floods and replays get bounded answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod capacity;
#[path = "../common/mod.rs"]
mod common;
mod hostile;
mod http;
mod sse;
mod turns;
mod websocket;
mod write_behind;

use std::time::Duration;

use coachd::fake_upstream::FakeUpstream;
use common::{Services, TestApp, spawn_app_with};
use serde_json::Value;

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

/// Waits (up to 30 s) until `done` holds, looking every 20 ms.
async fn wait_for(done: impl Fn() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
