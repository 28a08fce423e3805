//! Short-term conversation context and rate limits: the [`ContextCache`] trait with a Redis
//! implementation (shared by every coachd instance) and an in-process one (no external service),
//! which behave the same, plus the per-user rate limiter in [`rate_limit`].
//!
//! Key patterns and TTLs are the reference coach service's; see [`keys`].

pub mod in_process;
pub mod rate_limit;
pub mod redis;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::error::StoreError;
pub use in_process::InProcessContextCache;
pub use redis::RedisContextCache;

/// One message of a conversation, as kept in a context list (JSON-encoded in Redis).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextMessage {
    /// `user`, `assistant` or `system`.
    pub role: String,
    /// The text.
    pub content: String,
    /// When it was said.
    pub timestamp: DateTime<Utc>,
    /// Anything else a caller wants to keep with it (turn number, model, ...).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

impl ContextMessage {
    /// A message stamped now, without metadata.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            timestamp: Utc::now(),
            metadata: serde_json::Value::Null,
        }
    }
}

/// One finished turn of a session, the identity under which its messages are appended once.
#[derive(Debug, Clone, Copy)]
pub struct TurnKey<'a> {
    /// Session.
    pub session_id: &'a str,
    /// User.
    pub user_id: &'a str,
    /// Coach.
    pub coach_id: &'a str,
    /// Turn number in the session.
    pub turn_number: u32,
}

/// How far write-behind has stored a session: its turns through `turn`, which ended at seq
/// `end_seq` of the session's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredThrough {
    /// The turn.
    pub turn: u32,
    /// The seq of its `turn_end`.
    pub end_seq: u64,
}

impl StoredThrough {
    fn encode(self) -> String {
        format!("{} {}", self.turn, self.end_seq)
    }

    fn decode(s: &str) -> Option<Self> {
        let (turn, seq) = s.split_once(' ')?;
        Some(Self {
            turn: turn.parse().ok()?,
            end_seq: seq.parse().ok()?,
        })
    }
}

impl TurnKey<'_> {
    /// The turn's mark in a list's set of stored turns.
    pub(crate) fn mark(&self) -> String {
        format!("{}:{}", self.session_id, self.turn_number)
    }
}

/// Short-term context of sessions and user–coach pairs, and each user's last session.
/// Every list is capped at [`ContextLimits::max_messages`] (the oldest messages go first) and
/// expires [`ContextLimits::session_ttl`] after its last append.
#[async_trait]
pub trait ContextCache: Send + Sync + fmt::Debug {
    /// Appends to the session's list, refreshes its TTL, and records the session as the user's last.
    async fn append_message(
        &self,
        session_id: &str,
        user_id: &str,
        coach_id: &str,
        msg: ContextMessage,
    ) -> Result<(), StoreError> {
        self.append_messages(session_id, user_id, coach_id, vec![msg])
            .await
    }

    /// [`append_message`](Self::append_message) of several messages at once, in order: all of
    /// them or none, so a retried turn never stores its user message twice.
    async fn append_messages(
        &self,
        session_id: &str,
        user_id: &str,
        coach_id: &str,
        msgs: Vec<ContextMessage>,
    ) -> Result<(), StoreError>;

    /// [`append_messages`](Self::append_messages) of one finished turn, at most once: a second
    /// write of the same turn answers `false` and stores nothing. Write-behind needs this where
    /// a write can repeat: a retry after a reply Redis applied but never sent, or a turn that two
    /// nodes each ended while Redis was out of reach (the old owner finishing it, the new owner
    /// ending it as interrupted). Each list remembers the turns it holds for as long as it lives.
    async fn append_turn(&self, turn: &TurnKey<'_>, msgs: Vec<ContextMessage>) -> Result<bool, StoreError>;

    /// [`append_turn`](Self::append_turn) for the user–coach context.
    async fn append_user_coach_turn(
        &self,
        turn: &TurnKey<'_>,
        msgs: Vec<ContextMessage>,
    ) -> Result<bool, StoreError>;

    /// Records that every store holds the session's turns through `turn`, whose `turn_end` has
    /// seq `end_seq` in the session's log: a node that takes the session over re-stores the
    /// finished turns after it (write-behind lives in memory, so a node killed with turns
    /// still queued would otherwise lose them). Expires with the session's context.
    async fn mark_stored(&self, session_id: &str, mark: StoredThrough) -> Result<(), StoreError>;

    /// What [`mark_stored`](Self::mark_stored) last recorded for the session.
    async fn stored_through(&self, session_id: &str) -> Result<Option<StoredThrough>, StoreError>;

    /// The `limit` most recent messages of a session, oldest first.
    async fn recent_messages(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<ContextMessage>, StoreError>;

    /// Appends to the user–coach context (conversation outside a formal session).
    async fn append_user_coach(
        &self,
        user_id: &str,
        coach_id: &str,
        msg: ContextMessage,
    ) -> Result<(), StoreError> {
        self.append_user_coach_messages(user_id, coach_id, vec![msg])
            .await
    }

    /// [`append_user_coach`](Self::append_user_coach) of several messages at once, in order: all
    /// of them or none.
    async fn append_user_coach_messages(
        &self,
        user_id: &str,
        coach_id: &str,
        msgs: Vec<ContextMessage>,
    ) -> Result<(), StoreError>;

    /// The `limit` most recent messages of the user–coach context, oldest first.
    async fn user_coach_context(
        &self,
        user_id: &str,
        coach_id: &str,
        limit: usize,
    ) -> Result<Vec<ContextMessage>, StoreError>;

    /// Records `session_id` as the user's last session for [`ContextLimits::user_session_ttl`].
    async fn set_last_session(&self, user_id: &str, session_id: &str) -> Result<(), StoreError>;

    /// The user's last session, if it has not expired.
    async fn last_session(&self, user_id: &str) -> Result<Option<String>, StoreError>;

    /// Forgets a session's context.
    async fn clear_session(&self, session_id: &str) -> Result<(), StoreError>;
}

/// The TTLs and the list cap both implementations apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLimits {
    /// `SESSION_CONTEXT_TTL`: life of session and user–coach lists after their last append.
    pub session_ttl: Duration,
    /// `USER_SESSION_TTL`: life of a user's last-session pointer.
    pub user_session_ttl: Duration,
    /// `COACHD_CONTEXT_MAX_MESSAGES`: longest list.
    pub max_messages: usize,
}

/// The reference service's key patterns, without the deployment prefix.
pub mod keys {
    /// `session:{session_id}:context`
    pub fn session_context(session_id: &str) -> String {
        format!("session:{session_id}:context")
    }

    /// `session:{session_id}:stored`: how far write-behind has stored the session.
    pub fn session_stored(session_id: &str) -> String {
        format!("session:{session_id}:stored")
    }

    /// `user:{user_id}:last_session`
    pub fn last_session(user_id: &str) -> String {
        format!("user:{user_id}:last_session")
    }

    /// `user:{user_id}:coach:{coach_id}:context`
    pub fn user_coach_context(user_id: &str, coach_id: &str) -> String {
        format!("user:{user_id}:coach:{coach_id}:context")
    }

    /// `ratelimit:{user_id}:{endpoint}`
    pub fn rate_limit(user_id: &str, endpoint: &str) -> String {
        format!("ratelimit:{user_id}:{endpoint}")
    }
}
