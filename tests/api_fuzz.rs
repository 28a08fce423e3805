//! The API fuzzed from its own description: schemathesis (pinned, installed by `scripts/test`
//! into `.services/schemathesis-venv`) generates requests for every route of `/openapi.json` of a
//! real coachd (real PostgreSQL and Redis, an API key and JWT checking on, the fake upstream
//! answering structured-output requests with a schema-valid object) and checks that no answer is
//! a 5xx, every status and content type is documented, every response body and every SSE event
//! matches its schema, and auth is enforced. A bounded run (`COACHD_TEST_FUZZ_EXAMPLES` cases per
//! operation, seed `COACHD_TEST_FUZZ_SEED`); a longer one is in the README.
//!
//! `positive_data_acceptance` is not run: it takes any 400 for a request the document allows as a
//! failure, and coachd has cross-field rules (messages or prompt, labels within the configured
//! set) that JSON Schema cannot say.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use coachd::fake_upstream::{FakeUpstream, Script};
use common::{Services, spawn_app_with};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const KEY: &str = "fuzz-test-key";
const SECRET: &str = "fuzz-test-jwt-secret";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn schemathesis() -> PathBuf {
    let st = std::env::var("COACHD_TEST_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".services/schemathesis-venv/bin/schemathesis"));
    let ok = Command::new(&st)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "{} does not run: `scripts/test` installs it", st.display());
    st
}

/// A JWT for `user-42`, the id the document's examples use, so generated requests reach the routes.
fn jwt() -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3_600;
    let claims = serde_json::json!({"sub": "user-42", "aud": "authenticated", "exp": exp});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_holds_to_its_own_description_under_generated_requests() {
    let st = schemathesis();
    let fake = FakeUpstream::start().await.unwrap();
    fake.set_default(Script::counted(5).structured());
    let base = fake.base_url();
    let app = spawn_app_with(
        Services::Real,
        &[
            ("LLM_PROVIDER", "openai"),
            ("OPENAI_API_KEY", "upstream-key"),
            ("OPENAI_MODEL", "gpt-4o-mini"),
            ("COACHD_OPENAI_BASE_URL", &base),
            ("COACHD_LLM_MAX_RETRIES", "0"),
            ("XENIOS_BACKEND_API_KEY", KEY),
            ("SUPABASE_JWT_SECRET", SECRET),
            // Generated requests come fast from one user: the rate limits would answer most.
            ("RATE_LIMIT_REQUESTS", "1000000"),
        ],
    )
    .await;
    let examples = std::env::var("COACHD_TEST_FUZZ_EXAMPLES").unwrap_or_else(|_| "25".to_owned());
    let seed = std::env::var("COACHD_TEST_FUZZ_SEED").unwrap_or_else(|_| "1".to_owned());
    let report = root().join("target/schemathesis");
    let url = app.url("/openapi.json");
    let jwt = jwt();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .arg("--config-file")
            .arg(root().join("tests/schemathesis/schemathesis.toml"))
            .arg("--no-color")
            .args([
                "run",
                &url,
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
            .args(["--max-examples", &examples, "--seed", &seed, "--workers", "1"])
            .args(["--generation-database", "none"])
            .arg("--report-dir")
            .arg(&report)
            .args([
                "-H",
                &format!("X-API-Key: {KEY}"),
                "-H",
                &format!("Authorization: Bearer {jwt}"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("Operations:") && stdout.contains("Test cases:"),
        "schemathesis did not run the document"
    );
    assert!(out.status.success(), "schemathesis found failures (above)");
    app.stop().await.unwrap();
}
