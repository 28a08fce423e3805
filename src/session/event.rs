//! The wire frames of a session, mirroring `proto/` (the JSON Schema every transport shares):
//! frames a client sends, and events the server emits. Every server event carries `session_id`
//! and `seq`; events are serialised once, when published, and shared by every transport.

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::coach::notes::Notes;
use crate::error::Error;
use crate::llm::{LlmError, Usage};

/// How a `user_message` sent while a reply streams is handled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TurnMode {
    /// Wait for the current reply to finish (default).
    #[default]
    Queue,
    /// Cancel the current reply (stored as interrupted) and answer this one at once.
    Interrupt,
}

/// A frame from the client (WebSocket text frames; the HTTP routes map onto the same frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// A user turn.
    UserMessage {
        /// What the user said.
        text: String,
        /// Queue behind the current reply, or interrupt it.
        #[serde(default)]
        mode: TurnMode,
        /// The client's own id for this message, echoed in `turn_start`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
    },
    /// Stop the reply being generated now.
    Cancel,
    /// Replay every event after `after_seq` (after a reconnect).
    Resume {
        /// The last seq the client has seen.
        after_seq: u64,
    },
    /// Keepalive; answered with `pong`.
    Ping {
        /// Echoed in the `pong`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
}

/// Why a turn ended, as `turn_end.finish_reason` says it: the provider's own reason when the
/// reply ran to its end, or how it was cut short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished.
    Stop,
    /// The token limit was reached.
    Length,
    /// A content filter stopped it.
    ContentFilter,
    /// The model asked for a tool.
    ToolCalls,
    /// Another reason the provider gave, passed on as it came.
    Other(String),
    /// A `cancel` stopped it.
    Cancelled,
    /// A message sent with mode `interrupt` replaced it.
    Interrupted,
    /// The server shut down while it streamed.
    ServerShutdown,
    /// The session ended while it streamed.
    SessionEnded,
    /// It failed; the `error` event before the `turn_end` says why.
    Error,
}

impl FinishReason {
    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Other(reason) => reason,
            FinishReason::Cancelled => "cancelled",
            FinishReason::Interrupted => "interrupted",
            FinishReason::ServerShutdown => "server_shutdown",
            FinishReason::SessionEnded => "session_ended",
            FinishReason::Error => "error",
        }
    }

    /// Reads a wire name (any name not listed is a provider's own reason).
    pub fn from_wire(name: &str) -> Self {
        match name {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            "content_filter" => FinishReason::ContentFilter,
            "tool_calls" => FinishReason::ToolCalls,
            "cancelled" => FinishReason::Cancelled,
            "interrupted" => FinishReason::Interrupted,
            "server_shutdown" => FinishReason::ServerShutdown,
            "session_ended" => FinishReason::SessionEnded,
            "error" => FinishReason::Error,
            other => FinishReason::Other(other.to_owned()),
        }
    }

    /// Whether the reply was cut short (cancelled, interrupted, or ended with the session or
    /// server) rather than finished or failed.
    pub fn is_interruption(&self) -> bool {
        matches!(
            self,
            FinishReason::Cancelled
                | FinishReason::Interrupted
                | FinishReason::ServerShutdown
                | FinishReason::SessionEnded
        )
    }
}

impl From<crate::llm::FinishReason> for FinishReason {
    fn from(reason: crate::llm::FinishReason) -> Self {
        use crate::llm::FinishReason as P;
        match reason {
            P::Stop => FinishReason::Stop,
            P::Length => FinishReason::Length,
            P::ContentFilter => FinishReason::ContentFilter,
            P::ToolCalls => FinishReason::ToolCalls,
            P::Cancelled => FinishReason::Cancelled,
            P::Other(reason) => FinishReason::Other(reason),
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FinishReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FinishReason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(FinishReason::from_wire(&name))
    }
}

/// Whether a session is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// It takes turns.
    Active,
    /// It is over.
    Ended,
}

/// How a session ended, as the record of an ended session says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndedBy {
    /// A client ended it (or a one-turn session ended itself).
    Ended,
    /// The server shut down.
    Shutdown,
    /// It idled past its timeout with no connection.
    Expired,
}

/// Which transport a session was created for, or a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// A JSON reply per turn.
    Http,
    /// Server-sent events.
    Sse,
    /// WebSocket.
    #[serde(rename = "websocket")]
    WebSocket,
}

impl TransportKind {
    /// Reads a `transport` field (`ws` is accepted for `websocket`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "http" => Some(TransportKind::Http),
            "sse" => Some(TransportKind::Sse),
            "websocket" | "ws" => Some(TransportKind::WebSocket),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Http => "http",
            TransportKind::Sse => "sse",
            TransportKind::WebSocket => "websocket",
        }
    }
}

/// The body of an `error` event. Built by [`EventBody::error`] only, so every session error
/// carries the code, message and retryability that [`Error`] derives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEvent {
    /// Stable code.
    pub code: String,
    /// Safe to show.
    pub message: String,
    /// Whether trying again may work.
    pub retryable: bool,
    /// The turn it concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_number: Option<u32>,
    /// The provider failure behind it, kept for the HTTP turn, which answers a turn that failed
    /// before any text with this error's own type and status. Never on the wire.
    #[serde(skip)]
    pub failure: Option<LlmError>,
}

impl ErrorEvent {
    /// The client-facing error to answer an HTTP turn with, when the failure came from the
    /// provider (its status is the one `From<LlmError> for Error` decides).
    pub fn to_error(&self) -> Option<Error> {
        self.failure.clone().map(Error::from)
    }
}

/// What an `error` event reports; [`EventBody::error`] turns each into its code, message and
/// retryability.
#[derive(Debug)]
pub enum ErrorCause<'a> {
    /// A request that was refused (a malformed frame, a message the session did not take).
    Request(&'a Error),
    /// The provider failed during a turn.
    Provider(LlmError),
    /// The provider's stream ended without a finish reason (from this provider, when known).
    Incomplete(Option<crate::llm::ProviderKind>),
    /// The end-of-session notes could not be made.
    Notes(&'a Error),
    /// The session ended before a queued message was answered.
    TurnDropped,
    /// The server is shutting down: the session, or this connection, ends.
    ServerShutdown,
    /// This connection did not keep up with its queue and is closed.
    SlowClient,
    /// This connection was dropped by the server (an operator's disconnect); the session goes on.
    Disconnected,
}

/// The persona part of a `session` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonaInfo {
    /// Persona id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Domain.
    pub domain: String,
}

/// The state a `resync` event carries, for a client too far behind to replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    /// Whether the session is still live.
    pub status: SessionStatus,
    /// Turns finished so far.
    pub turn_count: u32,
    /// The reply streaming now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_turn: Option<PartialTurn>,
    /// The oldest seq still replayable.
    pub oldest_seq: u64,
    /// The latest seq.
    pub last_seq: u64,
}

/// A reply in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialTurn {
    /// Its turn number.
    pub turn_number: u32,
    /// The user's text.
    pub user_text: String,
    /// The reply so far.
    pub partial_text: String,
}

/// What a `job` event says: the job's event as its own stream (`/api/v1/jobs/{id}/events`) has
/// it, under the session's seq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobUpdate {
    /// The job.
    pub job_id: String,
    /// Its kind (`analyze`, `chain`, ...).
    pub kind: String,
    /// `queued`, `started`, `progress`, `retrying`, `succeeded`, `failed` or `cancelled`.
    pub event: String,
    /// The job's status after it.
    pub status: String,
    /// 0 to 1.
    pub progress: f32,
    /// Stage, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The run (1-based; 0 before the first).
    pub attempt: u32,
    /// The error of a `failed` or `retrying` event: `{code, message, retryable}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<serde_json::Value>,
}

/// The fields of a `session` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEvent {
    /// Owner.
    pub user_id: String,
    /// Coach.
    pub coach_id: String,
    /// The coach persona.
    pub persona: PersonaInfo,
    /// Whether the session is still live.
    pub status: SessionStatus,
    /// Turns finished so far.
    pub turn_count: u32,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// The fields of a `turn_end` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnEndEvent {
    /// Turn number.
    pub turn_number: u32,
    /// The whole reply (partial when interrupted).
    pub reply_text: String,
    /// Action items found in the reply.
    pub actions: Vec<String>,
    /// Token counts, when the provider reported them.
    pub usage: Option<Usage>,
    /// Why it ended: the provider's reason, or how it was cut short.
    pub finish_reason: FinishReason,
    /// True when cancelled, interrupted or failed before its end.
    pub interrupted: bool,
    /// Provider that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Model that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// What a server event says (the envelope adds `session_id` and `seq`).
///
/// Every body larger than a token's is boxed: a session's log holds its events by the
/// thousand, nearly all of them tokens, and each one is as large as the largest variant
/// (200 bytes before, 56 now; see the size test below and BENCHMARKS.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// Session state: at creation, at its end, and as the first event of a new connection.
    Session(Box<SessionEvent>),
    /// A turn began: the model is being asked.
    TurnStart {
        /// 1-based turn number.
        turn_number: u32,
        /// The user's text.
        user_text: String,
        /// The client's id of the message, if it sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
    },
    /// A piece of the reply.
    Token {
        /// Turn number.
        turn_number: u32,
        /// Text to append.
        text: String,
        /// 0-based index of this token in the turn.
        index: u32,
    },
    /// A turn ended (finished, cancelled, or failed).
    TurnEnd(Box<TurnEndEvent>),
    /// Something failed (built by [`EventBody::error`] only).
    Error(Box<ErrorEvent>),
    /// Session notes.
    Notes {
        /// The notes.
        notes: Box<Notes>,
    },
    /// The client is too far behind to replay; here is the state instead.
    Resync {
        /// Why.
        reason: String,
        /// The state.
        state: Box<SessionState>,
    },
    /// Progress of a job started from this session (`POST /api/v1/jobs` with its `session_id`):
    /// one event per change of the job, the last one with its final status.
    Job(Box<JobUpdate>),
    /// Answer to `ping`.
    Pong {
        /// The ping's nonce.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
}

impl EventBody {
    /// Every session `error` event body is built here, from what went wrong and the turn it
    /// concerns.
    pub fn error(cause: ErrorCause<'_>, turn_number: Option<u32>) -> Self {
        let (code, message, retryable, failure) = match cause {
            ErrorCause::Request(e) => (e.code().to_owned(), e.to_string(), e.retryable(), None),
            ErrorCause::Provider(failure) => {
                let e = Error::from(failure.clone());
                (e.code().to_owned(), e.to_string(), e.retryable(), Some(failure))
            }
            ErrorCause::Incomplete(provider) => (
                "upstream_incomplete".to_owned(),
                "the reply ended without a finish reason".to_owned(),
                true,
                provider.map(|provider| LlmError::Incomplete { provider }),
            ),
            ErrorCause::Notes(e) => (
                e.code().to_owned(),
                format!("notes could not be generated: {e}"),
                e.retryable(),
                None,
            ),
            ErrorCause::TurnDropped => (
                "turn_dropped".to_owned(),
                "the session ended before this message was answered".to_owned(),
                false,
                None,
            ),
            ErrorCause::ServerShutdown => (
                "server_shutdown".to_owned(),
                "the server is restarting; reconnect and resume".to_owned(),
                true,
                None,
            ),
            ErrorCause::SlowClient => (
                "slow_client".to_owned(),
                "stream closed: the client did not keep up; reconnect with Last-Event-ID to resume"
                    .to_owned(),
                true,
                None,
            ),
            ErrorCause::Disconnected => (
                "disconnected".to_owned(),
                "stream closed by the server; reconnect with Last-Event-ID to resume".to_owned(),
                true,
                None,
            ),
        };
        EventBody::Error(Box::new(ErrorEvent {
            code,
            message,
            retryable,
            turn_number,
            failure,
        }))
    }

    /// About how many bytes its JSON takes, to size the buffer once (escapes may add some).
    fn size_hint(&self) -> usize {
        match self {
            EventBody::Token { text, .. } => 64 + text.len(),
            EventBody::TurnStart { user_text, .. } => 96 + user_text.len(),
            EventBody::TurnEnd(end) => {
                320 + end.reply_text.len() + end.actions.iter().map(|a| a.len() + 3).sum::<usize>()
            }
            _ => 320,
        }
    }

    /// The event's type name, as on the wire (SSE `event:` field).
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Session(_) => "session",
            EventBody::TurnStart { .. } => "turn_start",
            EventBody::Token { .. } => "token",
            EventBody::TurnEnd(_) => "turn_end",
            EventBody::Error(_) => "error",
            EventBody::Notes { .. } => "notes",
            EventBody::Resync { .. } => "resync",
            EventBody::Pong { .. } => "pong",
            EventBody::Job(_) => "job",
        }
    }
}

/// A server event as sent: `{"type", "session_id", "seq", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEvent {
    /// The session.
    pub session_id: String,
    /// Monotonic per session; per-connection events (`pong`, `resync`, the connection's first
    /// `session`) carry the seq of the latest logged event.
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub body: EventBody,
}

/// The `id:`, `event:` and `data:` framing of an SSE event and its blank line, at most.
const SSE_OVERHEAD: usize = 64;

/// Most unused capacity an event's buffer keeps (see `Published::with_envelope`).
const MAX_SLACK: usize = 96;

/// A session's event envelope as JSON text, made once per session: `{"session_id":"…","seq":`
/// (the seq and the body follow).
pub fn envelope(session_id: &str) -> String {
    let id = serde_json::to_string(session_id).unwrap_or_else(|_| "\"\"".to_owned());
    format!(r#"{{"session_id":{id},"seq":"#)
}

/// Appends `n` in decimal, as serde_json writes it, without the formatting machinery.
fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// A published event: its typed body, and its bytes serialised once at publish into one shared
/// buffer. Every connection and the replay log hold an `Arc` of it; a WebSocket frame or an SSE
/// frame is a refcounted clone of those bytes, never a copy or a fresh encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// Its seq.
    pub seq: u64,
    /// What it says.
    pub body: EventBody,
    /// The SSE frame: `id: {seq}`, `event: {type}`, `data: {json}` and the blank line.
    pub sse: Bytes,
    /// The JSON text (a slice of the same buffer), as a WebSocket text frame sends it.
    pub json: Utf8Bytes,
}

impl Published {
    /// Serialises an event.
    pub fn new(session_id: &str, seq: u64, body: EventBody) -> Self {
        Self::with_envelope(&envelope(session_id), seq, body)
    }

    /// Serialises an event of the session whose [`envelope`] is given (made once per session).
    ///
    /// The bytes are those of [`ServerEvent`] (`session_id`, `seq`, then the body's `type` and
    /// fields), written in one pass into one buffer sized up front: the envelope, then the
    /// derived serialisation of the body, whose opening `{` becomes the `,` after `seq`. This
    /// is what `#[serde(flatten)]` produces, without its slower path through serde's buffered
    /// map serialiser.
    pub fn with_envelope(envelope: &str, seq: u64, body: EventBody) -> Self {
        let kind = body.kind();
        let mut buf = Vec::with_capacity(SSE_OVERHEAD + envelope.len() + body.size_hint());
        buf.extend_from_slice(b"id: ");
        push_u64(&mut buf, seq);
        buf.extend_from_slice(b"\nevent: ");
        buf.extend_from_slice(kind.as_bytes());
        buf.extend_from_slice(b"\ndata: ");
        let start = buf.len();
        buf.extend_from_slice(envelope.as_bytes());
        push_u64(&mut buf, seq);
        let brace = buf.len();
        // Serialising these plain structs cannot fail, and the body of an internally tagged
        // enum is always an object with at least its `type`; fall back to an error frame
        // regardless. serde_json writes no raw newline (they are escaped in strings), so
        // `data:` is one line.
        let written = match &body {
            // The token path, written by hand: the same bytes as the derived serialisation
            // (literal keys need no escaping; only the text does).
            EventBody::Token {
                turn_number,
                text,
                index,
            } => {
                buf.extend_from_slice(br#"{"type":"token","turn_number":"#);
                push_u64(&mut buf, u64::from(*turn_number));
                buf.extend_from_slice(br#","text":"#);
                let text_ok = serde_json::to_writer(&mut buf, text.as_str()).is_ok();
                buf.extend_from_slice(br#","index":"#);
                push_u64(&mut buf, u64::from(*index));
                buf.push(b'}');
                text_ok
            }
            _ => serde_json::to_writer(&mut buf, &body).is_ok() && buf.len() > brace + 2,
        };
        match buf.get_mut(brace) {
            Some(open @ b'{') if written => *open = b',',
            _ => {
                buf.truncate(brace);
                buf.extend_from_slice(
                    br#","type":"error","code":"internal","message":"unserialisable event","retryable":false}"#,
                );
            }
        }
        let end = buf.len();
        buf.extend_from_slice(b"\n\n");
        // The hint is generous for the bodies other than a token's (320 bytes and up), and the
        // log keeps an event for as long as the session lives: give back a large slack. A
        // token's slack is smaller than this, so the token path never reallocates here.
        if buf.capacity() - buf.len() > MAX_SLACK {
            buf.shrink_to_fit();
        }
        let sse = Bytes::from(buf);
        // Valid UTF-8: ASCII framing around JSON text, checked once here.
        let json =
            Utf8Bytes::try_from(sse.slice(start..end)).unwrap_or_else(|_| Utf8Bytes::from_static("{}"));
        Published { seq, body, sse, json }
    }

    /// Its type name.
    pub fn kind(&self) -> &'static str {
        self.body.kind()
    }

    /// For turn-scoped events, the turn.
    pub fn turn_number(&self) -> Option<u32> {
        match &self.body {
            EventBody::TurnStart { turn_number, .. } | EventBody::Token { turn_number, .. } => {
                Some(*turn_number)
            }
            EventBody::TurnEnd(end) => Some(end.turn_number),
            EventBody::Error(e) => e.turn_number,
            _ => None,
        }
    }

    /// Whether this is turn `turn`'s `turn_end`.
    pub fn ends_turn(&self, turn: u32) -> bool {
        matches!(&self.body, EventBody::TurnEnd(end) if end.turn_number == turn)
    }
}

/// Action items of a reply: its bulleted or numbered lines (at most `max`), without the markers.
pub fn extract_actions(reply: &str, max: usize) -> Vec<String> {
    reply
        .lines()
        .filter_map(|line| {
            let t = line.trim();
            let rest = t
                .strip_prefix("- [ ] ")
                .or_else(|| t.strip_prefix("- "))
                .or_else(|| t.strip_prefix("* "))
                .or_else(|| t.strip_prefix("• "))
                .or_else(|| {
                    let digits = t.find(|c: char| !c.is_ascii_digit())?;
                    (digits > 0).then_some(())?;
                    t[digits..]
                        .strip_prefix(". ")
                        .or_else(|| t[digits..].strip_prefix(") "))
                })?;
            let rest = rest.trim().trim_matches('*').trim();
            (!rest.is_empty()).then(|| rest.to_owned())
        })
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_buffer_keeps_little_slack_and_a_tokens_is_never_reallocated() {
        let env = envelope("6f1c1f9e-1b1a-4c7e-9a53-6b1e7d1c2f00");
        let pong = EventBody::Pong {
            nonce: Some("n".into()),
        };
        let Published { sse, json, .. } = Published::with_envelope(&env, 7, pong);
        drop(json);
        let Ok(buf) = sse.try_into_mut() else {
            panic!("the event's bytes are shared")
        };
        assert!(
            buf.capacity() - buf.len() <= MAX_SLACK,
            "{} of {}",
            buf.capacity(),
            buf.len()
        );
        // A token's buffer is sized by its hint, with less slack than the limit.
        let token = EventBody::Token {
            turn_number: 1,
            text: "hello".into(),
            index: 3,
        };
        let hint = SSE_OVERHEAD + env.len() + token.size_hint();
        let e = Published::with_envelope(&env, 7, token);
        assert!(
            hint - e.sse.len() <= MAX_SLACK,
            "a token's slack {} must stay under the limit",
            hint - e.sse.len()
        );
    }

    #[test]
    fn a_logged_event_stays_small_because_every_large_body_is_boxed() {
        // A session's log holds up to COACHD_SESSION_LOG_EVENTS of these, nearly all tokens:
        // an unboxed variant that grows the enum grows every one of them (it was 200 bytes).
        eprintln!(
            "EventBody {} bytes, Published {} bytes",
            std::mem::size_of::<EventBody>(),
            std::mem::size_of::<Published>()
        );
        assert!(std::mem::size_of::<EventBody>() <= 56);
        assert!(std::mem::size_of::<Published>() <= 128);
    }

    #[test]
    fn client_frames_parse_with_defaults_and_reject_unknown_fields() {
        let f: ClientFrame = serde_json::from_str(r#"{"type":"user_message","text":"hi"}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::UserMessage {
                text: "hi".into(),
                mode: TurnMode::Queue,
                client_id: None
            }
        );
        let f: ClientFrame = serde_json::from_str(r#"{"type":"resume","after_seq":7}"#).unwrap();
        assert_eq!(f, ClientFrame::Resume { after_seq: 7 });
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"user_message","text":"hi","x":1}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"shout"}"#).is_err());
    }

    #[test]
    fn published_events_carry_envelope_and_type() {
        let p = Published::new(
            "s1",
            3,
            EventBody::Token {
                turn_number: 1,
                text: "Hi".into(),
                index: 0,
            },
        );
        let v: serde_json::Value = serde_json::from_str(p.json.as_str()).unwrap();
        assert_eq!(v["type"], "token");
        assert_eq!(v["session_id"], "s1");
        assert_eq!(v["seq"], 3);
        assert_eq!(p.turn_number(), Some(1));
        let frame = format!("id: 3\nevent: token\ndata: {}\n\n", p.json.as_str());
        assert_eq!(p.sse, frame.as_bytes());
    }

    /// Every kind of event, with strings that need escaping and optional fields both ways.
    fn every_kind_of_event() -> Vec<EventBody> {
        let persona = PersonaInfo {
            id: "p".into(),
            name: "Ana \"the coach\"".into(),
            domain: "sales".into(),
        };
        vec![
            EventBody::Session(Box::new(SessionEvent {
                user_id: "u".into(),
                coach_id: "c".into(),
                persona,
                status: SessionStatus::Active,
                turn_count: 2,
                created_at: "2026-12-01T21:00:00Z".into(),
            })),
            EventBody::TurnStart {
                turn_number: 1,
                user_text: "line\nbreak \u{1F600} \u{7}".into(),
                client_id: Some("m-1".into()),
            },
            EventBody::TurnStart {
                turn_number: 2,
                user_text: String::new(),
                client_id: None,
            },
            EventBody::Token {
                turn_number: 1,
                text: " wo\"rd\\ \t é".into(),
                index: 41,
            },
            EventBody::Token {
                turn_number: u32::MAX,
                text: String::new(),
                index: 0,
            },
            EventBody::TurnEnd(Box::new(TurnEndEvent {
                turn_number: 1,
                reply_text: "- Call\n- Write".into(),
                actions: vec!["Call".into(), "Write".into()],
                usage: Some(Usage {
                    prompt_tokens: 10,
                    completion_tokens: 4,
                }),
                finish_reason: FinishReason::Other("guardrail".into()),
                interrupted: false,
                provider: Some("offline".into()),
                model: Some("m".into()),
            })),
            EventBody::TurnEnd(Box::new(TurnEndEvent {
                turn_number: 2,
                reply_text: String::new(),
                actions: Vec::new(),
                usage: None,
                finish_reason: FinishReason::Cancelled,
                interrupted: true,
                provider: None,
                model: None,
            })),
            EventBody::error(ErrorCause::SlowClient, None),
            EventBody::error(ErrorCause::TurnDropped, Some(3)),
            EventBody::Notes {
                notes: Box::new(Notes {
                    summary: "s".into(),
                    key_points: vec!["k".into()],
                    action_items: Vec::new(),
                }),
            },
            EventBody::Resync {
                reason: "gone".into(),
                state: Box::new(SessionState {
                    status: SessionStatus::Ended,
                    turn_count: 1,
                    current_turn: Some(PartialTurn {
                        turn_number: 2,
                        user_text: "u".into(),
                        partial_text: "p".into(),
                    }),
                    oldest_seq: 5,
                    last_seq: 9,
                }),
            },
            EventBody::Pong { nonce: None },
            EventBody::Pong {
                nonce: Some("n".into()),
            },
        ]
    }

    #[test]
    fn published_bytes_are_exactly_the_server_event_serialisation() {
        for (i, body) in every_kind_of_event().into_iter().enumerate() {
            let seq = [0, 7, 10, 99_999, u64::MAX][i % 5];
            let session_id = "0193d0a4-6c1e-7b3a-\"9f52\"";
            let expected = serde_json::to_string(&ServerEvent {
                session_id: session_id.into(),
                seq,
                body: body.clone(),
            })
            .unwrap();
            let kind = body.kind();
            let p = Published::new(session_id, seq, body);
            assert_eq!(p.json.as_str(), expected);
            let frame = format!("id: {seq}\nevent: {kind}\ndata: {expected}\n\n");
            assert_eq!(p.sse, frame.as_bytes());
        }
    }

    #[test]
    fn state_enums_serialise_to_the_wire_strings() {
        let wire = |v: serde_json::Value| v.as_str().unwrap().to_owned();
        for (reason, name) in [
            (FinishReason::Stop, "stop"),
            (FinishReason::ContentFilter, "content_filter"),
            (FinishReason::ToolCalls, "tool_calls"),
            (FinishReason::Other("guardrail".into()), "guardrail"),
            (FinishReason::ServerShutdown, "server_shutdown"),
            (FinishReason::SessionEnded, "session_ended"),
            (FinishReason::Error, "error"),
        ] {
            assert_eq!(wire(serde_json::to_value(&reason).unwrap()), name);
            assert_eq!(
                serde_json::from_value::<FinishReason>(name.into()).unwrap(),
                reason
            );
        }
        assert_eq!(
            wire(serde_json::to_value(SessionStatus::Active).unwrap()),
            "active"
        );
        assert_eq!(wire(serde_json::to_value(EndedBy::Expired).unwrap()), "expired");
        assert_eq!(
            wire(serde_json::to_value(TransportKind::WebSocket).unwrap()),
            "websocket"
        );
        assert_eq!(TransportKind::parse("ws"), Some(TransportKind::WebSocket));
    }

    #[test]
    fn a_provider_error_event_keeps_its_typed_cause_off_the_wire() {
        let cause = LlmError::Timeout {
            provider: crate::llm::ProviderKind::Offline,
            phase: crate::llm::error::TimeoutPhase::FirstToken,
            after: std::time::Duration::from_secs(1),
        };
        let body = EventBody::error(ErrorCause::Provider(cause), Some(2));
        let EventBody::Error(e) = &body else {
            panic!("an error event")
        };
        assert_eq!((e.code.as_str(), e.turn_number), ("upstream_timeout", Some(2)));
        assert_eq!(e.to_error().unwrap().status_code().as_u16(), 504);
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json.as_object().unwrap().len(),
            5,
            "type, code, message, retryable, turn_number: {json}"
        );
    }

    #[test]
    fn actions_are_list_items() {
        let reply = "Here is a plan:\n- Call three leads\n2. Review pricing\n* **Write the offer**\nThanks";
        assert_eq!(
            extract_actions(reply, 5),
            ["Call three leads", "Review pricing", "Write the offer"]
        );
        assert_eq!(extract_actions("no list", 5), Vec::<String>::new());
    }
}
