//! The realtime section: the session manager's limits (with prompt assembly), the write-behind,
//! session tokens and the transports' heartbeats and caps, each built as the type its consumer
//! takes, so start-up hands them over without copying field by field.

use std::time::Duration;

use super::ConfigError;
use super::source::{DAY_SECS, Reader, Source};
use crate::coach::prompt::PromptLimits;
use crate::memory::MemorySettings;
use crate::persist::WriteBehindConfig;
use crate::secret::Secret;
use crate::session::SessionLimits;

/// First write-behind retry delay, doubled per attempt.
const WRITE_BEHIND_RETRY_BASE: Duration = Duration::from_millis(100);

/// Settings of live sessions and their transports.
#[derive(Debug, Clone)]
pub struct RealtimeSettings {
    /// The session manager: `COACHD_MAX_SESSIONS`, `COACHD_SESSION_IDLE_SECS`,
    /// `COACHD_SESSION_LOG_EVENTS`, `COACHD_CLIENT_QUEUE_EVENTS`, `COACHD_MAX_QUEUED_TURNS`,
    /// `COACHD_MAX_TEXT_CHARS`, `COACHD_MAX_ACTIONS`, `COACHD_NOTES_MAX_TURNS`,
    /// `COACHD_ENDED_SESSIONS_KEPT` and the prompt's `COACHD_PROMPT_*`.
    pub sessions: SessionLimits,
    /// `COACHD_WRITE_BEHIND_QUEUE`, `COACHD_WRITE_BEHIND_WORKERS`, `COACHD_WRITE_BEHIND_CONCURRENCY`,
    /// `COACHD_WRITE_BEHIND_MAX_ATTEMPTS`.
    pub write_behind: WriteBehindConfig,
    /// `COACHD_SEND_TIMEOUT_MS`: longest wait to hand one event to a connection.
    pub send_timeout: Duration,
    /// `COACHD_SESSION_TOKEN_SECRET`: key of session tokens (random per process when unset).
    pub token_secret: Option<Secret>,
    /// `COACHD_SESSION_TOKEN_TTL_SECS`.
    pub token_ttl: Duration,
    /// `COACHD_SSE_HEARTBEAT_SECS` (formerly `COACHD_SSE_KEEP_ALIVE_SECS`, still read): interval
    /// of the `:` comment every SSE response sends while no event does, session and stateless
    /// streams alike.
    pub sse_heartbeat: Duration,
    /// `COACHD_WS_PING_SECS`.
    pub ws_ping: Duration,
    /// `COACHD_WS_PONG_TIMEOUT_SECS`.
    pub ws_pong_timeout: Duration,
    /// `COACHD_WS_MAX_MESSAGE_BYTES`.
    pub ws_max_message_bytes: usize,
    /// `COACHD_WS_READ_BUFFER_BYTES`: per-connection read buffer and the most one read takes;
    /// a frame larger than it gets room for all of it. Client frames are small (a chat
    /// message), and every idle connection holds this buffer.
    pub ws_read_buffer_bytes: usize,
    /// `COACHD_WS_MAX_BAD_FRAMES`: consecutive malformed frames before closing with 1008.
    pub ws_max_bad_frames: u32,
}

/// Reads the section; `memory` bounds the prompt's memory query and the write-behind's memory text.
pub(super) fn read<S: Source>(
    r: &Reader<'_, S>,
    memory: &MemorySettings,
    warnings: &mut Vec<String>,
) -> Result<RealtimeSettings, ConfigError> {
    let prompt = PromptLimits {
        context_messages: r.int("COACHD_PROMPT_CONTEXT_MESSAGES", 20, 0, 1_000)?,
        memories: r.int("COACHD_PROMPT_MEMORIES", 5, 0, 100)?,
        min_similarity: r.fraction("COACHD_PROMPT_MIN_SIMILARITY", 0.3)?,
        fetch_timeout: r.millis("COACHD_PROMPT_FETCH_TIMEOUT_MS", 1_500, 1, 60_000)?,
        query_max_bytes: memory.max_text_bytes,
    };
    Ok(RealtimeSettings {
        sessions: SessionLimits {
            max_sessions: r.int("COACHD_MAX_SESSIONS", 10_000, 1, 10_000_000)?,
            idle_timeout: r.seconds("COACHD_SESSION_IDLE_SECS", 1_800, 1, 7 * DAY_SECS)?,
            log_events: r.int("COACHD_SESSION_LOG_EVENTS", 2_048, 16, 1_000_000)?,
            client_queue: r.int("COACHD_CLIENT_QUEUE_EVENTS", 1_024, 1, 1_000_000)?,
            max_queued_turns: r.int("COACHD_MAX_QUEUED_TURNS", 4, 0, 1_000)?,
            max_text_chars: r.int("COACHD_MAX_TEXT_CHARS", 8_000, 1, 1_000_000)?,
            max_actions: r.int("COACHD_MAX_ACTIONS", 5, 0, 100)?,
            notes_max_turns: r.int("COACHD_NOTES_MAX_TURNS", 200, 1, 10_000)?,
            ended_kept: r.int("COACHD_ENDED_SESSIONS_KEPT", 1_000, 1, 1_000_000)?,
            prompt,
        },
        write_behind: WriteBehindConfig {
            workers: r.int("COACHD_WRITE_BEHIND_WORKERS", 2, 1, 64)?,
            concurrency: r.int("COACHD_WRITE_BEHIND_CONCURRENCY", 16, 1, 1_024)?,
            queue_capacity: r.int("COACHD_WRITE_BEHIND_QUEUE", 10_000, 1, 10_000_000)?,
            max_attempts: r.int("COACHD_WRITE_BEHIND_MAX_ATTEMPTS", 8, 1, 100)?,
            retry_base: WRITE_BEHIND_RETRY_BASE,
            memory_max_bytes: memory.max_text_bytes,
        },
        send_timeout: r.millis("COACHD_SEND_TIMEOUT_MS", 5_000, 1, 600_000)?,
        token_secret: r.secret("COACHD_SESSION_TOKEN_SECRET"),
        token_ttl: r.seconds("COACHD_SESSION_TOKEN_TTL_SECS", 3_600, 1, 30 * DAY_SECS)?,
        sse_heartbeat: r.renamed(
            "COACHD_SSE_HEARTBEAT_SECS",
            "COACHD_SSE_KEEP_ALIVE_SECS",
            warnings,
            |var| r.seconds(var, 15, 1, 3_600),
        )?,
        ws_ping: r.seconds("COACHD_WS_PING_SECS", 25, 1, 3_600)?,
        ws_pong_timeout: r.seconds("COACHD_WS_PONG_TIMEOUT_SECS", 8, 1, 3_600)?,
        ws_max_message_bytes: r.int("COACHD_WS_MAX_MESSAGE_BYTES", 65_536, 256, 64 << 20)?,
        ws_read_buffer_bytes: r.int("COACHD_WS_READ_BUFFER_BYTES", 1_024, 256, 16 << 20)?,
        ws_max_bad_frames: r.int("COACHD_WS_MAX_BAD_FRAMES", 10, 0, 1_000)?,
    })
}
