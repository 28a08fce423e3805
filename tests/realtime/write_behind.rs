//! The write-behind queue: drained at shutdown, retried while Redis is down, and each store
//! written on its own, so a Redis outage does not cost the PostgreSQL memory of a turn.

use std::sync::atomic::Ordering;
use std::time::Duration;

use coachd::fake_upstream::Script;
use coachd::persist::TurnRecord;

use crate::common::{Services, spawn_app_with};
use crate::{app_with_fake, redis_client, redis_cmd};

#[tokio::test]
async fn graceful_shutdown_drains_the_write_behind_queue() {
    let (app, fake) = app_with_fake(Services::Real, &[("COACHD_WRITE_BEHIND_WORKERS", "1")]).await;
    fake.set_default(Script::text("ok"));
    let mut sessions = Vec::new();
    for i in 0..20 {
        let s = app.create_session(&format!("drain-{i}"), "c", "http").await;
        app.turn(&s, "remember this").await;
        sessions.push(s);
    }
    let prefix = app.redis_prefix.clone();
    app.stop().await.unwrap();
    let redis = redis_client().await;
    for s in &sessions {
        let n: Vec<String> = redis_cmd(
            &redis,
            &["LRANGE", &format!("{prefix}session:{}:context", s.id), "0", "-1"],
        )
        .await;
        assert_eq!(n.len(), 2, "every finished turn was stored before exit");
    }
}

/// A redis-server of the test's own, so it can be stopped and started again.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnRedis {
    fn start(port: u16, dir: &std::path::Path) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services makes sure)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnRedis {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn write_behind_retries_while_redis_is_down_and_stores_the_turn_once_it_is_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("coachd-redis-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut redis = OwnRedis::start(port, &dir);
    let url = format!("redis://127.0.0.1:{port}");
    let (app, fake) = app_with_fake(
        Services::Real,
        &[
            ("REDIS_URL", url.as_str()),
            ("COACHD_WRITE_BEHIND_MAX_ATTEMPTS", "60"),
            ("COACHD_PROMPT_FETCH_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    fake.set_default(Script::text("Still here."));
    let s = app.create_session("outage", "c", "http").await;

    redis.kill();
    // The reply does not depend on Redis: the prompt goes out without the cache's context.
    let (status, body) = app.turn(&s, "Are you there?").await;
    assert_eq!(
        (status, body["reply_text"].as_str()),
        (200, Some("Still here.")),
        "{body}"
    );
    let wb = app.state.write_behind.stats();
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    // Each attempt fails after the Redis command timeout (2 s); wait for the first retry.
    for _ in 0..200 {
        if wb.retries.load(relaxed) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(wb.retries.load(relaxed) >= 1, "failed writes are retried");
    assert_eq!(
        wb.written.load(relaxed),
        0,
        "nothing is written while Redis is down"
    );

    let redis = OwnRedis::start(redis.port, &redis.dir.clone());
    app.wait_written_for(1, Duration::from_secs(30)).await;
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    use std::io::{Read, Write};
    let key = format!("{}session:{}:context", app.redis_prefix, s.id);
    write!(conn, "*2\r\n$4\r\nLLEN\r\n${}\r\n{}\r\n", key.len(), key).unwrap();
    let mut reply = [0u8; 16];
    let n = conn.read(&mut reply).unwrap();
    assert_eq!(
        &reply[..n],
        b":2\r\n",
        "both messages of the turn were stored after the outage"
    );
    app.stop().await.unwrap();
}

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
        trace: None,
        end_seq: 0,
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
