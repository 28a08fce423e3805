//! # coachd
//!
//! A streaming-first realtime server for AI coaching conversations. It holds live sessions over
//! HTTP turns, SSE and WebSocket, streams LLM tokens from providers straight to clients, and writes
//! finished turns to Redis (context) and PostgreSQL + pgvector (memory) off the token path.
//!
//! # Layout
//! - [`config`]: typed settings from the environment and `.env`, validated at start; one reader
//!   per section builds the settings type its consumer takes.
//! - [`secret`]: values that never reach a log ([`secret::Secret`], [`secret::ServiceUrl`]).
//! - [`error`]: the one error type; HTTP status, JSON body, SSE event and WebSocket close code,
//!   and the store errors' mapping into it.
//! - [`auth`]: API keys and end-user JWTs, with one rule per route family.
//! - [`telemetry`]: tracing set-up (text or JSON); [`metric`]: the Prometheus metrics (names,
//!   the process-wide recorder, the handles the token path keeps), served at `/metrics`.
//! - [`startup`]: builds state and router, binds, serves, shuts down gracefully.
//! - [`state`]: the shared handles every handler gets.
//! - [`db`], [`redis`]: connections to PostgreSQL (with migrations) and Redis.
//! - [`llm`]: providers (OpenAI-compatible, Anthropic, offline), task routing, timeouts.
//! - [`context`]: short-term session context and the rate limiter (Redis or in-process).
//! - [`memory`]: long-term coach memory (PostgreSQL + pgvector or in-process); [`embed`]: embedders.
//! - [`session`]: the ConnectionManager and one task per live session (turn order, cancel,
//!   event log, replay), and with Redis the shared store and cluster that let any node serve any
//!   session; [`transport`]: the Transport trait and its WebSocket, SSE and HTTP adapters.
//! - [`persist`]: write-behind of finished turns to the context cache and memory store.
//! - [`coach`]: personas, prompt assembly, session notes.
//! - [`jobs`]: async jobs (analysis, chains) on apalis: PostgreSQL or in-memory queues, workers
//!   in-process or as `coachd worker`, job records with progress events and uploads.
//! - [`transcribe`]: speech to text through an OpenAI-compatible `/audio/transcriptions`, long
//!   audio decoded and split into chunks.
//! - [`extract`]: documents (PDF, DOCX, PPTX, XLSX, HTML, Markdown, text) to Markdown, parsed in
//!   a bounded child process (`coachd __extract`) or by docling-serve.
//! - [`health`]: dependency checks; [`routes`]: the HTTP handlers, their extractors
//!   (`routes::extract`), rate-limit enforcement (`routes::rate_limit`) and the shared request
//!   validators (`routes::validate`).
//! - `fake_upstream` (feature `fake-upstream`): the fake LLM server for tests and benchmarks.
//!
//! # Layers
//! Imports point down; no two modules import each other (`tests/layers.rs` checks both). From the
//! bottom:
//! 1. `secret`, `redis`, `embed`, `error`, `metric`: leaves every layer may use.
//! 2. `context`, `memory`, `llm`, `transcribe`, `extract`: the stores, the LLM gateway, the
//!    speech-to-text client and document extraction, each owning its settings type.
//! 3. `persist`, `coach`, `session`, `transport`: the realtime core; `jobs` on top of `coach`.
//! 4. `config`: reads the environment into the settings types of the layers below, so it sits
//!    above them and none of them imports it.
//! 5. `auth`, `db`, `health`, `telemetry`: take the settings or the handles they need.
//! 6. The composition layer, `startup`, `state` and `routes`: the only modules that see
//!    `AppState` or `StartupError`.
//!
//! # Follow one token
//! To read the token path from the upstream socket to the client's, in order:
//! 1. a provider file, e.g. `llm::openai`: the request, and the stream decoded into `LlmEvent`s;
//! 2. `llm::sse`: the SSE line decoder every provider's stream goes through;
//! 3. `llm::timeout`: the first-token, idle and total deadlines around that stream;
//! 4. `llm::router`: retries and fallbacks before the first token, then the chosen stream;
//! 5. `session::actor`: the session task that owns turn order and turns each delta into an event;
//! 6. `session::log`: the event log that numbers events (`seq`), keeps them for replay and fans
//!    them out to bounded per-subscriber queues;
//! 7. `transport` (its `drive` loop): one connection's loop over its subscription and its client;
//! 8. `transport::ws` and `transport::sse`: the adapters that write the event to the socket.

pub mod auth;
pub mod coach;
pub mod config;
pub mod context;
pub mod db;
pub mod embed;
pub mod error;
pub mod extract;
#[cfg(feature = "fake-upstream")]
pub mod fake_upstream;
pub mod health;
pub mod jobs;
pub mod listener;
pub mod llm;
pub mod memory;
pub mod metric;
pub mod persist;
pub mod redis;
pub mod routes;
pub mod secret;
pub mod server;
pub mod session;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod transcribe;
pub mod transport;

pub use config::Settings;
pub use error::Error;
pub use startup::Application;
