//! The official OpenAI Python SDK against coachd, unchanged (`tests/openai_sdk/check.py`): plain
//! and streamed completions, the stream helper, models, typed errors and a mid-stream failure.
//!
//! Needs a Python with the `openai` package: `COACHD_TEST_OPENAI_PYTHON=/path/to/python`, else
//! `python3` if it can import `openai`. Without one the test says so and passes, because the
//! chunk format itself is checked by `tests/openai_compat.rs` in every run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use common::{Services, spawn_app_with};

const KEY: &str = "sk-coachd-sdk-test";

/// The interpreter with the official SDK: `COACHD_TEST_OPENAI_PYTHON` (scripts/test sets it to its
/// pinned venv), else `python3`. Without the SDK there is nothing to test: that is a failure, never a
/// silent pass.
fn python_with_openai() -> String {
    let python = std::env::var("COACHD_TEST_OPENAI_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let ok = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{python} cannot import openai (scripts/test installs the pinned SDK; or set \
         COACHD_TEST_OPENAI_PYTHON to a venv with it)"
    );
    python
}

#[tokio::test]
async fn the_official_python_sdk_works_unchanged() {
    let python = python_with_openai();
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::text("Hello from the fake upstream."));
    fake.set_model(
        "broken",
        Script::counted(5).with_fault(Fault::MidStreamError { after: 2 }),
    );
    let base = fake.base_url();
    let app = spawn_app_with(
        Services::Embedded,
        &[
            ("LLM_PROVIDER", "openai"),
            ("OPENAI_API_KEY", "upstream-key"),
            ("OPENAI_MODEL", "gpt-4o-mini"),
            ("COACHD_OPENAI_BASE_URL", &base),
            ("COACHD_LLM_MAX_RETRIES", "0"),
            ("COACHD_API_KEYS", KEY),
        ],
    )
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk/check.py");
    let base_url = format!("{}/v1", app.addr);
    let out = tokio::process::Command::new(&python)
        .args([script, &base_url, KEY])
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "the SDK check failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    app.stop().await.unwrap();
}
