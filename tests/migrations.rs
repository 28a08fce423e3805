//! Migrations against the real PostgreSQL+pgvector: idempotent, through the library and the binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use coachd::config::Settings;

#[tokio::test]
async fn migrations_run_twice_without_error() {
    let url = common::fresh_database().await;
    let settings = Settings::for_tests(&[("DATABASE_URL", &url)]).unwrap();
    let db_url = settings.database_url.clone().unwrap();

    let pool = coachd::db::connect(&db_url, &settings).await.unwrap();
    let first = coachd::db::migrate(&pool).await.expect("first run");
    let second = coachd::db::migrate(&pool).await.expect("second run");
    assert!(first >= 1, "the first run applies the migrations");
    assert_eq!(second, 0, "the second run has nothing left to apply");

    let ext: String = sqlx::query_scalar("select extversion from pg_extension where extname = 'vector'")
        .fetch_one(&pool)
        .await
        .expect("the vector extension is installed");
    assert!(ext.starts_with("0.8"), "pgvector 0.8.x, got {ext}");
}

#[tokio::test]
async fn coachd_migrate_command_is_idempotent() {
    let url = common::fresh_database().await;
    let dir = tempdir();
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_coachd"))
            .arg("migrate")
            .current_dir(&dir)
            .env_clear()
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "coachd migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("migrations up to date"));
    }
}

#[tokio::test]
async fn coachd_migrate_without_database_url_fails_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_coachd"))
        .arg("migrate")
        .current_dir(tempdir())
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL is not set"));
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("coachd-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn start_up_fails_clearly_when_pgvector_is_not_available() {
    // PostgreSQL 18's extension_control_path, set for one database to an empty folder, makes
    // `vector` genuinely unavailable there: the same server, seen as one without pgvector.
    let url = common::fresh_database().await;
    let name = url::Url::parse(&url)
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_owned();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&common::admin_database_url())
        .await
        .unwrap();
    sqlx::Executor::execute(
        &mut admin,
        format!(r#"alter database "{name}" set extension_control_path = '/nonexistent'"#).as_str(),
    )
    .await
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_coachd"))
        .current_dir(tempdir())
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("PORT", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("has no pgvector extension"), "{stderr}");
}
