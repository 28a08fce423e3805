//! The counters and gauges behind `/realtime/stats`: lock-free atomics, cheap on the token path.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

/// Session and connection counters.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    /// Sessions created.
    pub sessions_created: Counter,
    /// Sessions ended by the client.
    pub sessions_ended: Counter,
    /// Sessions ended after idling.
    pub expired: Counter,
    /// Session creations refused at the cap.
    pub rejected_at_capacity: Counter,
    /// Turns begun.
    pub turns_started: Counter,
    /// Turns finished normally.
    pub turns_completed: Counter,
    /// Turns cancelled or interrupted.
    pub turns_interrupted: Counter,
    /// Turns that failed.
    pub turns_failed: Counter,
    /// Tokens streamed.
    pub tokens: Counter,
    /// Connections closed for not keeping up.
    pub slow_clients: Counter,
    /// WebSocket connections closed for not answering a ping in time.
    pub no_pong_closes: Counter,
    /// WebSocket connections open now.
    pub ws_connections: Gauge,
    /// SSE connections open now.
    pub sse_connections: Gauge,
    /// Prompt assembly per turn (context and memory reads), the part of the first token's wait
    /// spent on storage.
    pub prompt: super::latency::Latency,
    /// From a turn's start to its first token being handed to the connections: prompt assembly
    /// plus the provider's own time to first token.
    pub first_token: super::latency::Latency,
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one to the gauge `pick` selects; the guard takes it away again when dropped.
    pub fn enter(stats: &Arc<Stats>, pick: fn(&Stats) -> &Gauge) -> GaugeGuard {
        pick(stats).0.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(stats.clone(), pick)
    }

    /// The value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Gauge {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.get())
    }
}

/// Keeps a [`Gauge`] raised while alive.
#[derive(Debug)]
pub struct GaugeGuard(Arc<Stats>, fn(&Stats) -> &Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.1)(&self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}
