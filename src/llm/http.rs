//! The HTTP connections to one provider: streams share HTTP/2 connections, opened as the streams
//! need them, at most `streams_per_connection` streams on each, and at most `max_streams` in flight
//! to the provider; a stream past that waits for a place until the connect timeout, then fails as
//! a connect timeout (504).
//!
//! Why lanes of clients and not one client: hyper multiplexes every request to a host over one
//! HTTP/2 connection and never opens a second when the server's SETTINGS_MAX_CONCURRENT_STREAMS
//! is reached: the surplus waits inside hyper, unbounded and invisible (hyper #2197, reqwest #976).
//! Each lane here is a `reqwest::Client` with a pool of its own, hence a connection of its own;
//! a stream takes the least busy lane with room, and a new lane opens only when every lane is full.
//! Over HTTP/1.1 there is one lane and every stream is its own connection, so the only limit that
//! means anything is `max_streams`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;

use super::EventStream;

/// The HTTP version spoken to a provider (`COACHD_<PROVIDER>_HTTP_VERSION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpVersion {
    /// HTTP/2 where TLS negotiates it (ALPN; OpenAI, Anthropic, Groq and OpenRouter do), else
    /// HTTP/1.1: a plain `http://` base URL speaks HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 with prior knowledge: h2c on a plain-HTTP upstream (a self-hosted server, the
    /// fake), h2 without ALPN over TLS.
    H2,
}

impl std::str::FromStr for HttpVersion {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(HttpVersion::Auto),
            "http1" | "http/1.1" | "1.1" => Ok(HttpVersion::Http1),
            "h2" | "http2" | "http/2" | "2" => Ok(HttpVersion::H2),
            _ => Err(()),
        }
    }
}

/// Limits of the connections to one provider (`COACHD_LLM_MAX_STREAMS`,
/// `COACHD_LLM_STREAMS_PER_CONNECTION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Streams in flight to one provider, at most.
    pub max_streams: usize,
    /// Streams on one HTTP/2 connection before another is opened.
    pub streams_per_connection: usize,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_streams: 10_000,
            streams_per_connection: 100,
        }
    }
}

/// How a lane's client is made: the shared settings of every connection to the provider.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// TCP + TLS connect timeout, also the longest wait for a place in the pool.
    pub connect_timeout: Duration,
    /// The HTTP version spoken.
    pub version: HttpVersion,
    /// Whether the base URL is `https`: with [`HttpVersion::Auto`], whether HTTP/2 can be had.
    pub tls: bool,
}

impl ClientConfig {
    fn build(&self) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            // Nagle would hold small upstream writes; the first token should not wait 40 ms.
            .tcp_nodelay(true)
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("coachd/", env!("CARGO_PKG_VERSION")));
        b = match self.version {
            HttpVersion::Auto => b,
            HttpVersion::Http1 => b.http1_only(),
            HttpVersion::H2 => b.http2_prior_knowledge(),
        };
        b.build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// Whether streams can share a connection: over HTTP/1.1 each has its own.
    fn multiplexed(&self) -> bool {
        match self.version {
            HttpVersion::H2 => true,
            HttpVersion::Http1 => false,
            HttpVersion::Auto => self.tls,
        }
    }
}

/// One client: one connection over HTTP/2.
#[derive(Debug)]
struct Lane {
    client: reqwest::Client,
    in_flight: AtomicUsize,
}

/// The connections to one provider.
#[derive(Debug)]
pub struct Upstream {
    config: ClientConfig,
    limits: PoolLimits,
    lanes: Mutex<Vec<Arc<Lane>>>,
    in_flight: AtomicUsize,
    freed: Notify,
}

/// A place in the pool, held as long as the stream it was taken for.
#[derive(Debug)]
pub struct Lease {
    lane: Arc<Lane>,
    upstream: Arc<Upstream>,
}

impl Lease {
    /// The client of the lane this lease is on.
    pub fn client(&self) -> &reqwest::Client {
        &self.lane.client
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.lane.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.upstream.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.upstream.freed.notify_one();
    }
}

/// Every place in the pool stayed taken for the whole wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saturated {
    /// How long the stream waited.
    pub waited: Duration,
}

impl Upstream {
    /// A pool with its first lane (the client health checks use) made at once, so a bad TLS or
    /// proxy setting fails at start-up.
    pub fn new(config: ClientConfig, limits: PoolLimits) -> Result<Arc<Self>, String> {
        let first = Arc::new(Lane {
            client: config.build()?,
            in_flight: AtomicUsize::new(0),
        });
        let limits = PoolLimits {
            max_streams: limits.max_streams.max(1),
            streams_per_connection: if config.multiplexed() {
                limits.streams_per_connection.max(1)
            } else {
                usize::MAX
            },
        };
        Ok(Arc::new(Self {
            config,
            limits,
            lanes: Mutex::new(vec![first]),
            in_flight: AtomicUsize::new(0),
            freed: Notify::new(),
        }))
    }

    /// A client for requests that are not streams (health checks), outside the stream count.
    pub fn client(&self) -> reqwest::Client {
        let lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        lanes.first().map(|l| l.client.clone()).unwrap_or_default()
    }

    /// Lanes (connections, over HTTP/2) opened so far.
    pub fn lanes(&self) -> usize {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Streams holding a lease now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// A place for one stream: on the least busy lane with room, on a new lane when every lane
    /// is full, or, when `max_streams` are in flight, the first place freed within the connect
    /// timeout.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, Saturated> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.config.connect_timeout;
        loop {
            // Registered before looking, so a place freed between the look and the wait wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_acquire() {
                Ok(Some(lease)) => return Ok(lease),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open another upstream connection");
                }
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Saturated {
                    waited: started.elapsed(),
                });
            }
        }
    }

    fn try_acquire(self: &Arc<Self>) -> Result<Option<Lease>, String> {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if self.in_flight.load(Ordering::Acquire) >= self.limits.max_streams {
            return Ok(None);
        }
        let per = self.limits.streams_per_connection;
        let best = lanes
            .iter()
            .filter(|l| l.in_flight.load(Ordering::Acquire) < per)
            .min_by_key(|l| l.in_flight.load(Ordering::Acquire))
            .cloned();
        let lane = match best {
            Some(lane) => lane,
            None => {
                let lane = Arc::new(Lane {
                    client: self.config.build()?,
                    in_flight: AtomicUsize::new(0),
                });
                lanes.push(lane.clone());
                tracing::debug!(lanes = lanes.len(), "opened another upstream HTTP/2 connection");
                lane
            }
        };
        lane.in_flight.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(Some(Lease {
            lane,
            upstream: self.clone(),
        }))
    }
}

/// The stream, holding its lease until it ends or is dropped.
pub fn hold(stream: EventStream, lease: Lease) -> EventStream {
    Box::pin(stream.map(move |item| {
        let _held = &lease;
        item
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(version: HttpVersion, max_streams: usize, per: usize) -> Arc<Upstream> {
        Upstream::new(
            ClientConfig {
                connect_timeout: Duration::from_secs(5),
                version,
                tls: false,
            },
            PoolLimits {
                max_streams,
                streams_per_connection: per,
            },
        )
        .expect("a client builds")
    }

    #[tokio::test(start_paused = true)]
    async fn streams_fill_a_connection_before_another_opens() {
        let up = pool(HttpVersion::H2, 100, 3);
        let mut leases = Vec::new();
        for _ in 0..7 {
            leases.push(up.acquire().await.expect("room"));
        }
        assert_eq!(up.lanes(), 3, "7 streams at 3 per connection");
        assert_eq!(up.in_flight(), 7);
        // A freed place on a lane is taken before a new lane opens.
        leases.swap_remove(0);
        leases.push(up.acquire().await.expect("room"));
        assert_eq!(up.lanes(), 3);
        drop(leases);
        assert_eq!(up.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn over_http1_one_lane_carries_every_stream() {
        let up = pool(HttpVersion::Http1, 100, 3);
        let leases: Vec<_> = futures::future::join_all((0..10).map(|_| up.acquire())).await;
        assert!(leases.iter().all(Result::is_ok));
        assert_eq!(up.lanes(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_pool_makes_a_stream_wait_for_a_freed_place_then_gives_up() {
        let up = pool(HttpVersion::H2, 2, 1);
        let a = up.acquire().await.expect("room");
        let _b = up.acquire().await.expect("room");
        // Freed after 1 s: the waiting stream gets the place.
        let start = tokio::time::Instant::now();
        let release = async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(a);
        };
        let (c, ()) = tokio::join!(up.acquire(), release);
        let _c = c.expect("a place freed in time");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // Nothing freed: the wait ends at the connect timeout.
        let err = up.acquire().await.expect_err("the pool stays full");
        assert_eq!(err.waited, Duration::from_secs(5));
        assert_eq!(up.lanes(), 2, "never more connections than max_streams allows");
    }

    #[test]
    fn versions_parse() {
        assert_eq!("h2".parse(), Ok(HttpVersion::H2));
        assert_eq!("HTTP1".parse(), Ok(HttpVersion::Http1));
        assert_eq!("auto".parse(), Ok(HttpVersion::Auto));
        assert_eq!("3".parse::<HttpVersion>(), Err(()));
    }
}
