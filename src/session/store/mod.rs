//! The shared session store of a multi-node deployment: each session's event log (appended by
//! its owner, read by every node), its owner lease with a fencing token, and the metadata any
//! node needs to answer for it or take it over. [`RedisEventStore`] is the real one (Redis
//! Streams, one Lua script per append); [`InProcessEventStore`] has the same semantics in memory,
//! so the shared test suite (`tests/event_store.rs`) and the actor's paused-time tests run on both.
//!
//! The seq of an event is assigned by the owner's in-process log (so local connections never
//! wait on Redis); the append refuses, atomically with the fencing check, every seq that is not
//! above the stored one, so the stream and the published messages carry one order. The epoch
//! beside the counter is new whenever the counter was missing (Redis lost it): a reader that saw
//! another epoch, or whose position the stream no longer covers, must resync.

pub mod in_process;
pub mod redis;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::error::StoreError;
pub use in_process::InProcessEventStore;
pub use redis::RedisEventStore;

use super::event::{EndedBy, Published, SessionStatus, TransportKind};

/// An owner lease: the node holding it and its fencing token (a counter per session, raised by
/// every acquisition, so a stale owner's token never matches again).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The owning node's id.
    pub node: String,
    /// The fencing token.
    pub fence: u64,
}

impl Lease {
    /// The value stored under the lease key: `{node}/{fence}`.
    pub fn value(&self) -> String {
        format!("{}/{}", self.node, self.fence)
    }

    /// Reads a stored lease value.
    pub fn parse(value: &str) -> Option<Self> {
        let (node, fence) = value.rsplit_once('/')?;
        Some(Lease {
            node: node.to_owned(),
            fence: fence.parse().ok()?,
        })
    }
}

/// The turn that was streaming when the metadata was last written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenTurn {
    /// Its number.
    pub number: u32,
    /// The seq of its `turn_start`.
    pub start_seq: u64,
    /// What the user said.
    pub user_text: String,
}

/// What the owner's writer records with each append: enough to rebuild the session elsewhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Turns finished.
    pub turns_done: u32,
    /// The next turn number to hand out.
    pub next_turn: u32,
    /// The turn streaming now.
    pub open_turn: Option<OpenTurn>,
}

/// A session as every node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// Id.
    pub session_id: String,
    /// Owner (end user).
    pub user_id: String,
    /// Coach.
    pub coach_id: String,
    /// Transport asked for at creation.
    pub transport: TransportKind,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Live or over.
    pub status: SessionStatus,
    /// How it ended, once it did.
    pub ended_by: Option<EndedBy>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// Turn counters and the open turn.
    pub progress: Progress,
}

/// The answer to an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Written (events at or below the stored seq were skipped); the log's epoch and last seq.
    Ok {
        /// The epoch of the log.
        epoch: String,
        /// The seq of the last event in the log.
        last_seq: u64,
    },
    /// The lease is another's (or gone): this node may not write to the session any more.
    Fenced,
}

/// A read of the log.
#[derive(Debug, Clone)]
pub struct History {
    /// The log's epoch; `None` when the session has no log (never written, or lost).
    pub epoch: Option<String>,
    /// The seq of the last event written.
    pub last_seq: u64,
    /// The seq of the oldest event still kept.
    pub oldest_seq: Option<u64>,
    /// Events after the requested seq, oldest first (at most the requested number).
    pub events: Vec<Arc<Published>>,
}

impl History {
    /// Whether the log still holds every event after `after_seq`.
    pub fn covers(&self, after_seq: u64) -> bool {
        after_seq >= self.last_seq || self.oldest_seq.is_some_and(|oldest| oldest <= after_seq + 1)
    }
}

/// How long a session's shared keys live and how much of its log they keep.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Events kept per session log (trimmed approximately, as `MAXLEN ~`).
    pub log_events: usize,
    /// Time to live of a session's keys after its last write (lease renewals refresh it).
    pub session_ttl: std::time::Duration,
    /// Time to live of an owner lease unless renewed.
    pub lease_ttl: std::time::Duration,
}

/// The shared session store.
#[async_trait]
pub trait EventStore: Send + Sync + fmt::Debug {
    /// Records a new session (or records it again after the store lost it) and gives `node` its
    /// lease; `None` when a live lease is held already (another node took the session over while
    /// this one could not reach the store), so a re-registration never steals a lease.
    async fn create(&self, meta: &SessionMeta, node: &str) -> Result<Option<Lease>, StoreError>;

    /// Takes the lease of a session whose lease is free; `None` when another node holds it.
    async fn acquire(&self, session_id: &str, node: &str) -> Result<Option<Lease>, StoreError>;

    /// Extends a lease (and the session's keys); `false` when it is not ours any more.
    async fn renew(&self, session_id: &str, lease: &Lease) -> Result<bool, StoreError>;

    /// Gives a lease up (the session stays live for the next node to take over).
    async fn release(&self, session_id: &str, lease: &Lease) -> Result<bool, StoreError>;

    /// Who holds the lease now.
    async fn owner(&self, session_id: &str) -> Result<Option<Lease>, StoreError>;

    /// Appends events (ascending seq), publishing each to the session's channel, and records the
    /// progress as of the last of them (only a turn's start or end changes it, so a batch without
    /// one may leave it as stored), all only if `lease` is still the session's lease.
    async fn append(
        &self,
        session_id: &str,
        lease: &Lease,
        events: &[Arc<Published>],
        progress: &Progress,
    ) -> Result<Appended, StoreError>;

    /// Up to `max` events after `after_seq`.
    async fn history(&self, session_id: &str, after_seq: u64, max: usize) -> Result<History, StoreError>;

    /// The session's metadata.
    async fn meta(&self, session_id: &str) -> Result<Option<SessionMeta>, StoreError>;

    /// Marks the session ended and gives up the lease (only if `lease` is still its lease).
    async fn end(
        &self,
        session_id: &str,
        lease: &Lease,
        ended_by: EndedBy,
        progress: &Progress,
    ) -> Result<bool, StoreError>;
}

/// A payload of the session channel: `{epoch} {event json}`.
pub fn channel_message(epoch: &str, json: &str) -> String {
    format!("{epoch} {json}")
}

/// Reads a session channel payload into its epoch and event.
pub fn parse_channel_message(payload: &str) -> Option<(&str, Arc<Published>)> {
    let (epoch, json) = payload.split_once(' ')?;
    Some((epoch, decode_event(json)?))
}

/// An event as logged (its JSON text) back into a [`Published`].
pub fn decode_event(json: &str) -> Option<Arc<Published>> {
    let event: super::ServerEvent = serde_json::from_str(json).ok()?;
    Some(Arc::new(Published::new(&event.session_id, event.seq, event.body)))
}

/// A fresh epoch: random, short, without spaces.
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}
