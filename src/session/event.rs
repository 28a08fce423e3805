//! The wire frames of a session, mirroring `proto/` (the JSON Schema every transport shares):
//! frames a client sends, and events the server emits. Every server event carries `session_id`
//! and `seq`; events are serialised once, when published, and shared by every transport.

use serde::{Deserialize, Serialize};

use crate::llm::Usage;

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

/// One action item of session notes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionItem {
    /// What to do.
    pub task: String,
    /// Who does it (usually the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// When, as the model phrased it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<String>,
    /// `high`, `medium` or `low`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
}

/// Notes of a session or transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notes {
    /// A few sentences.
    pub summary: String,
    /// The main points discussed.
    pub key_points: Vec<String>,
    /// What the client committed to.
    pub action_items: Vec<ActionItem>,
}

/// The state a `resync` event carries, for a client too far behind to replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    /// `active` or `ended`.
    pub status: String,
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

/// What a server event says (the envelope adds `session_id` and `seq`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// Session state: at creation, at its end, and as the first event of a new connection.
    Session {
        /// Owner.
        user_id: String,
        /// Coach.
        coach_id: String,
        /// The coach persona.
        persona: PersonaInfo,
        /// `active` or `ended`.
        status: String,
        /// Turns finished so far.
        turn_count: u32,
        /// Creation time (RFC 3339).
        created_at: String,
    },
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
    TurnEnd {
        /// Turn number.
        turn_number: u32,
        /// The whole reply (partial when interrupted).
        reply_text: String,
        /// Action items found in the reply.
        actions: Vec<String>,
        /// Token counts, when the provider reported them.
        usage: Option<Usage>,
        /// `stop`, `length`, `cancelled`, `error`, ...
        finish_reason: String,
        /// True when cancelled, interrupted or failed before its end.
        interrupted: bool,
        /// Provider that answered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        provider: Option<String>,
        /// Model that answered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
    /// Something failed.
    Error {
        /// Stable code.
        code: String,
        /// Safe to show.
        message: String,
        /// Whether trying again may work.
        retryable: bool,
        /// The turn it concerns, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        turn_number: Option<u32>,
    },
    /// Session notes.
    Notes {
        /// The notes.
        notes: Notes,
    },
    /// The client is too far behind to replay; here is the state instead.
    Resync {
        /// Why.
        reason: String,
        /// The state.
        state: SessionState,
    },
    /// Answer to `ping`.
    Pong {
        /// The ping's nonce.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
}

impl EventBody {
    /// The event's type name, as on the wire (SSE `event:` field).
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Session { .. } => "session",
            EventBody::TurnStart { .. } => "turn_start",
            EventBody::Token { .. } => "token",
            EventBody::TurnEnd { .. } => "turn_end",
            EventBody::Error { .. } => "error",
            EventBody::Notes { .. } => "notes",
            EventBody::Resync { .. } => "resync",
            EventBody::Pong { .. } => "pong",
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

/// A published event: serialised once, shared by every transport and the replay log.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// Its seq.
    pub seq: u64,
    /// Its type name.
    pub kind: &'static str,
    /// For turn-scoped events, the turn.
    pub turn_number: Option<u32>,
    /// The JSON text.
    pub json: String,
}

impl Published {
    /// Serialises an event.
    pub fn new(session_id: &str, seq: u64, body: EventBody) -> Self {
        let kind = body.kind();
        let turn_number = match &body {
            EventBody::TurnStart { turn_number, .. }
            | EventBody::Token { turn_number, .. }
            | EventBody::TurnEnd { turn_number, .. } => Some(*turn_number),
            EventBody::Error { turn_number, .. } => *turn_number,
            _ => None,
        };
        let event = ServerEvent {
            session_id: session_id.to_owned(),
            seq,
            body,
        };
        // Serialising these plain structs cannot fail; fall back to an error frame regardless.
        let json = serde_json::to_string(&event).unwrap_or_else(|_| {
            format!(r#"{{"type":"error","session_id":"{session_id}","seq":{seq},"code":"internal","message":"unserialisable event","retryable":false}}"#)
        });
        Published {
            seq,
            kind,
            turn_number,
            json,
        }
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
        let v: serde_json::Value = serde_json::from_str(&p.json).unwrap();
        assert_eq!(v["type"], "token");
        assert_eq!(v["session_id"], "s1");
        assert_eq!(v["seq"], 3);
        assert_eq!(p.turn_number, Some(1));
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
