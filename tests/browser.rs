//! The `/chat` page in a real browser: headless Chromium driven by Playwright
//! (`tests/browser/chat.mjs`, pinned by `tests/browser/package-lock.json`) against two real coachd
//! servers with the real Redis and PostgreSQL, the LLM being the fake upstream (echoing each
//! message one word per token, paced so replies stream for a while). One server has no API key
//! (the page works with a user id), the other has an API key and JWT verification (the page uses
//! a JWT). The script checks streaming, safe Markdown, stop, a server-side disconnect mid-reply
//! on the WebSocket and on SSE, the SSE and HTTP fallbacks, notes, phone width; this test then
//! checks the servers saw the same. A missing node, playwright-core or Chromium fails the test:
//! `scripts/browser` installs them (`scripts/test` runs it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use coachd::fake_upstream::{FakeUpstream, Script};
use common::{TestApp, spawn_app};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const API_KEY: &str = "browser-test-backend-key";
const JWT_SECRET: &str = "browser-test-jwt-secret-0123456789";
const JWT_SUB: &str = "jwt-user-7";
const NOTES_SUMMARY: &str = "The client practised a sales pitch.";
const NOTES_ACTION: &str = "Call three leads";

/// Session summaries go to their own model, so the fake answers them with notes and every
/// chat turn with its echo.
const TASKS: &str = r#"
[tasks.session_summary]
description = "notes"
primary = { provider = "openai", model = "notes-model" }
"#;

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Fails (never skips) when a tool the test needs is missing, saying how to get it.
fn require_tools(dir: &Path) {
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is not installed: run scripts/browser"
    );
    assert!(
        dir.join("node_modules/playwright-core/package.json").is_file(),
        "playwright-core is not installed in tests/browser/node_modules: run scripts/browser (npm ci)"
    );
    assert!(
        chromium().is_file(),
        "{} is missing: run scripts/browser (apt-get install chromium)",
        chromium().display()
    );
}

fn jwt(sub: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "aud": "authenticated", "exp": now + 900, "iat": now}),
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

async fn app(fake: &FakeUpstream, tasks: &Path, extra: &[(&str, &str)]) -> TestApp {
    let base = fake.base_url();
    let tasks = tasks.to_string_lossy().into_owned();
    let mut vars = vec![
        ("LLM_PROVIDER", "openai"),
        ("OPENAI_API_KEY", "test-key"),
        ("OPENAI_MODEL", "gpt-test"),
        ("COACHD_OPENAI_BASE_URL", base.as_str()),
        ("COACHD_LLM_MAX_RETRIES", "0"),
        ("COACHD_LLM_TASKS_FILE", tasks.as_str()),
    ];
    vars.extend_from_slice(extra);
    spawn_app(&vars).await
}

async fn session(app: &TestApp, id: &str, key: Option<&str>) -> Value {
    let mut req = app.client.get(app.url(&format!("/realtime/sessions/{id}")));
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "session {id}");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn the_chat_page_streams_stops_survives_disconnects_and_falls_back_in_chromium() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    require_tools(&dir);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("browser");
    std::fs::create_dir_all(&out).unwrap();
    let _ = std::fs::remove_file(out.join("chat.png"));

    let fake = FakeUpstream::start().await.unwrap();
    // Slow enough that the page sees a reply streaming and can stop or lose it mid-way; short
    // enough that the whole run takes a few seconds of browser time.
    fake.set_default(Script::echo().paced(Duration::from_millis(30), Duration::from_millis(30)));
    let notes = json!({
        "summary": NOTES_SUMMARY,
        "key_points": ["opened with the client's problem"],
        "action_items": [{"task": NOTES_ACTION, "owner": "client", "due": "Friday", "priority": "high"}],
    });
    fake.set_model("notes-model", Script::text(&notes.to_string()));
    let tasks = std::env::temp_dir().join(format!(
        "coachd-browser-tasks-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&tasks, TASKS).unwrap();

    let open = app(&fake, &tasks, &[]).await;
    let keyed = app(
        &fake,
        &tasks,
        &[
            ("XENIOS_BACKEND_API_KEY", API_KEY),
            ("SUPABASE_JWT_SECRET", JWT_SECRET),
        ],
    )
    .await;

    let run = tokio::process::Command::new("node")
        .arg(dir.join("chat.mjs"))
        .current_dir(&dir)
        .env("COACHD_OPEN_URL", &open.addr)
        .env("COACHD_KEYED_URL", &keyed.addr)
        .env("COACHD_JWT", jwt(JWT_SUB))
        .env("COACHD_JWT_SUB", JWT_SUB)
        .env("COACHD_API_KEY", API_KEY)
        .env("COACHD_NOTES_SUMMARY", NOTES_SUMMARY)
        .env("COACHD_NOTES_ACTION", NOTES_ACTION)
        .env("CHROMIUM", chromium())
        .env("OUT_DIR", &out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    // A bound on a hung browser, not a measure of speed.
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser script finishes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser script failed ({}; screenshot in {}):\n{stderr}\n{stdout}",
        output.status,
        out.join("failure.png").display()
    );
    eprintln!("{stderr}");
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the script's last line is its JSON summary ({e}): {stdout}"));

    // The servers agree with what the page showed.
    let s = session(&open, summary["sessions"]["open"].as_str().unwrap(), None).await;
    assert_eq!(
        (
            s["status"].as_str(),
            s["user_id"].as_str(),
            s["turn_count"].as_u64()
        ),
        (Some("ended"), Some("browser-user"), Some(3)),
        "{s}"
    );
    let s = session(
        &keyed,
        summary["sessions"]["sse"].as_str().unwrap(),
        Some(API_KEY),
    )
    .await;
    assert_eq!(
        (
            s["status"].as_str(),
            s["user_id"].as_str(),
            s["turn_count"].as_u64()
        ),
        (Some("ended"), Some(JWT_SUB), Some(2)),
        "the SSE session was the JWT user's: {s}"
    );
    let s = session(
        &keyed,
        summary["sessions"]["http"].as_str().unwrap(),
        Some(API_KEY),
    )
    .await;
    assert_eq!(s["turn_count"].as_u64(), Some(1), "{s}");
    // Both ends (WebSocket, and SSE with the session token) stored the notes the page showed.
    for (app, id) in [
        (&open, &summary["sessions"]["open"]),
        (&keyed, &summary["sessions"]["sse"]),
    ] {
        let pool = sqlx::PgPool::connect(app.database_url.as_ref().unwrap())
            .await
            .unwrap();
        let (stored, items): (String, Value) =
            sqlx::query_as("select summary, action_items from session_notes where session_id = $1")
                .bind(id.as_str().unwrap())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            (stored.as_str(), items[0]["task"].as_str()),
            (NOTES_SUMMARY, Some(NOTES_ACTION))
        );
    }

    let png = std::fs::read(out.join("chat.png")).expect("a screenshot of the conversation");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "chat.png is a real PNG"
    );
    open.stop().await.unwrap();
    keyed.stop().await.unwrap();
    let _ = std::fs::remove_file(tasks);
}
