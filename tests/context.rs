//! The context cache and the rate limiter: one behaviour suite, run against the real Redis and
//! against the in-process implementation, plus checks of the real Redis keys and their TTLs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use coachd::Settings;
use coachd::context::rate_limit::{InProcessRateLimiter, RateLimit, RateLimiter, RedisRateLimiter};
use coachd::context::{
    ContextCache, ContextLimits, ContextMessage, InProcessContextCache, RedisContextCache, StoredThrough,
    TurnKey,
};
use fred::interfaces::{KeysInterface, ListInterface};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Redis,
    InProcess,
}

/// A cache or limiter under test and a way to read TTLs of its (unprefixed) keys.
struct Backend {
    cache: Arc<dyn ContextCache>,
    limiter: Arc<dyn RateLimiter>,
    in_process: Option<Arc<InProcessContextCache>>,
    redis: Option<(fred::clients::Pool, String)>,
    _conn: Option<coachd::redis::RedisConn>,
}

impl Backend {
    /// Time to live of a key as the backend sees it; `None` when the key does not exist.
    async fn ttl(&self, key: &str) -> Option<Duration> {
        match (&self.redis, &self.in_process) {
            (Some((pool, prefix)), _) => {
                // The literal key name, prefix included: this checks the reference key patterns.
                let ms: i64 = pool.pttl(format!("{prefix}{key}")).await.unwrap();
                (ms >= 0).then(|| Duration::from_millis(ms as u64))
            }
            (None, Some(cache)) => cache.ttl(key),
            (None, None) => unreachable!(),
        }
    }
}

fn limits(max_messages: usize, session_ttl: Duration, user_session_ttl: Duration) -> ContextLimits {
    ContextLimits {
        session_ttl,
        user_session_ttl,
        max_messages,
    }
}

fn reference_limits() -> ContextLimits {
    limits(100, Duration::from_secs(3_600), Duration::from_secs(86_400))
}

/// The pool the settings describe, as start-up builds it.
fn connect(settings: &Settings) -> coachd::redis::RedisConn {
    coachd::redis::connect(
        settings.redis_url.as_ref().unwrap(),
        settings.redis_password.as_ref(),
        settings.redis_pool_size,
        settings.redis_command_timeout,
    )
    .unwrap()
}

async fn redis_pool() -> coachd::redis::RedisConn {
    let settings = Settings::for_tests(&[("REDIS_URL", &common::redis_url())]).unwrap();
    let conn = connect(&settings);
    fred::interfaces::ClientLike::wait_for_connect(&conn.pool)
        .await
        .unwrap();
    conn
}

async fn backend(kind: Kind, limits: ContextLimits, rate: RateLimit) -> Backend {
    match kind {
        Kind::Redis => {
            let conn = redis_pool().await;
            let prefix = common::fresh_prefix();
            Backend {
                cache: Arc::new(RedisContextCache::new(conn.pool.clone(), &prefix, limits)),
                limiter: Arc::new(RedisRateLimiter::new(conn.pool.clone(), &prefix, rate)),
                in_process: None,
                redis: Some((conn.pool.clone(), prefix)),
                _conn: Some(conn),
            }
        }
        Kind::InProcess => {
            let cache = Arc::new(InProcessContextCache::new(limits));
            Backend {
                cache: cache.clone(),
                limiter: Arc::new(InProcessRateLimiter::new(rate)),
                in_process: Some(cache),
                redis: None,
                _conn: None,
            }
        }
    }
}

fn rate(requests: u32, window: Duration) -> RateLimit {
    RateLimit { requests, window }
}

fn default_rate() -> RateLimit {
    rate(60, Duration::from_secs(60))
}

fn msg(role: &str, content: &str) -> ContextMessage {
    ContextMessage::new(role, content)
}

fn contents(messages: &[ContextMessage]) -> Vec<&str> {
    messages.iter().map(|m| m.content.as_str()).collect()
}

/// Every behaviour test runs once per backend: `<test>::redis` and `<test>::in_process`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn redis() {
                super::$name(super::Kind::Redis).await;
            }
            #[tokio::test]
            async fn in_process() {
                super::$name(super::Kind::InProcess).await;
            }
        }
    )*};
}

on_both_backends!(
    recent_messages_are_the_newest_oldest_first,
    messages_round_trip_with_metadata,
    lists_are_capped,
    a_turn_appends_its_messages_together_in_order,
    a_turn_written_twice_is_stored_once,
    the_stored_mark_round_trips_and_goes_with_the_session,
    keys_and_ttls_follow_the_reference_patterns,
    user_coach_context_is_kept_per_pair,
    last_session_follows_the_latest_append,
    clearing_a_session_forgets_it,
    context_expires_after_its_ttl,
    rate_limit_admits_the_limit_per_user_and_endpoint,
    rate_limit_window_resets,
    rate_limit_counts_parallel_requests_exactly,
);

async fn recent_messages_are_the_newest_oldest_first(kind: Kind) {
    let b = backend(kind, reference_limits(), default_rate()).await;
    for i in 1..=5 {
        b.cache
            .append_message("s1", "u1", "c1", msg("user", &format!("m{i}")))
            .await
            .unwrap();
    }
    let recent = b.cache.recent_messages("s1", 3).await.unwrap();
    assert_eq!(contents(&recent), ["m3", "m4", "m5"]);
    let all = b.cache.recent_messages("s1", 100).await.unwrap();
    assert_eq!(contents(&all), ["m1", "m2", "m3", "m4", "m5"]);
    assert!(b.cache.recent_messages("s1", 0).await.unwrap().is_empty());
    assert!(b.cache.recent_messages("nope", 10).await.unwrap().is_empty());
}

async fn messages_round_trip_with_metadata(kind: Kind) {
    let b = backend(kind, reference_limits(), default_rate()).await;
    let mut m = msg("assistant", "Grüße 🍺 \"quoted\"\nnew line");
    m.metadata = json!({"turn": 3, "model": "gpt"});
    b.cache.append_message("s1", "u1", "c1", m.clone()).await.unwrap();
    let back = b.cache.recent_messages("s1", 1).await.unwrap();
    assert_eq!(back, vec![m]);
}

async fn lists_are_capped(kind: Kind) {
    let b = backend(
        kind,
        limits(3, Duration::from_secs(3_600), Duration::from_secs(86_400)),
        default_rate(),
    )
    .await;
    for i in 1..=10 {
        b.cache
            .append_message("s1", "u1", "c1", msg("user", &format!("m{i}")))
            .await
            .unwrap();
        b.cache
            .append_user_coach("u1", "c1", msg("user", &format!("m{i}")))
            .await
            .unwrap();
    }
    let recent = b.cache.recent_messages("s1", 100).await.unwrap();
    assert_eq!(contents(&recent), ["m8", "m9", "m10"]);
    let pair = b.cache.user_coach_context("u1", "c1", 100).await.unwrap();
    assert_eq!(contents(&pair), ["m8", "m9", "m10"]);
    if let Some((pool, prefix)) = &b.redis {
        let len: i64 = pool.llen(format!("{prefix}session:s1:context")).await.unwrap();
        assert_eq!(len, 3, "the Redis list itself is trimmed");
    }
}

async fn a_turn_appends_its_messages_together_in_order(kind: Kind) {
    let b = backend(
        kind,
        limits(3, Duration::from_secs(3_600), Duration::from_secs(86_400)),
        default_rate(),
    )
    .await;
    b.cache
        .append_message("s1", "u1", "c1", msg("user", "m1"))
        .await
        .unwrap();
    for turn in 2..=3 {
        let pair = vec![
            msg("user", &format!("q{turn}")),
            msg("assistant", &format!("a{turn}")),
        ];
        b.cache
            .append_messages("s1", "u1", "c1", pair.clone())
            .await
            .unwrap();
        b.cache
            .append_user_coach_messages("u1", "c1", pair)
            .await
            .unwrap();
    }
    // Nothing to append is no write at all (and no pointer).
    b.cache
        .append_messages("s2", "u2", "c1", Vec::new())
        .await
        .unwrap();
    let recent = b.cache.recent_messages("s1", 100).await.unwrap();
    assert_eq!(contents(&recent), ["a2", "q3", "a3"], "capped at 3, in order");
    let pair = b.cache.user_coach_context("u1", "c1", 100).await.unwrap();
    assert_eq!(contents(&pair), ["a2", "q3", "a3"]);
    assert_eq!(b.cache.last_session("u1").await.unwrap().as_deref(), Some("s1"));
    assert_eq!(b.cache.last_session("u2").await.unwrap(), None);
    assert!(b.cache.recent_messages("s2", 10).await.unwrap().is_empty());
    if let Some((pool, prefix)) = &b.redis {
        let len: i64 = pool.llen(format!("{prefix}session:s1:context")).await.unwrap();
        assert_eq!(len, 3, "the Redis list itself is trimmed");
        let pair_ttl = b.ttl("user:u1:coach:c1:context").await;
        assert!(
            pair_ttl.is_some_and(|t| t > Duration::from_secs(3_500)),
            "{pair_ttl:?}"
        );
    }
}

async fn a_turn_written_twice_is_stored_once(kind: Kind) {
    // A retry after a lost reply, or a turn two nodes each ended during a split: the second
    // write of a turn stores nothing, in the session list and in the user–coach list.
    let b = backend(kind, reference_limits(), default_rate()).await;
    let turn = |n| TurnKey {
        session_id: "s1",
        user_id: "u1",
        coach_id: "c1",
        turn_number: n,
    };
    let full = vec![msg("user", "q1"), msg("assistant", "the whole reply")];
    let partial = vec![msg("user", "q1"), msg("assistant", "the whole")];
    assert!(b.cache.append_turn(&turn(1), full.clone()).await.unwrap());
    assert!(b.cache.append_user_coach_turn(&turn(1), full).await.unwrap());
    assert!(!b.cache.append_turn(&turn(1), partial.clone()).await.unwrap());
    assert!(!b.cache.append_user_coach_turn(&turn(1), partial).await.unwrap());
    // The same turn number of another session is another turn.
    let other = TurnKey {
        session_id: "s2",
        ..turn(1)
    };
    assert!(
        b.cache
            .append_user_coach_turn(&other, vec![msg("user", "q1 of s2")])
            .await
            .unwrap()
    );
    assert!(
        b.cache
            .append_turn(&turn(2), vec![msg("user", "q2")])
            .await
            .unwrap()
    );

    let session = b.cache.recent_messages("s1", 100).await.unwrap();
    assert_eq!(contents(&session), ["q1", "the whole reply", "q2"]);
    let pair = b.cache.user_coach_context("u1", "c1", 100).await.unwrap();
    assert_eq!(contents(&pair), ["q1", "the whole reply", "q1 of s2"]);
    assert_eq!(b.cache.last_session("u1").await.unwrap().as_deref(), Some("s1"));

    // Clearing the session forgets its turns too.
    b.cache.clear_session("s1").await.unwrap();
    assert!(
        b.cache
            .append_turn(&turn(1), vec![msg("user", "again")])
            .await
            .unwrap()
    );
    assert_eq!(
        contents(&b.cache.recent_messages("s1", 100).await.unwrap()),
        ["again"]
    );
}

async fn the_stored_mark_round_trips_and_goes_with_the_session(kind: Kind) {
    let b = backend(kind, reference_limits(), default_rate()).await;
    assert_eq!(b.cache.stored_through("s1").await.unwrap(), None);
    let mark = StoredThrough {
        turn: 7,
        end_seq: 120,
    };
    b.cache.mark_stored("s1", mark).await.unwrap();
    assert_eq!(b.cache.stored_through("s1").await.unwrap(), Some(mark));
    assert_eq!(b.cache.stored_through("s2").await.unwrap(), None);
    let ttl = b.ttl("session:s1:stored").await.unwrap();
    assert!(
        ttl > Duration::from_secs(3_500),
        "expires with the session's context: {ttl:?}"
    );
    b.cache.clear_session("s1").await.unwrap();
    assert_eq!(b.cache.stored_through("s1").await.unwrap(), None);
}

async fn keys_and_ttls_follow_the_reference_patterns(kind: Kind) {
    let b = backend(kind, reference_limits(), default_rate()).await;
    b.cache
        .append_message("42", "7", "3", msg("user", "hi"))
        .await
        .unwrap();
    b.cache
        .append_user_coach("7", "3", msg("user", "hi"))
        .await
        .unwrap();

    let near = |ttl: Option<Duration>, expected: u64, key: &str| {
        let ttl = ttl.unwrap_or_else(|| panic!("{key} does not exist"));
        assert!(
            ttl <= Duration::from_secs(expected) && ttl > Duration::from_secs(expected - 10),
            "{key}: TTL {ttl:?}, expected about {expected} s"
        );
    };
    near(b.ttl("session:42:context").await, 3_600, "session:42:context");
    near(b.ttl("user:7:last_session").await, 86_400, "user:7:last_session");
    near(
        b.ttl("user:7:coach:3:context").await,
        3_600,
        "user:7:coach:3:context",
    );
}

async fn user_coach_context_is_kept_per_pair(kind: Kind) {
    let b = backend(kind, reference_limits(), default_rate()).await;
    b.cache
        .append_user_coach("u1", "c1", msg("user", "a"))
        .await
        .unwrap();
    b.cache
        .append_user_coach("u1", "c1", msg("assistant", "b"))
        .await
        .unwrap();
    b.cache
        .append_user_coach("u1", "c2", msg("user", "x"))
        .await
        .unwrap();
    b.cache
        .append_user_coach("u2", "c1", msg("user", "y"))
        .await
        .unwrap();

    let ctx = b.cache.user_coach_context("u1", "c1", 10).await.unwrap();
    assert_eq!(contents(&ctx), ["a", "b"]);
    assert_eq!(ctx[1].role, "assistant");
    let last = b.cache.user_coach_context("u1", "c1", 1).await.unwrap();
    assert_eq!(contents(&last), ["b"]);
    assert_eq!(
        contents(&b.cache.user_coach_context("u1", "c2", 10).await.unwrap()),
        ["x"]
    );
    assert_eq!(
        contents(&b.cache.user_coach_context("u2", "c1", 10).await.unwrap()),
        ["y"]
    );
    assert!(
        b.cache.recent_messages("u1", 10).await.unwrap().is_empty(),
        "not a session"
    );
}

async fn last_session_follows_the_latest_append(kind: Kind) {
    let b = backend(kind, reference_limits(), default_rate()).await;
    assert_eq!(b.cache.last_session("u1").await.unwrap(), None);
    b.cache
        .append_message("sa", "u1", "c1", msg("user", "1"))
        .await
        .unwrap();
    b.cache
        .append_message("sb", "u1", "c2", msg("user", "2"))
        .await
        .unwrap();
    assert_eq!(b.cache.last_session("u1").await.unwrap().as_deref(), Some("sb"));
    b.cache.set_last_session("u1", "sc").await.unwrap();
    assert_eq!(b.cache.last_session("u1").await.unwrap().as_deref(), Some("sc"));
    assert_eq!(b.cache.last_session("u2").await.unwrap(), None);
}

async fn clearing_a_session_forgets_it(kind: Kind) {
    let b = backend(kind, reference_limits(), default_rate()).await;
    b.cache
        .append_message("s1", "u1", "c1", msg("user", "1"))
        .await
        .unwrap();
    b.cache
        .append_message("s2", "u1", "c1", msg("user", "2"))
        .await
        .unwrap();
    b.cache.clear_session("s1").await.unwrap();
    assert!(b.cache.recent_messages("s1", 10).await.unwrap().is_empty());
    assert_eq!(b.cache.recent_messages("s2", 10).await.unwrap().len(), 1);
    assert_eq!(b.ttl("session:s1:context").await, None);
    b.cache.clear_session("never-existed").await.unwrap();
}

async fn context_expires_after_its_ttl(kind: Kind) {
    // Real time: Redis expires keys on its own clock, so this one sleeps (just over a second).
    let b = backend(
        kind,
        limits(10, Duration::from_millis(800), Duration::from_millis(800)),
        default_rate(),
    )
    .await;
    b.cache
        .append_message("s1", "u1", "c1", msg("user", "1"))
        .await
        .unwrap();
    b.cache
        .append_user_coach("u1", "c1", msg("user", "1"))
        .await
        .unwrap();
    assert_eq!(b.cache.recent_messages("s1", 10).await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(b.cache.recent_messages("s1", 10).await.unwrap().is_empty());
    assert!(
        b.cache
            .user_coach_context("u1", "c1", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.cache.last_session("u1").await.unwrap(), None);
}

async fn rate_limit_admits_the_limit_per_user_and_endpoint(kind: Kind) {
    let b = backend(kind, reference_limits(), rate(3, Duration::from_secs(60))).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = b.limiter.check("u1", "/ai/coach/respond").await.unwrap();
        assert_eq!(d.limit, 3);
        assert!(
            d.reset_after <= Duration::from_secs(60) && d.reset_after > Duration::from_secs(50),
            "{d:?}"
        );
        seen.push((d.allowed, d.remaining));
    }
    assert_eq!(seen, [(true, 2), (true, 1), (true, 0), (false, 0)]);
    assert!(b.limiter.check("u2", "/ai/coach/respond").await.unwrap().allowed);
    assert!(b.limiter.check("u1", "/ai/coach/notes").await.unwrap().allowed);

    if let Some((pool, prefix)) = &b.redis {
        let key = format!("{prefix}ratelimit:u1:/ai/coach/respond");
        let count: i64 = pool.get(&key).await.unwrap();
        assert_eq!(count, 4);
        let ttl: i64 = pool.pttl(&key).await.unwrap();
        assert!((50_000..=60_000).contains(&ttl), "TTL {ttl} ms");
    }
}

async fn rate_limit_window_resets(kind: Kind) {
    let b = backend(kind, reference_limits(), rate(1, Duration::from_millis(700))).await;
    assert!(b.limiter.check("u1", "/e").await.unwrap().allowed);
    let refused = b.limiter.check("u1", "/e").await.unwrap();
    assert!(!refused.allowed);
    assert!(refused.reset_after <= Duration::from_millis(700));
    tokio::time::sleep(refused.reset_after + Duration::from_millis(100)).await;
    let again = b.limiter.check("u1", "/e").await.unwrap();
    assert_eq!((again.allowed, again.remaining), (true, 0));
}

async fn rate_limit_counts_parallel_requests_exactly(kind: Kind) {
    let b = backend(kind, reference_limits(), rate(10, Duration::from_secs(60))).await;
    let checks = (0..50).map(|_| {
        let limiter = b.limiter.clone();
        async move { limiter.check("u1", "/e").await.unwrap() }
    });
    let decisions = futures::future::join_all(checks).await;
    let allowed = decisions.iter().filter(|d| d.allowed).count();
    assert_eq!(allowed, 10);
    let mut remaining: Vec<u32> = decisions
        .iter()
        .filter(|d| d.allowed)
        .map(|d| d.remaining)
        .collect();
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..10).collect::<Vec<_>>(),
        "each admitted request saw its own count"
    );
}

#[tokio::test]
async fn redis_key_prefixes_keep_deployments_apart() {
    let conn = redis_pool().await;
    let a = RedisContextCache::new(conn.pool.clone(), common::fresh_prefix(), reference_limits());
    let b = RedisContextCache::new(conn.pool.clone(), common::fresh_prefix(), reference_limits());
    a.append_message("s1", "u1", "c1", msg("user", "from a"))
        .await
        .unwrap();
    assert!(b.recent_messages("s1", 10).await.unwrap().is_empty());
    assert_eq!(b.last_session("u1").await.unwrap(), None);
    assert_eq!(contents(&a.recent_messages("s1", 10).await.unwrap()), ["from a"]);
}

#[tokio::test]
async fn an_undecodable_redis_entry_is_skipped() {
    let conn = redis_pool().await;
    let prefix = common::fresh_prefix();
    let cache = RedisContextCache::new(conn.pool.clone(), &prefix, reference_limits());
    cache
        .append_message("s1", "u1", "c1", msg("user", "ok 1"))
        .await
        .unwrap();
    let _: i64 = conn
        .pool
        .rpush(format!("{prefix}session:s1:context"), "not json")
        .await
        .unwrap();
    cache
        .append_message("s1", "u1", "c1", msg("user", "ok 2"))
        .await
        .unwrap();
    let back = cache.recent_messages("s1", 10).await.unwrap();
    assert_eq!(contents(&back), ["ok 1", "ok 2"]);
}

#[tokio::test]
async fn a_redis_outage_is_reported_as_unavailable() {
    // Port 1 on loopback: nothing listens there. fred keeps reconnecting; commands time out.
    let settings = Settings::for_tests(&[
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("COACHD_REDIS_COMMAND_TIMEOUT_MS", "200"),
    ])
    .unwrap();
    let conn = connect(&settings);
    let cache = RedisContextCache::new(conn.pool.clone(), "x:", reference_limits());
    let err = cache
        .append_message("s1", "u1", "c1", msg("user", "hi"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            coachd::error::StoreError::Unavailable { backend: "redis", .. }
        ),
        "{err:?}"
    );
    let http: coachd::Error = err.into();
    assert_eq!(http.status_code().as_u16(), 503);
}
