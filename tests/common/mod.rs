//! Shared test harness: `spawn_app` starts the real coachd on port 0 against the real Redis and
//! PostgreSQL that `scripts/test` provides (`TEST_REDIS_URL`, `TEST_DATABASE_URL`), each test with
//! its own database and its own Redis key prefix.
#![allow(
    dead_code,
    clippy::disallowed_methods,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

pub mod realtime;
pub mod services;

use std::sync::Once;

use coachd::{Application, Settings};
use tokio_util::sync::CancellationToken;

static TRACING: Once = Once::new();

/// Logs from the app under test, only with `TEST_LOG=1` (they drown test output otherwise).
pub fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info,coachd=debug")
                .with_test_writer()
                .try_init();
        }
    });
}

fn required(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test, which provisions Redis and PostgreSQL+pgvector")
    })
}

/// URL of the real Redis.
pub fn redis_url() -> String {
    required("TEST_REDIS_URL")
}

/// Admin URL of the real PostgreSQL+pgvector (its `coachd` database).
pub fn admin_database_url() -> String {
    required("TEST_DATABASE_URL")
}

/// Creates an empty database of its own for one test and returns its URL (`scripts/test`
/// drops what earlier runs left behind).
pub async fn fresh_database() -> String {
    coachd::db::ScratchDatabase::create(&admin_database_url(), "coachd_t_")
        .await
        .expect("create the test database")
        .url
}

/// A unique Redis key prefix for one test.
pub fn fresh_prefix() -> String {
    format!("t{}:", uuid::Uuid::new_v4().simple())
}

/// A running coachd and what a test needs to talk to it.
pub struct TestApp {
    pub addr: String,
    pub port: u16,
    pub client: reqwest::Client,
    pub shutdown: CancellationToken,
    pub state: coachd::state::AppState,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub database_url: Option<String>,
    pub redis_prefix: String,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.addr, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request failed")
    }

    /// Stops the server and waits for it to exit.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.expect("server task panicked")
    }
}

/// Which real services a test app uses.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Services {
    /// Real Redis and real PostgreSQL.
    Real,
    /// No external service: embedded implementations.
    Embedded,
}

/// Starts coachd with the real services and the given extra settings.
pub async fn spawn_app(overrides: &[(&str, &str)]) -> TestApp {
    spawn_app_with(Services::Real, overrides).await
}

pub async fn spawn_app_with(services: Services, overrides: &[(&str, &str)]) -> TestApp {
    init_tracing();
    let prefix = fresh_prefix();
    let mut vars: Vec<(String, String)> = vec![
        ("COACHD_REDIS_KEY_PREFIX".into(), prefix.clone()),
        ("COACHD_SHUTDOWN_GRACE_SECS".into(), "5".into()),
        // Tests stop at once; the one about draining sets its own delay.
        ("COACHD_SHUTDOWN_DRAIN_DELAY_SECS".into(), "0".into()),
    ];
    let mut database_url = None;
    if services == Services::Real {
        let db = fresh_database().await;
        vars.push(("DATABASE_URL".into(), db.clone()));
        vars.push(("REDIS_URL".into(), redis_url()));
        database_url = Some(db);
    }
    for (k, v) in overrides {
        vars.retain(|(name, _)| name != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let settings = Settings::for_tests(&pairs).expect("valid test settings");
    let app = Application::build(settings).await.expect("coachd starts");
    let port = app.port();
    let shutdown = app.shutdown_token();
    let state = app.state().clone();
    let task = tokio::spawn(app.run(std::future::pending()));
    TestApp {
        addr: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::new(),
        shutdown,
        state,
        task,
        database_url,
        redis_prefix: prefix,
    }
}
