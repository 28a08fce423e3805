//! Ending a session: the turn in flight is interrupted, queued messages are dropped with an
//! `error` each, and the notes are generated and stored when asked for.

use super::Actor;
use crate::coach::notes::Notes;
use crate::error::Error;
use crate::session::event::{ErrorCause, EventBody, FinishReason, SessionStatus};
use crate::session::manager::{Deps, EndOutcome};

impl Actor {
    pub(super) async fn end(&mut self, generate_notes: bool) -> EndOutcome {
        self.interrupt_current(FinishReason::SessionEnded);
        for dropped in self.queue.drain(..) {
            self.handle
                .log
                .publish(EventBody::error(ErrorCause::TurnDropped, Some(dropped.number)));
        }
        let mut outcome = EndOutcome {
            session_id: self.handle.id.to_string(),
            turn_count: self.turns_done,
            notes: None,
            notes_id: None,
            notes_error: None,
        };
        if generate_notes {
            let transcript = self.transcript_text();
            let ids = (
                self.handle.id.to_string(),
                self.handle.user_id.to_string(),
                self.handle.coach_id.to_string(),
            );
            match make_notes(self.deps.clone(), self.persona.name.clone(), transcript, ids).await {
                Ok((id, notes)) => {
                    self.handle.log.publish(EventBody::Notes {
                        notes: Box::new(notes.clone()),
                    });
                    outcome.notes = Some(notes);
                    outcome.notes_id = Some(id);
                }
                Err(e) => {
                    self.handle
                        .log
                        .publish(EventBody::error(ErrorCause::Notes(&e), None));
                    outcome.notes_error = Some(e.body().error);
                }
            }
        }
        self.handle.log.publish(self.session_event(SessionStatus::Ended));
        outcome
    }

    fn transcript_text(&self) -> String {
        let mut transcript = String::new();
        for (user, reply) in &self.transcript {
            transcript.push_str("Client: ");
            transcript.push_str(user);
            transcript.push_str("\nCoach: ");
            transcript.push_str(reply);
            transcript.push_str("\n\n");
        }
        transcript
    }
}

/// Generates and stores the notes of a session. Takes owned data: the session task's state holds
/// the provider stream, which is not `Sync`, so no borrow of it may live across these awaits.
async fn make_notes(
    deps: Deps,
    coach_name: String,
    transcript: String,
    (session_id, user_id, coach_id): (String, String, String),
) -> Result<(uuid::Uuid, Notes), Error> {
    if transcript.is_empty() {
        return Err(Error::bad_request(
            "empty_session",
            "the session has no turns to take notes on",
        ));
    }
    let notes = crate::coach::notes::generate(&deps.llm, &coach_name, &transcript).await?;
    let stored = deps
        .notes
        .save(Some(&session_id), &user_id, &coach_id, notes)
        .await?;
    Ok((stored.id, stored.notes))
}
