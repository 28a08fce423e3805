//! Prometheus metrics: the name, type, labels and help of every metric coachd exports at
//! `/metrics`, the process-wide recorder behind the `metrics` facade (rendered by
//! `metrics-exporter-prometheus`, never pushed), and the handles the token path keeps so it never
//! builds labels per token.
//!
//! The recorder is global to the process (the facade's design): [`install`] sets it up once, and
//! every later application built in the same process (tests start several) shares
//! it. Without it (metrics switched off) every macro of the facade is a no-op.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// `coachd_http_requests_total{method,route,status}`.
pub const HTTP_REQUESTS: &str = "coachd_http_requests_total";
/// `coachd_http_request_duration_seconds{method,route,status}`.
pub const HTTP_DURATION: &str = "coachd_http_request_duration_seconds";
/// `coachd_first_token_seconds{provider,model,transport}`.
pub const FIRST_TOKEN: &str = "coachd_first_token_seconds";
/// `coachd_first_token_overhead_seconds{provider,model,transport}`.
pub const OVERHEAD: &str = "coachd_first_token_overhead_seconds";
/// `coachd_llm_upstream_first_token_seconds{provider,model}`.
pub const UPSTREAM_FIRST_TOKEN: &str = "coachd_llm_upstream_first_token_seconds";
/// `coachd_llm_streams_in_flight{provider}`.
pub const STREAMS_IN_FLIGHT: &str = "coachd_llm_streams_in_flight";
/// `coachd_llm_prompt_tokens_total{provider,model}`.
pub const PROMPT_TOKENS: &str = "coachd_llm_prompt_tokens_total";
/// `coachd_llm_completion_tokens_total{provider,model}`.
pub const COMPLETION_TOKENS: &str = "coachd_llm_completion_tokens_total";
/// `coachd_llm_upstream_errors_total{provider,kind,stage}`.
pub const UPSTREAM_ERRORS: &str = "coachd_llm_upstream_errors_total";
/// `coachd_llm_retries_total{provider,model}`.
pub const RETRIES: &str = "coachd_llm_retries_total";
/// `coachd_llm_fallbacks_total{provider,model}`.
pub const FALLBACKS: &str = "coachd_llm_fallbacks_total";
/// `coachd_sessions_live`.
pub const SESSIONS_LIVE: &str = "coachd_sessions_live";
/// `coachd_connections{transport}`.
pub const CONNECTIONS: &str = "coachd_connections";
/// `coachd_disconnects_total{transport,reason}`.
pub const DISCONNECTS: &str = "coachd_disconnects_total";
/// `coachd_write_behind_queue_depth`.
pub const WRITE_BEHIND_DEPTH: &str = "coachd_write_behind_queue_depth";
/// `coachd_write_behind_backlog`.
pub const WRITE_BEHIND_BACKLOG: &str = "coachd_write_behind_backlog";
/// `coachd_write_behind_written_total`.
pub const WRITE_BEHIND_WRITTEN: &str = "coachd_write_behind_written_total";
/// `coachd_write_behind_retries_total{store}`.
pub const WRITE_BEHIND_RETRIES: &str = "coachd_write_behind_retries_total";
/// `coachd_write_behind_failures_total{store}`.
pub const WRITE_BEHIND_FAILURES: &str = "coachd_write_behind_failures_total";
/// `coachd_rate_limit_refusals_total{endpoint}`.
pub const RATE_LIMIT_REFUSALS: &str = "coachd_rate_limit_refusals_total";
/// `coachd_rate_limiter_errors_total{action}`.
pub const RATE_LIMITER_ERRORS: &str = "coachd_rate_limiter_errors_total";
/// `coachd_memory_search_duration_seconds{backend,outcome}`.
pub const MEMORY_SEARCH: &str = "coachd_memory_search_duration_seconds";
/// `coachd_job_queue_depth{queue,state}`.
pub const JOB_QUEUE_DEPTH: &str = "coachd_job_queue_depth";
/// `coachd_job_duration_seconds{kind,status}`.
pub const JOB_DURATION: &str = "coachd_job_duration_seconds";

/// Bucket bounds (seconds) of the latency histograms: 0.5 ms to 60 s.
const LATENCY_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Bucket bounds (seconds) of job run times: 10 ms to an hour.
const JOB_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The settings of `/metrics` (`COACHD_METRICS_ENABLED`, `COACHD_METRICS_TOKEN`).
#[derive(Debug, Clone, Default)]
pub struct MetricsSettings {
    /// Whether metrics are recorded and `/metrics` answers (404 otherwise).
    pub enabled: bool,
    /// The bearer token `/metrics` asks for; open without one.
    pub token: Option<crate::secret::Secret>,
}

/// The recorder of this process, or why it could not be installed (another recorder was).
static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder, once; later calls (a
/// second app in the same process) return the same handle. Fails only when some other recorder
/// was installed first.
pub fn install() -> Result<&'static PrometheusHandle, &'static str> {
    let installed = RECORDER.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(JOB_DURATION.to_owned()), &JOB_BUCKETS)
            .and_then(|b| b.set_buckets(&LATENCY_BUCKETS))
            .map_err(|e| e.to_string())?;
        let handle = builder.install_recorder().map_err(|e| e.to_string())?;
        describe();
        register_fixed_series();
        Ok(handle)
    });
    installed.as_ref().map_err(String::as_str)
}

/// The installed recorder, if any.
pub fn handle() -> Option<&'static PrometheusHandle> {
    RECORDER.get().and_then(|r| r.as_ref().ok())
}

/// Drains the histograms' sample buffers into their buckets every `every` until `stop`: without
/// it, samples recorded between two scrapes (or with nobody scraping) would pile up in memory.
pub async fn upkeep(handle: &'static PrometheusHandle, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            () = stop.cancelled() => return,
        }
    }
}

/// The help text and unit of every metric, rendered as `# HELP` lines.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time until the response head of an HTTP request, by method, route template and status (a stream's body is not included)."
    );
    describe_histogram!(
        FIRST_TOKEN,
        Unit::Seconds,
        "From the turn's start (or the request's arrival) to the first text handed to the client's transport."
    );
    describe_histogram!(
        OVERHEAD,
        Unit::Seconds,
        "coachd's own share of the time to first token: the time to first token less the time spent waiting on providers (requests, retries, back-off)."
    );
    describe_histogram!(
        UPSTREAM_FIRST_TOKEN,
        Unit::Seconds,
        "From sending one upstream request to its first text, per attempt that got one."
    );
    describe_gauge!(STREAMS_IN_FLIGHT, "Upstream LLM streams open now.");
    describe_counter!(
        PROMPT_TOKENS,
        Unit::Count,
        "Prompt tokens the providers reported."
    );
    describe_counter!(
        COMPLETION_TOKENS,
        Unit::Count,
        "Completion tokens the providers reported."
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Upstream failures by provider, kind and whether the client had text yet (stage)."
    );
    describe_counter!(RETRIES, "Retries of a model before its first token.");
    describe_counter!(FALLBACKS, "Models given up for the next model of their task.");
    describe_gauge!(SESSIONS_LIVE, "Live realtime sessions run by this node.");
    describe_gauge!(
        CONNECTIONS,
        "Client connections attached to sessions now, by transport."
    );
    describe_counter!(
        DISCONNECTS,
        "Connections closed by coachd: a client that did not keep up (slow_client) or answered no ping (no_pong)."
    );
    describe_gauge!(
        WRITE_BEHIND_DEPTH,
        "Finished turns waiting in the write-behind queues."
    );
    describe_gauge!(
        WRITE_BEHIND_BACKLOG,
        "Finished turns waiting in session backlogs for room in a full queue."
    );
    describe_counter!(WRITE_BEHIND_WRITTEN, "Finished turns written to every store.");
    describe_counter!(
        WRITE_BEHIND_RETRIES,
        "Store writes of a finished turn that failed and were retried."
    );
    describe_counter!(
        WRITE_BEHIND_FAILURES,
        "Finished turns given up for a store after every attempt, or refused by a stopped queue (store=queue)."
    );
    describe_counter!(
        RATE_LIMIT_REFUSALS,
        "Requests refused with 429 by the rate limiter."
    );
    describe_counter!(
        RATE_LIMITER_ERRORS,
        "Rate-limiter store failures, and whether the request was admitted or refused."
    );
    describe_histogram!(
        MEMORY_SEARCH,
        Unit::Seconds,
        "Memory similarity searches (embedding included)."
    );
    describe_gauge!(JOB_QUEUE_DEPTH, "Jobs queued or running, by queue.");
    describe_histogram!(JOB_DURATION, Unit::Seconds, "Job runs, by kind and outcome.");
}

/// Creates at zero the counters whose label sets are fixed and whose events are rare (a
/// disconnect, a store given up), so a scrape shows them before the first one happens and a rate
/// over them starts from a known zero.
fn register_fixed_series() {
    for (transport, reason) in [
        ("websocket", "slow_client"),
        ("websocket", "no_pong"),
        ("sse", "slow_client"),
    ] {
        metrics::counter!(DISCONNECTS, "transport" => transport, "reason" => reason).increment(0);
    }
    for store in ["session_context", "user_coach_context", "memory"] {
        metrics::counter!(WRITE_BEHIND_RETRIES, "store" => store).increment(0);
        metrics::counter!(WRITE_BEHIND_FAILURES, "store" => store).increment(0);
    }
    metrics::counter!(WRITE_BEHIND_FAILURES, "store" => "queue").increment(0);
    metrics::counter!(WRITE_BEHIND_WRITTEN).increment(0);
    for action in ["admitted", "refused"] {
        metrics::counter!(RATE_LIMITER_ERRORS, "action" => action).increment(0);
    }
}

/// The first-token histograms of one stream or turn, resolved once when it is routed so the
/// first token only records (no label building on the token path).
#[derive(Debug, Clone)]
pub struct FirstToken {
    total: Histogram,
    overhead: Histogram,
}

impl FirstToken {
    /// The histograms of `provider`, `model` (a bounded label: see `Llm::model_label`) and
    /// `transport`.
    pub fn new(provider: &'static str, model: String, transport: &'static str) -> Self {
        FirstToken {
            total: metrics::histogram!(FIRST_TOKEN, "provider" => provider, "model" => model.clone(), "transport" => transport),
            overhead: metrics::histogram!(OVERHEAD, "provider" => provider, "model" => model, "transport" => transport),
        }
    }

    /// Records one first token `total` after the start, of which `upstream` was spent waiting on
    /// providers.
    pub fn record(&self, total: Duration, upstream: Duration) {
        self.total.record(total.as_secs_f64());
        self.overhead.record(total.saturating_sub(upstream).as_secs_f64());
    }
}

/// The handles of one upstream attempt's stream: in-flight gauge, token counters and the
/// upstream first-token histogram, resolved when the request is sent.
#[derive(Debug)]
pub struct UpstreamStream {
    in_flight: Gauge,
    prompt: Counter,
    completion: Counter,
    first_token: Histogram,
}

impl UpstreamStream {
    /// Counts one more stream in flight for `provider`; [`Drop`] counts it out.
    pub fn open(provider: &'static str, model: String) -> Self {
        let in_flight = metrics::gauge!(STREAMS_IN_FLIGHT, "provider" => provider);
        in_flight.increment(1.0);
        UpstreamStream {
            in_flight,
            prompt: metrics::counter!(PROMPT_TOKENS, "provider" => provider, "model" => model.clone()),
            completion: metrics::counter!(COMPLETION_TOKENS, "provider" => provider, "model" => model.clone()),
            first_token: metrics::histogram!(UPSTREAM_FIRST_TOKEN, "provider" => provider, "model" => model),
        }
    }

    /// The attempt's first text arrived `after` its request was sent.
    pub fn first_token(&self, after: Duration) {
        self.first_token.record(after.as_secs_f64());
    }

    /// The token counts of the attempt, once.
    pub fn usage(&self, prompt: u32, completion: u32) {
        self.prompt.increment(u64::from(prompt));
        self.completion.increment(u64::from(completion));
    }
}

impl Drop for UpstreamStream {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

/// One upstream failure: `stage` is `before_first_token` (retried or fallen back, unseen by the
/// client) or `after_first_token` (the client's stream ends with an error).
pub fn upstream_error(provider: &'static str, kind: &'static str, stage: &'static str) {
    metrics::counter!(UPSTREAM_ERRORS, "provider" => provider, "kind" => kind, "stage" => stage).increment(1);
}

/// A connection closed by coachd for `reason` (`slow_client`, `no_pong`).
pub fn disconnect(transport: &'static str, reason: &'static str) {
    metrics::counter!(DISCONNECTS, "transport" => transport, "reason" => reason).increment(1);
}
