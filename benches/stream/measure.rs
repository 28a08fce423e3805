//! What one stream and one process cost: a stream's first-token time and gaps, percentiles over
//! many, and a process's CPU time and resident memory from `/proc`.

use std::time::{Duration, Instant};

use crate::BoxError;

/// Latencies of one stream: time to first token, then each gap.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    pub ttft: Duration,
    pub gaps: Vec<Duration>,
    last: Option<Instant>,
}

impl Trace {
    /// A token arrived now, in a stream started at `start`.
    pub fn token(&mut self, start: Instant) {
        let now = Instant::now();
        match self.last {
            None => self.ttft = now - start,
            Some(prev) => self.gaps.push(now - prev),
        }
        self.last = Some(now);
    }

    /// Tokens seen (0 when none arrived).
    pub fn tokens(&self) -> usize {
        if self.last.is_some() {
            self.gaps.len() + 1
        } else {
            0
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Median, 99th percentile and maximum of a set of durations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub fn summarize(mut v: Vec<Duration>) -> Summary {
    v.sort();
    Summary {
        p50: percentile(&v, 0.50),
        p99: percentile(&v, 0.99),
        max: v.last().copied().unwrap_or_default(),
    }
}

/// Milliseconds with three decimals, as the tables print them.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// CPU time (user + system) a process has used so far, from `/proc/{pid}/stat`; `self` for this
/// one. Zero when the process is gone.
pub fn cpu_time(pid: &str) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // Linux reports these in USER_HZ, which is 100 on every platform Rust targets.
    Duration::from_millis(ticks * 10)
}

pub fn rss_kib(pid: u32) -> Result<u64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// The processes whose CPU a level reports: the server under test (none on the direct path),
/// the fake upstream, and this process (the clients).
#[derive(Debug, Clone, Copy)]
pub struct Pids {
    pub server: Option<u32>,
    pub fake: u32,
}

/// CPU used so far by the server, the fake and the clients.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    server: Duration,
    fake: Duration,
    clients: Duration,
}

impl CpuSnapshot {
    pub fn take(pids: Pids) -> Self {
        CpuSnapshot {
            server: pids.server.map_or(Duration::ZERO, |p| cpu_time(&p.to_string())),
            fake: cpu_time(&pids.fake.to_string()),
            clients: cpu_time("self"),
        }
    }

    /// CPU each used since `earlier`: (server, fake, clients).
    pub fn since(self, earlier: CpuSnapshot) -> (Duration, Duration, Duration) {
        (
            self.server.saturating_sub(earlier.server),
            self.fake.saturating_sub(earlier.fake),
            self.clients.saturating_sub(earlier.clients),
        )
    }
}
