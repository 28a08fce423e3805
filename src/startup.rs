//! Builds the application (storage, state, router), binds the listener and serves until a stop
//! signal, then shuts down gracefully: report not ready for the drain delay while still serving,
//! stop accepting, let in-flight requests finish within the grace period, close storage connections,
//! and export the last trace spans.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, StatusCode};
use axum::response::IntoResponse;
use axum::serve::ListenerExt;
use fred::prelude::ClientLike;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::coach::notes::{InProcessNotesStore, NotesStore, PgNotesStore};
use crate::config::Settings;
use crate::context::rate_limit::{
    DisabledRateLimiter, InProcessRateLimiter, RateLimit, RateLimiter, RedisRateLimiter,
};
use crate::context::{ContextCache, InProcessContextCache, RedisContextCache};
use crate::error::Error;
use crate::jobs::analyze::AnalyzeDeps;
use crate::jobs::engine::Engine;
use crate::jobs::in_process::InProcessJobBackend;
use crate::jobs::pg::PgJobBackend;
use crate::jobs::{JobBackend, Runner, Workers};
use crate::memory::{InProcessMemoryStore, MemoryLimits, MemoryStore, PgMemoryStore};
use crate::persist::WriteBehind;
use crate::redis::RedisConn;
use crate::session::cluster::{Cluster, shared_token_secret};
use crate::session::store::{RedisEventStore, StoreLimits};
use crate::session::token::TokenKey;
use crate::session::{ConnectionManager, Deps, Stats};
use crate::state::AppState;
use crate::{db, embed, redis, routes};

/// The request-id header, set when the client sent none and echoed on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// How often the metrics recorder folds recorded samples into its histograms.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Why coachd could not start. Each message is one line meant for an operator.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// PostgreSQL could not be set up (connection, pgvector, migrations).
    #[error(transparent)]
    Database(#[from] crate::db::DbError),
    /// `coachd migrate` without `DATABASE_URL`.
    #[error("DATABASE_URL is not set: there is no database to migrate")]
    NoDatabase,
    /// The Redis URL or pool settings are unusable.
    #[error(transparent)]
    Redis(#[from] crate::redis::RedisSetupError),
    /// The memory store could not be set up (dimension record, index).
    #[error(transparent)]
    Memory(#[from] crate::memory::SetupError),
    /// The embedder could not be built.
    #[error("cannot set up the embedder: {0}")]
    Embedder(String),
    /// The LLM configuration (providers, tasks file) is unusable.
    #[error("LLM configuration: {0}")]
    Llm(String),
    /// The personas file is unusable.
    #[error("{0}")]
    Personas(String),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS's reason.
        reason: String,
    },
}

/// A built, bound, not yet serving coachd.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    state: AppState,
    redis: Option<RedisConn>,
    write_tasks: tokio_util::task::TaskTracker,
    write_stop: CancellationToken,
    job_engine: Engine,
}

impl Application {
    /// Connects storage (running migrations), builds the state and binds the listener.
    /// `PORT=0` binds a free port; [`Application::port`] tells which.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let settings = Arc::new(settings);
        for warning in &settings.warnings {
            tracing::warn!("config: {warning}");
        }

        let db = match &settings.database_url {
            Some(url) => {
                let pool = db::connect(url, &settings).await?;
                let applied = db::migrate(&pool).await?;
                tracing::info!(url = %url, applied, "storage: PostgreSQL + pgvector");
                Some(pool)
            }
            None => {
                tracing::info!("storage: DATABASE_URL unset, using the embedded in-process memory store");
                None
            }
        };
        let redis = match &settings.redis_url {
            Some(url) => {
                let conn = redis::connect(
                    url,
                    settings.redis_password.as_ref(),
                    settings.redis_pool_size,
                    settings.redis_command_timeout,
                )?;
                tracing::info!(url = %url, "storage: Redis (connecting in the background)");
                Some(conn)
            }
            None => {
                tracing::info!("storage: REDIS_URL unset, using the embedded in-process context cache");
                None
            }
        };

        if settings.metrics.enabled {
            // Once per process: a second app in the same process (tests) shares the recorder.
            match crate::metric::install() {
                Ok(_) => tracing::info!(
                    token = settings.metrics.token.is_some(),
                    "metrics: Prometheus text format at /metrics"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: cannot install the recorder; /metrics answers 503")
                }
            }
        } else {
            tracing::info!("metrics: off (COACHD_METRICS_ENABLED=false)");
        }

        let llm = crate::llm::Llm::from_settings(&settings.llm).map_err(StartupError::Llm)?;
        tracing::info!(
            default_provider = %llm.default_provider(),
            tasks = llm.tasks().count(),
            "llm: providers and tasks ready"
        );

        let auth = crate::auth::Authenticator::from_settings(&settings);
        auth.log_summary();

        let personas = crate::coach::Personas::from_file(settings.personas_file.as_deref())
            .map_err(StartupError::Personas)?;

        let embedder = embed::from_settings(&settings.embedding, settings.llm.llm_timeouts.connect, true)
            .map_err(|e| StartupError::Embedder(e.to_string()))?;
        tracing::info!(
            provider = %settings.embedding.provider,
            model = embedder.model(),
            dimension = embedder.dimension(),
            "embedder"
        );
        let memory: Arc<dyn MemoryStore> = match &db {
            Some(pool) => {
                let store = PgMemoryStore::prepare(pool.clone(), embedder.clone(), &settings.memory).await?;
                tracing::info!(
                    hnsw = settings.memory.hnsw,
                    "memory: PostgreSQL + pgvector (exact per-pair search; HNSW cosine index when hnsw)"
                );
                Arc::new(store)
            }
            None => {
                tracing::info!("memory: in-process (lost on restart)");
                Arc::new(
                    InProcessMemoryStore::new(
                        embedder.clone(),
                        MemoryLimits::from(&settings.memory),
                        settings.memory.embedded_max,
                    )
                    .with_merge_similarity(settings.memory.merge_similarity),
                )
            }
        };
        let limits = settings.context;
        let window = RateLimit {
            requests: settings.rate_limit_requests,
            window: settings.rate_limit_ttl,
        };
        let prefix = &settings.redis_key_prefix;
        let (context, limiter): (Arc<dyn ContextCache>, Arc<dyn RateLimiter>) = match &redis {
            Some(conn) => (
                Arc::new(RedisContextCache::new(conn.pool.clone(), prefix, limits)),
                Arc::new(RedisRateLimiter::new(conn.pool.clone(), prefix, window)),
            ),
            None => (
                Arc::new(InProcessContextCache::new(limits)),
                Arc::new(InProcessRateLimiter::new(window)),
            ),
        };
        let backend = if redis.is_some() { "redis" } else { "in-process" };
        tracing::info!(backend, max_messages = limits.max_messages, "context cache");
        let rate_limiter: Arc<dyn RateLimiter> = if settings.rate_limit_enabled {
            tracing::info!(
                backend,
                requests = window.requests,
                window_secs = window.window.as_secs(),
                "rate limiter"
            );
            limiter
        } else {
            tracing::info!("rate limiter: disabled (RATE_LIMIT_ENABLED=false)");
            Arc::new(DisabledRateLimiter {
                limit: settings.rate_limit_requests,
            })
        };

        let addr = SocketAddr::new(settings.host, settings.port);
        let listener = TcpListener::bind(addr).await.map_err(|e| StartupError::Bind {
            addr,
            reason: e.to_string(),
        })?;
        let addr = listener.local_addr().map_err(|e| StartupError::Bind {
            addr,
            reason: e.to_string(),
        })?;

        let llm = Arc::new(llm);
        let personas = Arc::new(personas);
        let shutdown = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let write_tasks = tokio_util::task::TaskTracker::new();
        let write_stop = CancellationToken::new();
        // Session tasks and transports run on `tasks`; the write-behind workers run on
        // `write_tasks` and stop on `write_stop`, which shutdown cancels only after every session
        // task is done, so no finished turn is refused by a closed queue.
        let rt = &settings.realtime;
        let write_behind = WriteBehind::start(
            rt.write_behind,
            context.clone(),
            memory.clone(),
            &write_tasks,
            write_stop.clone(),
        );
        let notes: Arc<dyn NotesStore> = match &db {
            Some(pool) => Arc::new(PgNotesStore::new(pool.clone())),
            None => Arc::new(InProcessNotesStore::new(10_000)),
        };
        let (jobs, job_engine): (Arc<dyn JobBackend>, Engine) = match &db {
            Some(pool) => {
                let js = &settings.jobs;
                let backend = PgJobBackend::new(pool.clone(), js.upload_dir.clone(), js.upload_ttl);
                (Arc::new(backend), Engine::Postgres(pool.clone()))
            }
            None => {
                let backend = InProcessJobBackend::new(settings.jobs.embedded_max, settings.jobs.upload_ttl);
                (Arc::new(backend.clone()), Engine::InProcess(backend))
            }
        };
        tracing::info!(backend = jobs.name(), "jobs: apalis engine");
        let job_runner = Arc::new(Runner::new(
            jobs.clone(),
            settings.jobs.clone(),
            AnalyzeDeps {
                llm: llm.clone(),
                memory: memory.clone(),
                notes: notes.clone(),
                personas: personas.clone(),
                max_transcript_chars: settings.max_transcript_chars,
                memory_max_bytes: settings.memory.max_text_bytes,
            },
            crate::transcribe::Transcriber::new(settings.transcribe.clone(), transcribe_http(&settings)?),
            crate::extract::Extractor::with_http(settings.extract.clone(), transcribe_http(&settings)?),
        ));
        let deps = Deps {
            llm: llm.clone(),
            personas: personas.clone(),
            context: context.clone(),
            memory: memory.clone(),
            notes: notes.clone(),
            write_behind: write_behind.clone(),
            limits: Arc::new(rt.sessions),
            stats: Arc::new(Stats::default()),
            shutdown: shutdown.clone(),
        };
        let cluster = redis.as_ref().map(|conn| {
            let limits = StoreLimits {
                log_events: rt.sessions.log_events,
                session_ttl: settings.cluster.session_ttl,
                lease_ttl: settings.cluster.lease_ttl,
            };
            let store = RedisEventStore::new(conn.pool.clone(), prefix, limits);
            Cluster::new(settings.cluster.clone(), store)
        });
        let token_secret = match (&rt.token_secret, &redis) {
            (Some(secret), _) => Some(secret.clone()),
            // Several nodes on one Redis must accept each other's tokens: share one key there
            // rather than refuse to start, so a default deployment works on any number of nodes.
            (None, Some(conn)) => {
                match shared_token_secret(&conn.pool, prefix, settings.redis_command_timeout * 2).await {
                    Ok(secret) => {
                        tracing::info!(
                            "COACHD_SESSION_TOKEN_SECRET unset: using the key shared through Redis (made by the first node), so every node accepts the session tokens"
                        );
                        Some(secret)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "COACHD_SESSION_TOKEN_SECRET unset and Redis did not answer: session tokens are valid on this node only; set the secret on every node");
                        None
                    }
                }
            }
            (None, None) => {
                tracing::info!(
                    "COACHD_SESSION_TOKEN_SECRET unset: session tokens are valid on this node only"
                );
                None
            }
        };
        let session_tokens = TokenKey::new(token_secret.as_ref(), rt.token_ttl);
        let sessions = Arc::new(ConnectionManager::new(deps, tasks.clone()).with_cluster(cluster));
        let state = AppState {
            settings,
            db,
            redis: redis.as_ref().map(|r| r.pool.clone()),
            context,
            rate_limiter,
            memory,
            embedder,
            sessions,
            session_tokens,
            write_behind,
            notes,
            jobs,
            job_runner,
            tasks,
            llm,
            personas,
            shutdown,
            draining: CancellationToken::new(),
            auth: Arc::new(auth),
            started_at: Instant::now(),
        };
        Ok(Self {
            listener,
            addr,
            state,
            redis,
            write_tasks,
            write_stop,
            job_engine,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The application state (tests use it to reach storage directly).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A token that stops the server when cancelled, as a signal would: readiness answers 503
    /// at once, the listener closes after the drain delay, then the ordered shutdown runs.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.draining.clone()
    }

    /// Serves until `stop` resolves or the shutdown token is cancelled; then answers 503 on
    /// `/health/ready` while serving on for the drain delay (`COACHD_SHUTDOWN_DRAIN_DELAY_SECS`),
    /// stops accepting, drains in-flight requests for at most the grace period and closes storage
    /// connections.
    pub async fn run(self, stop: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Application {
            listener,
            addr,
            state,
            redis,
            write_tasks,
            write_stop,
            job_engine,
        } = self;
        let workers = Workers::start(job_engine, state.job_runner.clone(), &state.settings.jobs);
        state.sessions.start_cluster();
        let token = state.shutdown.clone();
        if state.settings.metrics.enabled
            && let Some(handle) = crate::metric::handle()
        {
            // On the session tracker, stopped by the shutdown token: shutdown waits for it.
            state
                .tasks
                .spawn(crate::metric::upkeep(handle, METRICS_UPKEEP, token.clone()));
        }
        let draining = state.draining.clone();
        let grace = state.settings.shutdown_grace;
        let drain_delay = state.settings.shutdown_drain_delay;
        let app = if state.settings.jobs.serve_api {
            build_router(state.clone())
        } else {
            build_health_router(state.clone())
        };

        // TCP_NODELAY on every accepted socket: without it Nagle holds small SSE/WS frames ~40 ms.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let listener = counting_listener(listener, &state.settings.connections);
        // The listener closes on `shutdown`, not on the stop signal: between the two lies the
        // drain delay, when /health/ready already answers 503 and everything else is served.
        let server = crate::server::serve(listener, app, state.settings.http.clone(), token.clone());
        tokio::pin!(server);
        tracing::info!(%addr, node_id = %state.settings.cluster.node_id, "coachd listening");

        let stop_token = draining.clone();
        let ended = tokio::select! {
            r = &mut server => Some(r.map_err(anyhow::Error::from)),
            () = async move { stop.await; stop_token.cancel(); } => None,
            () = draining.cancelled() => None,
            () = token.cancelled() => None,
        };
        draining.cancel();
        let result = match ended {
            Some(r) => r,
            None => {
                let mut stopped = None;
                if !token.is_cancelled() && !drain_delay.is_zero() {
                    tracing::info!(
                        drain_delay_secs = drain_delay.as_secs(),
                        "stopping: /health/ready answers 503; serving on for the drain delay"
                    );
                    tokio::select! {
                        r = &mut server => stopped = Some(r.map_err(anyhow::Error::from)),
                        () = tokio::time::sleep(drain_delay) => {}
                        () = token.cancelled() => {}
                    }
                }
                token.cancel();
                match stopped {
                    Some(r) => r,
                    None => drain(&mut server, grace).await,
                }
            }
        };
        token.cancel();

        // Sessions end (storing interrupted turns) and connections close; then the write-behind
        // drains what they queued. Both within the grace period.
        state.tasks.close();
        if tokio::time::timeout(grace, state.tasks.wait()).await.is_err() {
            tracing::warn!(
                left = state.tasks.len(),
                "session tasks still running after the grace period"
            );
        }
        // Job workers stop taking jobs and finish their runs before storage closes.
        workers.shutdown(grace).await;
        write_stop.cancel();
        write_tasks.close();
        if tokio::time::timeout(grace, write_tasks.wait()).await.is_err() {
            tracing::warn!(
                queued = state.write_behind.depth(),
                "write-behind not drained within the grace period: queued turns are lost"
            );
        }

        if let Some(conn) = redis {
            if let Err(e) = conn.pool.quit().await {
                tracing::warn!(error = %e, "redis quit failed");
            }
            match tokio::time::timeout(Duration::from_secs(2), conn.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::debug!(error = %e, "redis connection task ended with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "redis connection task failed"),
                Err(_) => tracing::warn!("redis connection task did not stop within 2 s"),
            }
        }
        if let Some(pool) = &state.db {
            pool.close().await;
        }
        // Last, when every span above has ended (the write-behind drain's included). It blocks
        // on the exporter's own thread, so off the runtime's workers.
        if let Err(e) = tokio::task::spawn_blocking(crate::telemetry::shutdown).await {
            tracing::warn!(error = %e, "traces: flushing the exporter failed");
        }
        tracing::info!("coachd stopped");
        result
    }
}

async fn drain<F>(server: &mut std::pin::Pin<&mut F>, grace: Duration) -> anyhow::Result<()>
where
    F: Future<Output = std::io::Result<()>>,
{
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    match tokio::time::timeout(grace, server.as_mut()).await {
        Ok(r) => r.map_err(anyhow::Error::from),
        Err(_) => {
            tracing::warn!("grace period over: dropping the requests still in flight");
            Ok(())
        }
    }
}

/// The router with its middleware: request ids, tracing, body limit, panic catcher, JSON 404/405.
pub fn build_router(state: AppState) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let max_body = state.settings.max_body_bytes;
    let body_timeout = state.settings.http.body_timeout;
    let node_id: Arc<str> = Arc::from(state.settings.cluster.node_id.as_str());
    let metrics = state.settings.metrics.enabled;
    let mut app = routes::router().merge(routes::jobs::router(state.settings.jobs.max_upload_bytes));
    if state.settings.chat_ui {
        app = app.merge(routes::chat::router());
    }
    let router = app
        .fallback(|| async { Error::NotFound("route".to_owned()) })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(
                    Error::bad_request("method_not_allowed", "method not allowed on this route").body(),
                ),
            )
                .into_response()
        })
        .layer(DefaultBodyLimit::max(max_body))
        // A body that sends nothing for this long fails its read (400), freeing the connection.
        .layer(RequestBodyTimeoutLayer::new(body_timeout))
        .layer(CatchPanicLayer::custom(|_| {
            Error::Internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(TraceLayer::new_for_http().make_span_with(move |req: &Request| {
            let id = req
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            // The node id on every request's log lines: with several nodes, which one served it.
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id, node_id = %node_id)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::capacity::refuse_past_capacity,
        ));
    // A layer on the router wraps each route, so it sees the matched route template; added last,
    // it is the outermost, so answers made by the layers inside (a caught panic) are counted too.
    let router = if metrics {
        router.layer(axum::middleware::from_fn(routes::prometheus::track))
    } else {
        router
    };
    router.with_state(state)
}

/// Raises the open-file limit, works out how many client connections it leaves room for, says so,
/// and wraps the listener to count them (`crate::listener`).
fn counting_listener<L: axum::serve::Listener>(
    listener: L,
    limits: &crate::listener::ConnectionLimits,
) -> crate::listener::CountingListener<L> {
    use crate::listener::{OpenFiles, capacity, raise_open_file_limit};
    let files = match raise_open_file_limit() {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit; assuming 1024");
            OpenFiles {
                soft: 1_024,
                hard: 1_024,
                raised_from: None,
            }
        }
    };
    let capacity = capacity(limits, &files);
    let refusal_room = usize::try_from(limits.fd_reserve / 2).unwrap_or(usize::MAX);
    tracing::info!(
        open_files = files.soft,
        open_files_hard = files.hard,
        raised_from = files.raised_from,
        max_connections = capacity,
        fd_reserve = limits.fd_reserve,
        "connection capacity: past it, new connections get 503 with Retry-After (WebSocket: close 1013)"
    );
    let needed = (capacity as u64)
        .saturating_mul(2)
        .saturating_add(limits.fd_reserve);
    if limits.max_connections > 0 && needed > files.soft {
        tracing::warn!(
            max_connections = capacity,
            open_files = files.soft,
            "COACHD_MAX_CONNECTIONS is more than the open-file limit holds (two descriptors per relayed stream plus the reserve): accept may fail with EMFILE before it is reached"
        );
    }
    crate::listener::CountingListener::new(listener, capacity, refusal_room)
}

/// The HTTP client of the transcription upstream and of docling-serve: TCP_NODELAY, the LLM connect timeout (each
/// request has its own overall limit, `COACHD_TRANSCRIBE_TIMEOUT_SECS`).
fn transcribe_http(settings: &Settings) -> Result<reqwest::Client, StartupError> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(settings.llm.llm_timeouts.connect)
        .build()
        .map_err(|e| StartupError::Llm(format!("cannot build the transcription HTTP client: {e}")))
}

/// The router of `coachd worker`: the health routes only (for liveness and readiness probes).
pub fn build_health_router(state: AppState) -> Router {
    routes::health::router()
        .merge(routes::prometheus::router())
        .fallback(|| async { Error::NotFound("route".to_owned()) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::capacity::refuse_past_capacity,
        ))
        .with_state(state)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
