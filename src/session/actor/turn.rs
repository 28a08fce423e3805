//! The current turn and its phase: first one future that assembles the prompt and routes it
//! (resolving to the chosen model and its stream, or the routing error), then that stream. The
//! session loop polls whichever phase is current; dropping the turn in either phase aborts the
//! upstream request, which is what cancel and interrupt do.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::time::Instant;

use super::Actor;
use crate::coach::prompt::{self, TurnScope};
use crate::llm::ProviderKind;
use crate::llm::{EventStream, LlmError, LlmEvent, Message, Params, Routed, Usage};
use crate::metric::FirstToken;
use crate::persist::TurnRecord;
use crate::session::event::{ErrorCause, EventBody, FinishReason, extract_actions};

/// A message waiting for its turn.
pub(super) struct Pending {
    pub(super) number: u32,
    pub(super) text: String,
    pub(super) client_id: Option<String>,
}

/// Prompt assembly and routing as one future, so dropping it drops whichever of them runs.
type Assembling = Pin<Box<dyn Future<Output = Routing> + Send>>;

/// What assembling ended with: the routing outcome, and how long routing itself took (the wait
/// on providers up to the first text), which the overhead metric leaves out.
pub(super) struct Routing {
    result: Result<Routed, LlmError>,
    waited: Duration,
}

/// Where the current turn is.
enum Phase {
    /// Reading context and memories, then routing (retries and fallbacks up to the first text).
    Assembling(Assembling),
    /// The chosen model's events.
    Streaming(EventStream),
}

/// The turn being answered.
pub(super) struct Turn {
    pub(super) number: u32,
    started: Instant,
    user_text: String,
    reply: String,
    tokens: u32,
    phase: Phase,
    provider: Option<ProviderKind>,
    model: Option<String>,
    usage: Option<Usage>,
    finish: Option<crate::llm::FinishReason>,
    /// The time routing waited on providers, once routed.
    routing: Duration,
    /// The first-token histograms of the model that serves, once routed.
    first_token: Option<FirstToken>,
}

/// What the current turn did next.
pub(super) enum Step {
    /// Routing finished.
    Routed(Routing),
    /// The stream's next event; `None` when it ended.
    Event(Option<Result<LlmEvent, LlmError>>),
}

/// The next step of the current turn; pending forever when no turn runs.
pub(super) async fn next_step(current: &mut Option<Turn>) -> Step {
    match current.as_mut().map(|t| &mut t.phase) {
        Some(Phase::Streaming(stream)) => Step::Event(stream.next().await),
        // `on_step` replaces the phase as soon as this resolves, so it is never polled again.
        Some(Phase::Assembling(routing)) => Step::Routed(routing.await),
        None => std::future::pending().await,
    }
}

impl Actor {
    /// Starts the next queued turn, when none runs.
    pub(super) fn start_next(&mut self) {
        if self.current.is_some() {
            return;
        }
        let Some(pending) = self.queue.pop_front() else {
            return;
        };
        self.deps.stats.turns_started.inc();
        self.handle.log.publish(EventBody::TurnStart {
            turn_number: pending.number,
            user_text: pending.text.clone(),
            client_id: pending.client_id,
        });
        let mut history = Vec::new();
        // Only as many turns as the prompt can take (two messages each).
        let keep = self.deps.limits.prompt.context_messages.div_ceil(2);
        for (user, reply) in self
            .transcript
            .iter()
            .skip(self.transcript.len().saturating_sub(keep))
        {
            history.push(Message::user(user.clone()));
            if !reply.is_empty() {
                history.push(Message::assistant(reply.clone()));
            }
        }
        let deps = self.deps.clone();
        let persona = self.persona.clone();
        let (session_id, user_id, coach_id) = (
            self.handle.id.clone(),
            self.handle.user_id.clone(),
            self.handle.coach_id.clone(),
        );
        let text = pending.text.clone();
        let assembling: Assembling = Box::pin(async move {
            let scope = TurnScope {
                session_id: &session_id,
                user_id: &user_id,
                coach_id: &coach_id,
            };
            let began = Instant::now();
            let prompt = prompt::assemble(
                &*deps.context,
                &*deps.memory,
                &persona,
                scope,
                history,
                &text,
                deps.limits.prompt,
            )
            .await;
            let took = began.elapsed();
            deps.stats.prompt.record(took);
            tracing::debug!(session_id = %session_id, elapsed_us = took.as_micros() as u64, memories = prompt.memories_used, "prompt assembled");
            let routing = Instant::now();
            let result = deps
                .llm
                .route_task(
                    "chat",
                    &Params::default(),
                    Some(prompt.system),
                    prompt.messages,
                    None,
                )
                .await;
            Routing {
                result,
                waited: routing.elapsed(),
            }
        });
        self.current = Some(Turn {
            number: pending.number,
            started: Instant::now(),
            user_text: pending.text,
            reply: String::new(),
            tokens: 0,
            phase: Phase::Assembling(assembling),
            provider: None,
            model: None,
            usage: None,
            finish: None,
            routing: Duration::ZERO,
            first_token: None,
        });
    }

    pub(super) fn on_step(&mut self, step: Step) {
        let Some(turn) = self.current.as_mut() else {
            return;
        };
        match step {
            Step::Routed(Routing {
                result: Ok(routed),
                waited,
            }) => {
                let label = self.deps.llm.model_label(routed.provider, &routed.model);
                turn.first_token = Some(FirstToken::new(
                    routed.provider.as_str(),
                    label,
                    self.handle.transport.as_str(),
                ));
                turn.routing = waited;
                turn.provider = Some(routed.provider);
                turn.model = Some(routed.model);
                turn.phase = Phase::Streaming(routed.stream);
            }
            // The token path: one push, one counter, one publish.
            Step::Event(Some(Ok(LlmEvent::Delta(text)))) => {
                let index = turn.tokens;
                if index == 0 {
                    let took = turn.started.elapsed();
                    self.deps.stats.first_token.record(took);
                    if let Some(histograms) = &turn.first_token {
                        histograms.record(took, turn.routing);
                    }
                }
                turn.tokens += 1;
                turn.reply.push_str(&text);
                let number = turn.number;
                self.deps.stats.tokens.inc();
                self.handle.log.publish(EventBody::Token {
                    turn_number: number,
                    text,
                    index,
                });
            }
            Step::Event(Some(Ok(LlmEvent::Usage(u)))) => turn.usage = Some(u),
            Step::Event(Some(Ok(LlmEvent::Finish(reason)))) => turn.finish = Some(reason),
            Step::Routed(Routing { result: Err(e), .. }) | Step::Event(Some(Err(e))) => {
                let number = turn.number;
                tracing::warn!(session_id = %self.handle.id, turn = number, error = %e, "turn failed");
                self.handle
                    .log
                    .publish(EventBody::error(ErrorCause::Provider(e), Some(number)));
                self.finish_turn(true, FinishReason::Error);
                self.start_next();
            }
            Step::Event(None) => {
                match turn.finish.take() {
                    Some(reason) => self.finish_turn(false, reason.into()),
                    None => {
                        let (number, provider) = (turn.number, turn.provider);
                        self.handle
                            .log
                            .publish(EventBody::error(ErrorCause::Incomplete(provider), Some(number)));
                        self.finish_turn(true, FinishReason::Error);
                    }
                }
                self.start_next();
            }
        }
    }

    /// Ends the turn a taken-over session's old owner was streaming: interrupted, with the
    /// partial reply its log kept, stored like any interrupted turn.
    pub(super) fn end_recovered_turn(&mut self, number: u32, user_text: String, partial: String) {
        self.deps.stats.turns_interrupted.inc();
        let actions = extract_actions(&partial, self.deps.limits.max_actions);
        self.handle.log.publish(EventBody::TurnEnd {
            turn_number: number,
            reply_text: partial.clone(),
            actions,
            usage: None,
            finish_reason: FinishReason::Interrupted,
            interrupted: true,
            provider: None,
            model: None,
        });
        self.turns_done += 1;
        self.transcript.push_back((user_text.clone(), partial.clone()));
        while self.transcript.len() > self.deps.limits.notes_max_turns {
            self.transcript.pop_front();
        }
        self.writer.push(TurnRecord {
            session_id: self.handle.id.to_string(),
            user_id: self.handle.user_id.to_string(),
            coach_id: self.handle.coach_id.to_string(),
            turn_number: number,
            user_text,
            reply_text: partial,
            interrupted: true,
            finish_reason: FinishReason::Interrupted.to_string(),
            usage: None,
            at: Utc::now(),
        });
    }

    /// Stops the current reply (dropping it aborts the upstream request, in either phase) and
    /// stores the partial turn as interrupted.
    pub(super) fn interrupt_current(&mut self, reason: FinishReason) {
        if self.current.is_some() {
            self.finish_turn(true, reason);
        }
    }

    /// Ends the current turn: its `turn_end`, the transcript, and its record to write-behind,
    /// which never waits (a full queue leaves it in the session's backlog).
    fn finish_turn(&mut self, interrupted: bool, finish_reason: FinishReason) {
        let Some(turn) = self.current.take() else {
            return;
        };
        drop(turn.phase);
        self.last_activity = Instant::now();
        let stats = &self.deps.stats;
        match (interrupted, &finish_reason) {
            (false, _) => stats.turns_completed.inc(),
            (true, FinishReason::Error) => stats.turns_failed.inc(),
            (true, _) => stats.turns_interrupted.inc(),
        }
        let actions = extract_actions(&turn.reply, self.deps.limits.max_actions);
        self.handle.log.publish(EventBody::TurnEnd {
            turn_number: turn.number,
            reply_text: turn.reply.clone(),
            actions,
            usage: turn.usage,
            finish_reason: finish_reason.clone(),
            interrupted,
            provider: turn.provider.map(|p| p.to_string()),
            model: turn.model,
        });
        self.turns_done += 1;
        self.transcript
            .push_back((turn.user_text.clone(), turn.reply.clone()));
        while self.transcript.len() > self.deps.limits.notes_max_turns {
            self.transcript.pop_front();
        }
        self.writer.push(TurnRecord {
            session_id: self.handle.id.to_string(),
            user_id: self.handle.user_id.to_string(),
            coach_id: self.handle.coach_id.to_string(),
            turn_number: turn.number,
            user_text: turn.user_text,
            reply_text: turn.reply,
            interrupted,
            finish_reason: finish_reason.to_string(),
            usage: turn.usage,
            at: Utc::now(),
        });
    }
}
