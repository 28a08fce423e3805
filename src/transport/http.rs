//! The HTTP-turn adapter: collects one turn's events and answers with a JSON body once its
//! `turn_end` arrives (the reference coach service's turn-based contract). It reads the typed
//! events, never their JSON.

use serde::Serialize;

use super::{Detach, Inbound, Transport, TransportKind};
use crate::error::{Error, ErrorDetail};
use crate::llm::Usage;
use crate::session::event::{ErrorEvent, EventBody, FinishReason, Published, TurnEndEvent};

/// Collects the events of one turn.
#[derive(Debug, Default)]
pub struct HttpTurn {
    turn: u32,
    /// The turn's `turn_end` body, once seen.
    turn_end: Option<EventBody>,
    /// The first `error` event of the turn, if any.
    error: Option<ErrorEvent>,
}

/// The JSON answer of an HTTP turn.
#[derive(Debug, Clone, Serialize)]
pub struct TurnReply {
    /// The session.
    pub session_id: String,
    /// The turn.
    pub turn_number: u32,
    /// The whole reply (partial when interrupted).
    pub reply_text: String,
    /// Action items found in the reply.
    pub actions: Vec<String>,
    /// Token counts, when the provider reported them.
    pub usage: Option<Usage>,
    /// Why the turn ended.
    pub finish_reason: FinishReason,
    /// True when cancelled, interrupted or failed before its end.
    pub interrupted: bool,
    /// Provider that answered.
    pub provider: Option<String>,
    /// Model that answered.
    pub model: Option<String>,
    /// The failure that cut a reply with some text short.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

impl HttpTurn {
    /// Waits for turn `turn`.
    pub fn new(turn: u32) -> Self {
        HttpTurn {
            turn,
            ..Self::default()
        }
    }

    /// The answer once the drive loop is over: the reply, or the turn's failure with its own
    /// type and status when it failed before any text.
    pub fn into_reply(self, session_id: &str) -> Result<TurnReply, Error> {
        let Some(EventBody::TurnEnd(end)) = self.turn_end else {
            return Err(Error::Unavailable(
                "the session ended before the turn finished".to_owned(),
            ));
        };
        let TurnEndEvent {
            reply_text,
            actions,
            usage,
            finish_reason,
            interrupted,
            provider,
            model,
            ..
        } = *end;
        if let (Some(err), true) = (&self.error, reply_text.is_empty()) {
            return Err(err.to_error().unwrap_or_else(|| Error::Upstream {
                code: "upstream_error",
                message: err.message.clone(),
                retryable: err.retryable,
            }));
        }
        Ok(TurnReply {
            session_id: session_id.to_owned(),
            turn_number: self.turn,
            reply_text,
            actions,
            usage,
            finish_reason,
            interrupted,
            provider,
            model,
            error: self.error.map(|e| ErrorDetail {
                code: e.code,
                message: e.message,
            }),
        })
    }
}

impl Transport for HttpTurn {
    fn kind(&self) -> TransportKind {
        TransportKind::Http
    }

    async fn send(&mut self, event: &Published) -> Result<(), Detach> {
        if event.turn_number() != Some(self.turn) {
            return Ok(());
        }
        match &event.body {
            body @ EventBody::TurnEnd(_) => self.turn_end = Some(body.clone()),
            EventBody::Error(e) if self.error.is_none() => self.error = Some(ErrorEvent::clone(e)),
            _ => {}
        }
        Ok(())
    }

    async fn recv(&mut self) -> Inbound {
        std::future::pending().await
    }

    async fn heartbeat(&mut self) -> Result<(), Detach> {
        Ok(())
    }

    fn done_after(&self, event: &Published) -> bool {
        event.ends_turn(self.turn)
    }

    async fn close(&mut self, _why: &Detach) {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::llm::LlmError;
    use crate::llm::ProviderKind;
    use crate::llm::error::TimeoutPhase;
    use crate::session::event::ErrorCause;

    fn turn_end(reply: &str) -> EventBody {
        EventBody::TurnEnd(Box::new(TurnEndEvent {
            turn_number: 1,
            reply_text: reply.to_owned(),
            actions: Vec::new(),
            usage: None,
            finish_reason: FinishReason::Error,
            interrupted: true,
            provider: None,
            model: None,
        }))
    }

    async fn collect(events: Vec<EventBody>) -> HttpTurn {
        let mut turn = HttpTurn::new(1);
        for (seq, body) in (1..).zip(events) {
            turn.send(&Published::new("s", seq, body)).await.unwrap();
        }
        turn
    }

    fn timeout() -> LlmError {
        LlmError::Timeout {
            provider: ProviderKind::Offline,
            phase: TimeoutPhase::FirstToken,
            after: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_turn_that_failed_before_any_text_answers_with_the_errors_own_status() {
        let turn = collect(vec![
            EventBody::error(ErrorCause::Provider(timeout()), Some(1)),
            turn_end(""),
        ])
        .await;
        let err = turn.into_reply("s").unwrap_err();
        assert_eq!(
            (err.status_code().as_u16(), err.code()),
            (504, "upstream_timeout")
        );
    }

    #[tokio::test]
    async fn a_turn_that_failed_after_some_text_answers_200_with_the_text_and_the_error() {
        let turn = collect(vec![
            EventBody::error(ErrorCause::Provider(timeout()), Some(1)),
            turn_end("Half a"),
        ])
        .await;
        let reply = turn.into_reply("s").unwrap();
        assert_eq!(reply.reply_text, "Half a");
        assert_eq!(reply.error.unwrap().code, "upstream_timeout");
        assert_eq!(reply.finish_reason, FinishReason::Error);
    }

    #[tokio::test]
    async fn events_of_other_turns_are_ignored() {
        let mut other = turn_end("other");
        if let EventBody::TurnEnd(end) = &mut other {
            end.turn_number = 2;
        }
        let turn = collect(vec![other]).await;
        assert_eq!(turn.into_reply("s").unwrap_err().status_code().as_u16(), 503);
    }
}
