//! A lock-free latency histogram for `/realtime/stats`: fixed buckets on a 1-2-5 scale from
//! 100 µs to 10 s, so the hot path records with two relaxed atomic adds and no allocation, and
//! operators read counts, mean, max and bucket-bound percentiles without a metrics stack.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeStruct;

/// Upper bounds of the buckets, in microseconds; a last bucket takes everything slower.
const BOUNDS_US: [u64; 16] = [
    100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_000_000, 5_000_000, 10_000_000,
];

/// Counts of durations per bucket, their sum and their maximum.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    count: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl Latency {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The upper bound (ms) of the bucket holding the `q` quantile; `None` before any record or
    /// when it falls in the open last bucket.
    pub fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return BOUNDS_US.get(i).map(|&b| b as f64 / 1_000.0);
            }
        }
        None
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let count = self.count();
        let sum = self.sum_us.load(Ordering::Relaxed);
        let mut out = s.serialize_struct("Latency", 5)?;
        out.serialize_field("count", &count)?;
        let mean = (count > 0).then(|| sum as f64 / count as f64 / 1_000.0);
        out.serialize_field("mean_ms", &mean)?;
        let max = (count > 0).then(|| self.max_us.load(Ordering::Relaxed) as f64 / 1_000.0);
        out.serialize_field("max_ms", &max)?;
        // Bucket bounds, not exact values: "p99 is at most this".
        out.serialize_field("p50_le_ms", &self.quantile_bound_ms(0.50))?;
        out.serialize_field("p99_le_ms", &self.quantile_bound_ms(0.99))?;
        out.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds() {
        let h = Latency::default();
        assert_eq!(h.quantile_bound_ms(0.5), None);
        for _ in 0..98 {
            h.record(Duration::from_micros(150));
        }
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_bound_ms(0.50), Some(0.2));
        assert_eq!(h.quantile_bound_ms(0.99), Some(5.0));
        assert_eq!(
            h.quantile_bound_ms(1.0),
            None,
            "the slowest is past the last bound"
        );
        let v = serde_json::to_value(&h).unwrap_or_default();
        assert_eq!(v["max_ms"], 60_000.0);
        assert_eq!(v["p50_le_ms"], 0.2);
    }
}
