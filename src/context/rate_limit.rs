//! Per-user, per-endpoint rate limiting: `RATE_LIMIT_REQUESTS` per `RATE_LIMIT_TTL` under
//! `ratelimit:{user_id}:{endpoint}`, a fixed window as in the reference service. The Redis limiter
//! is one Lua script, so the count holds across every coachd instance sharing the Redis.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::Pool;
use tokio::time::Instant;

use super::{StoreError, keys};
use crate::redis::Script;

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Requests allowed per window.
    pub limit: u32,
    /// Requests left in the current window after this one.
    pub remaining: u32,
    /// Time until the window resets.
    pub reset_after: Duration,
}

impl RateDecision {
    fn from_count(count: u64, limit: u32, reset_after: Duration) -> Self {
        Self {
            allowed: count <= u64::from(limit),
            limit,
            remaining: u32::try_from(u64::from(limit).saturating_sub(count)).unwrap_or(0),
            reset_after,
        }
    }

    /// Seconds until the reset, rounded up so a client that waits that long is admitted.
    pub fn reset_secs(&self) -> u64 {
        let d = self.reset_after;
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }
}

/// Counts requests per user and endpoint.
#[async_trait]
pub trait RateLimiter: Send + Sync + fmt::Debug {
    /// Counts one request and says whether it is within the limit.
    async fn check(&self, user_id: &str, endpoint: &str) -> Result<RateDecision, StoreError>;

    /// False for the limiter used when `RATE_LIMIT_ENABLED=false`; its decisions carry no headers.
    fn enabled(&self) -> bool {
        true
    }
}

/// The window: requests allowed per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// `RATE_LIMIT_REQUESTS`.
    pub requests: u32,
    /// `RATE_LIMIT_TTL`.
    pub window: Duration,
}

/// KEYS[1]: the counter. ARGV[1]: the window in ms. Returns {count, ms until reset}.
/// The expiry is set on the first hit only (fixed window); a counter found without one (left by
/// an older writer that crashed between INCR and EXPIRE) gets one, so it can never stick forever.
static CHECK: Script = Script::new(
    r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
",
);

/// The limiter shared by every coachd on the same Redis and key prefix.
#[derive(Debug, Clone)]
pub struct RedisRateLimiter {
    pool: Pool,
    prefix: String,
    limit: RateLimit,
}

impl RedisRateLimiter {
    /// A limiter on `pool` with keys under `prefix`.
    pub fn new(pool: Pool, prefix: impl Into<String>, limit: RateLimit) -> Self {
        Self {
            pool,
            prefix: prefix.into(),
            limit,
        }
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check(&self, user_id: &str, endpoint: &str) -> Result<RateDecision, StoreError> {
        let key = format!("{}{}", self.prefix, keys::rate_limit(user_id, endpoint));
        let window_ms = i64::try_from(self.limit.window.as_millis()).unwrap_or(i64::MAX);
        let (count, ttl_ms): (i64, i64) = CHECK.run(&self.pool, vec![key], vec![window_ms.into()]).await?;
        Ok(RateDecision::from_count(
            u64::try_from(count).unwrap_or(0),
            self.limit.requests,
            Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0)),
        ))
    }
}

/// Writes between two sweeps of expired windows.
const SWEEP_EVERY: u64 = 4_096;

/// The limiter of a single coachd with no Redis: same windows, in a map.
#[derive(Debug)]
pub struct InProcessRateLimiter {
    limit: RateLimit,
    // A std Mutex: held for one map lookup, never across an await.
    windows: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    /// Count and end of the current window, per key.
    counts: HashMap<String, (u64, Instant)>,
    /// Checks so far, to sweep expired windows now and then.
    checks: u64,
}

impl InProcessRateLimiter {
    /// An empty limiter.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            windows: Mutex::new(Windows::default()),
        }
    }
}

#[async_trait]
impl RateLimiter for InProcessRateLimiter {
    async fn check(&self, user_id: &str, endpoint: &str) -> Result<RateDecision, StoreError> {
        let now = Instant::now();
        let mut guard = self.windows.lock().map_err(|_| StoreError::Internal {
            backend: "in-process",
            reason: "rate limiter lock poisoned".to_owned(),
        })?;
        let w = &mut *guard;
        w.checks += 1;
        if w.checks % SWEEP_EVERY == 0 {
            w.counts.retain(|_, (_, resets_at)| *resets_at > now);
        }
        let entry = w
            .counts
            .entry(keys::rate_limit(user_id, endpoint))
            .or_insert((0, now));
        if entry.1 <= now {
            *entry = (0, now + self.limit.window);
        }
        entry.0 += 1;
        Ok(RateDecision::from_count(
            entry.0,
            self.limit.requests,
            entry.1 - now,
        ))
    }
}

/// The limiter when `RATE_LIMIT_ENABLED=false`: admits everything.
#[derive(Debug, Clone, Copy)]
pub struct DisabledRateLimiter {
    /// Reported as the limit, though never enforced.
    pub limit: u32,
}

#[async_trait]
impl RateLimiter for DisabledRateLimiter {
    async fn check(&self, _user_id: &str, _endpoint: &str) -> Result<RateDecision, StoreError> {
        Ok(RateDecision {
            allowed: true,
            limit: self.limit,
            remaining: self.limit,
            reset_after: Duration::ZERO,
        })
    }

    fn enabled(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_in_process_window_admits_the_limit_then_resets() {
        let limiter = InProcessRateLimiter::new(RateLimit {
            requests: 2,
            window: Duration::from_secs(60),
        });
        let a = limiter.check("u", "/e").await.unwrap();
        assert_eq!(
            (a.allowed, a.remaining, a.reset_after),
            (true, 1, Duration::from_secs(60))
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let b = limiter.check("u", "/e").await.unwrap();
        assert_eq!(
            (b.allowed, b.remaining, b.reset_after),
            (true, 0, Duration::from_secs(50))
        );
        let c = limiter.check("u", "/e").await.unwrap();
        assert_eq!((c.allowed, c.remaining), (false, 0));
        assert!(limiter.check("other", "/e").await.unwrap().allowed, "per user");
        assert!(
            limiter.check("u", "/other").await.unwrap().allowed,
            "per endpoint"
        );
        tokio::time::advance(Duration::from_secs(50)).await;
        let d = limiter.check("u", "/e").await.unwrap();
        assert_eq!((d.allowed, d.remaining), (true, 1), "a new window");
    }

    #[test]
    fn reset_seconds_round_up() {
        let d = RateDecision::from_count(1, 5, Duration::from_millis(1_001));
        assert_eq!(d.reset_secs(), 2);
        let d = RateDecision::from_count(1, 5, Duration::from_secs(3));
        assert_eq!(d.reset_secs(), 3);
    }
}
