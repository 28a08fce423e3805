//! Redis through fred: a small client pool with a reconnect policy. Connecting never blocks
//! start-up: when Redis is down the pool keeps retrying in the background and the health checks
//! report it as down until it answers.

use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};
use fred::types::ConnectHandle;

use crate::secret::{Secret, ServiceUrl};

/// Reconnect back-off: 100 ms doubling to 5 s, forever. Redis outages are usually short, and a
/// node that gave up would need a restart to recover.
const RECONNECT_MIN_MS: u32 = 100;
const RECONNECT_MAX_MS: u32 = 5_000;

/// The Redis URL or pool settings are unusable.
#[derive(Debug, thiserror::Error)]
#[error("cannot use Redis at {url}: {reason}")]
pub struct RedisSetupError {
    /// The URL with its password redacted.
    pub url: String,
    /// fred's reason.
    pub reason: String,
}

/// A connected (or connecting) pool and the task that drives its connections.
#[derive(Debug)]
pub struct RedisConn {
    /// The pool; cheap to clone.
    pub pool: fred::clients::Pool,
    /// The connection task; awaited after `quit` at shutdown.
    pub task: ConnectHandle,
}

/// Builds the pool from `REDIS_URL` (+ `REDIS_PASSWORD`, used when the URL has none) with
/// `pool_size` clients whose commands time out after `timeout`, and starts connecting.
pub fn connect(
    url: &ServiceUrl,
    password: Option<&Secret>,
    pool_size: usize,
    timeout: std::time::Duration,
) -> Result<RedisConn, RedisSetupError> {
    let bad = |reason: String| RedisSetupError {
        url: url.redacted(),
        reason,
    };
    let mut config = Config::from_url(url.expose()).map_err(|e| bad(e.to_string()))?;
    if config.password.is_none() {
        config.password = password.map(|p| p.expose().to_owned());
    }
    // Keep retrying when Redis is down at start-up instead of failing: coachd must come up and
    // report Redis as down in /health/ready, not crash-loop.
    config.fail_fast = false;
    let pool = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            RECONNECT_MIN_MS,
            RECONNECT_MAX_MS,
            2,
        ))
        .with_connection_config(|c| {
            c.connection_timeout = timeout;
            c.internal_command_timeout = timeout;
            c.tcp = fred::types::config::TcpConfig {
                nodelay: Some(true),
                ..Default::default()
            };
        })
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
        })
        .build_pool(pool_size)
        .map_err(|e| bad(e.to_string()))?;
    let task = pool.connect();
    Ok(RedisConn { pool, task })
}

/// A Lua script run with `EVALSHA`: loaded with `SCRIPT LOAD` on first use, and again when Redis
/// answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`). Its SHA-1 never changes, so it is
/// remembered once.
#[derive(Debug)]
pub struct Script {
    body: &'static str,
    sha: std::sync::OnceLock<String>,
}

impl Script {
    /// A script with this Lua source.
    pub const fn new(body: &'static str) -> Self {
        Self {
            body,
            sha: std::sync::OnceLock::new(),
        }
    }

    /// Runs the script on one client of the pool.
    pub async fn run<R>(
        &self,
        pool: &fred::clients::Pool,
        keys: Vec<String>,
        args: Vec<fred::types::Value>,
    ) -> Result<R, fred::error::Error>
    where
        R: fred::types::FromValue,
    {
        use fred::interfaces::LuaInterface;
        let client = pool.next();
        let sha = match self.sha.get() {
            Some(sha) => sha.clone(),
            None => {
                let sha: String = client.script_load(self.body).await?;
                // Two tasks may race to load it; both get the same SHA-1, so either value is fine.
                let _ = self.sha.set(sha.clone());
                sha
            }
        };
        match client.evalsha(sha.as_str(), keys.clone(), args.clone()).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                client.script_load::<String, _>(self.body).await?;
                client.evalsha(sha.as_str(), keys, args).await
            }
            result => result,
        }
    }
}
