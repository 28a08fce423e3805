//! Live sessions: the ConnectionManager (registry, cap, statistics), one task per session that
//! owns turn order, cancellation and the event log, the wire frames of `proto/`, and the
//! short-lived tokens browsers use to attach over SSE and WebSocket; with Redis, the shared
//! [`store`] and the [`cluster`] that let any node serve any session.

mod actor;
pub mod cluster;
pub mod event;
pub mod latency;
pub mod log;
pub mod manager;
mod ring;
pub mod stats;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub mod token;

pub use event::{ClientFrame, EventBody, ServerEvent, TurnMode};
pub use manager::{ConnectionManager, Deps, EndOutcome, SessionHandle, SessionInfo, SessionLimits, Stats};
