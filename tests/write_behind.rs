//! Write-behind against the real stores when one of them is down: each store is written on its
//! own, so a Redis outage does not cost the PostgreSQL memory of a turn.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use coachd::persist::TurnRecord;
use common::{Services, spawn_app_with};

/// Issue 10 (7c): with Redis unreachable past its retries and PostgreSQL up, the turn's memory
/// row is still stored in PostgreSQL, and the Redis failure is counted.
#[tokio::test]
async fn a_redis_outage_does_not_skip_the_postgres_memory_write() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = format!("redis://127.0.0.1:{closed}");
    let app = spawn_app_with(
        Services::Real,
        &[
            ("REDIS_URL", redis.as_str()),
            ("COACHD_REDIS_COMMAND_TIMEOUT_MS", "100"),
            ("COACHD_WRITE_BEHIND_MAX_ATTEMPTS", "2"),
        ],
    )
    .await;
    let wb = app.state.write_behind.clone();

    wb.enqueue(TurnRecord {
        session_id: "sess_outage".into(),
        user_id: "outage-user".into(),
        coach_id: "c".into(),
        turn_number: 1,
        user_text: "Remember the pricing review".into(),
        reply_text: "Noted.".into(),
        interrupted: false,
        finish_reason: "stop".into(),
        usage: None,
        at: chrono::Utc::now(),
    })
    .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while wb.stats().failed.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the record was not given up in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pool = sqlx::PgPool::connect(app.database_url.as_deref().unwrap())
        .await
        .unwrap();
    let rows: Vec<String> = sqlx::query_scalar("select content from coach_memory where user_id = $1")
        .bind("outage-user")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows,
        ["User: Remember the pricing review\nCoach: Noted."],
        "the memory row is in PostgreSQL although Redis is down"
    );
    let given_up = &wb.stats().given_up;
    assert_eq!(
        given_up.session_context.load(Ordering::Relaxed),
        1,
        "the Redis failure is counted"
    );
    assert_eq!(given_up.user_coach_context.load(Ordering::Relaxed), 1);
    assert_eq!(given_up.memory.load(Ordering::Relaxed), 0);
    assert_eq!(
        wb.stats().written.load(Ordering::Relaxed),
        0,
        "not every store has the turn"
    );
    pool.close().await;
    app.stop().await.unwrap();
}
