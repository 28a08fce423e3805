//! # coachd
//!
//! A streaming-first realtime server for AI coaching conversations. It holds live sessions over
//! HTTP turns, SSE and WebSocket, streams LLM tokens from providers straight to clients, and writes
//! finished turns to Redis (context) and PostgreSQL + pgvector (memory) off the token path.
//!
//! # Layout
//! - [`config`]: typed settings from the environment and `.env`, validated at start.
//! - [`error`]: the one error type; HTTP status, JSON body, SSE event and WebSocket close code.
//! - [`auth`]: API keys and end-user JWTs, as extractors with one rule per route family.
//! - [`telemetry`]: tracing set-up (text or JSON).
//! - [`startup`]: builds state and router, binds, serves, shuts down gracefully.
//! - [`state`]: the shared handles every handler gets.
//! - [`db`], [`redis`]: connections to PostgreSQL (with migrations) and Redis.
//! - [`llm`]: providers (OpenAI-compatible, Anthropic, offline), task routing, timeouts.
//! - [`context`]: short-term session context and rate limits (Redis or in-process).
//! - [`memory`]: long-term coach memory (PostgreSQL + pgvector or in-process); [`embed`]: embedders.
//! - [`session`]: the ConnectionManager and one task per live session (turn order, cancel,
//!   event log, replay); [`transport`]: the Transport trait and its WebSocket, SSE and HTTP adapters.
//! - [`persist`]: write-behind of finished turns to the context cache and memory store.
//! - [`coach`]: personas, prompt assembly, session notes.
//! - [`context`]: short-term session context and rate limits (Redis or in-process).
//! - [`memory`]: long-term coach memory (PostgreSQL + pgvector or in-process); [`embed`]: embedders.
//! - [`health`]: dependency checks; [`routes`]: the HTTP handlers.
//! - `fake_upstream` (feature `fake-upstream`): the fake LLM server for tests and benchmarks.

pub mod auth;
pub mod coach;
pub mod config;
pub mod context;
pub mod db;
pub mod embed;
pub mod error;
#[cfg(feature = "fake-upstream")]
pub mod fake_upstream;
pub mod health;
pub mod llm;
pub mod memory;
pub mod persist;
pub mod redis;
pub mod routes;
pub mod secret;
pub mod session;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod transport;

pub use config::Settings;
pub use error::Error;
pub use startup::Application;
