//! The task of one live session. It owns turn order (a message sent while a reply streams is
//! queued, or interrupts it), drives the provider stream of the current turn itself (so a cancel
//! is a drop, which aborts the upstream request at once), publishes every event to the session's
//! log, and hands finished turns to the write-behind queue. Client connections only read the log:
//! a disconnect never touches the generation.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::event::{
    EndedBy, ErrorCause, EventBody, FinishReason, PersonaInfo, SessionStatus, extract_actions,
};
use super::manager::{Deps, EndOutcome, Registry, SessionInfo};
use super::{SessionHandle, TurnMode};
use crate::coach::Persona;
use crate::coach::notes::Notes;
use crate::coach::prompt::{self, TurnScope};
use crate::config::ProviderKind;
use crate::error::Error;
use crate::llm::{EventStream, LlmError, LlmEvent, Usage};
use crate::persist::TurnRecord;

/// What a session task is asked to do.
#[derive(Debug)]
pub enum Command {
    /// A user turn; answered with its turn number once accepted.
    UserMessage {
        /// The text.
        text: String,
        /// Queue or interrupt.
        mode: TurnMode,
        /// The client's id of the message.
        client_id: Option<String>,
        /// Turn number, or why it was refused.
        reply: oneshot::Sender<Result<u32, Error>>,
    },
    /// Cancel the current reply; answered with whether one was running.
    Cancel {
        /// Whether a reply was cancelled.
        reply: oneshot::Sender<bool>,
    },
    /// End the session.
    End {
        /// Generate notes first.
        generate_notes: bool,
        /// The outcome.
        reply: oneshot::Sender<EndOutcome>,
    },
    /// End the session once no turn runs or waits (the turn in flight still finishes).
    EndWhenIdle,
    /// Report the session's state.
    Info {
        /// The state.
        reply: oneshot::Sender<SessionInfo>,
    },
}

struct Pending {
    number: u32,
    text: String,
    client_id: Option<String>,
}

struct Active {
    number: u32,
    started: Instant,
    user_text: String,
    reply: String,
    tokens: u32,
    stream: EventStream,
    provider: Option<ProviderKind>,
    model: Option<String>,
    usage: Option<Usage>,
    finish: Option<crate::llm::FinishReason>,
}

enum Flow {
    Continue,
    Stop,
}

pub(super) struct Actor {
    handle: SessionHandle,
    rx: mpsc::Receiver<Command>,
    deps: Deps,
    registry: Arc<Registry>,
    persona: Persona,
    turns_done: u32,
    next_turn: u32,
    current: Option<Active>,
    queue: VecDeque<Pending>,
    transcript: VecDeque<(String, String)>,
    last_activity: Instant,
    end_when_idle: bool,
}

/// The next event of the current turn; pending forever when no turn runs.
async fn next_item(current: &mut Option<Active>) -> Option<Result<LlmEvent, LlmError>> {
    match current {
        Some(turn) => turn.stream.next().await,
        None => std::future::pending().await,
    }
}

impl Actor {
    pub(super) fn new(
        handle: SessionHandle,
        rx: mpsc::Receiver<Command>,
        deps: Deps,
        registry: Arc<Registry>,
        persona: Persona,
    ) -> Self {
        Actor {
            handle,
            rx,
            deps,
            registry,
            persona,
            turns_done: 0,
            next_turn: 1,
            current: None,
            queue: VecDeque::new(),
            transcript: VecDeque::new(),
            last_activity: Instant::now(),
            end_when_idle: false,
        }
    }

    fn persona_info(&self) -> PersonaInfo {
        PersonaInfo {
            id: self.persona.id.clone(),
            name: self.persona.name.clone(),
            domain: self.persona.domain.clone(),
        }
    }

    fn session_event(&self, status: SessionStatus) -> EventBody {
        EventBody::Session {
            user_id: self.handle.user_id.to_string(),
            coach_id: self.handle.coach_id.to_string(),
            persona: self.persona_info(),
            status,
            turn_count: self.turns_done,
            created_at: self.handle.created_at.to_rfc3339(),
        }
    }

    pub(super) async fn run(mut self) {
        self.handle.log.publish(self.session_event(SessionStatus::Active));
        let idle = self.deps.limits.idle_timeout;
        let shutdown = self.deps.shutdown.clone();
        // Both made once: a fresh cancellation future or timer per loop turn (that is, per token)
        // would register and unregister a waiter or a timer entry every time.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let idle_timer = tokio::time::sleep_until(tokio::time::Instant::from_std(self.last_activity + idle));
        tokio::pin!(idle_timer);
        let mut ended_by = EndedBy::Ended;
        loop {
            tokio::select! {
                () = &mut cancelled => {
                    self.interrupt_current(FinishReason::ServerShutdown).await;
                    self.handle.log.publish(EventBody::error(ErrorCause::ServerShutdown, None));
                    ended_by = EndedBy::Shutdown;
                    break;
                }
                command = self.rx.recv() => {
                    let Some(command) = command else { break };
                    self.last_activity = Instant::now();
                    if let Flow::Stop = self.on_command(command).await {
                        break;
                    }
                }
                item = next_item(&mut self.current) => {
                    self.last_activity = Instant::now();
                    self.on_llm_item(item).await;
                }
                () = std::future::ready(()), if self.end_when_idle && self.current.is_none() && self.queue.is_empty() => {
                    self.handle.log.publish(self.session_event(SessionStatus::Ended));
                    self.deps.stats.sessions_ended.inc();
                    break;
                }
                () = &mut idle_timer, if self.current.is_none() => {
                    // Activity only moves `last_activity`; the timer catches up when it fires.
                    let deadline = tokio::time::Instant::from_std(self.last_activity + idle);
                    if deadline > tokio::time::Instant::now() {
                        idle_timer.as_mut().reset(deadline);
                        continue;
                    }
                    if self.handle.log.subscriber_count() == 0 && self.queue.is_empty() {
                        tracing::info!(session_id = %self.handle.id, "session expired after idling");
                        self.deps.stats.expired.inc();
                        ended_by = EndedBy::Expired;
                        break;
                    }
                    // Someone is still attached: an open connection is activity.
                    self.last_activity = Instant::now();
                    idle_timer.as_mut().reset(tokio::time::Instant::from_std(self.last_activity + idle));
                }
            }
        }
        if ended_by != EndedBy::Ended {
            self.handle.log.publish(self.session_event(SessionStatus::Ended));
        }
        self.handle.log.close();
        self.registry.remove(&self.handle.id, self.turns_done, ended_by);
    }

    async fn on_command(&mut self, command: Command) -> Flow {
        match command {
            Command::UserMessage {
                text,
                mode,
                client_id,
                reply,
            } => {
                let result = self.accept_message(text, mode, client_id).await;
                let _ = reply.send(result);
                Flow::Continue
            }
            Command::Cancel { reply } => {
                let running = self.current.is_some();
                self.interrupt_current(FinishReason::Cancelled).await;
                self.start_next();
                let _ = reply.send(running);
                Flow::Continue
            }
            Command::EndWhenIdle => {
                self.end_when_idle = true;
                Flow::Continue
            }
            Command::Info { reply } => {
                let _ = reply.send(self.info());
                Flow::Continue
            }
            Command::End {
                generate_notes,
                reply,
            } => {
                let outcome = self.end(generate_notes).await;
                let _ = reply.send(outcome);
                Flow::Stop
            }
        }
    }

    fn info(&self) -> SessionInfo {
        let (last_seq, _) = self.handle.log.bounds();
        SessionInfo {
            session_id: self.handle.id.to_string(),
            user_id: self.handle.user_id.to_string(),
            coach_id: self.handle.coach_id.to_string(),
            persona: self.persona_info(),
            transport: self.handle.transport,
            status: SessionStatus::Active,
            turn_count: self.turns_done,
            streaming_turn: self.current.as_ref().map(|t| t.number),
            queued_turns: self.queue.len(),
            connections: self.handle.log.subscriber_count(),
            last_seq,
            created_at: self.handle.created_at,
        }
    }

    async fn accept_message(
        &mut self,
        text: String,
        mode: TurnMode,
        client_id: Option<String>,
    ) -> Result<u32, Error> {
        let limits = &self.deps.limits;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(Error::bad_request("empty_text", "text must not be empty"));
        }
        if trimmed.chars().count() > limits.max_text_chars {
            return Err(Error::bad_request(
                "text_too_long",
                format!("text is longer than {} characters", limits.max_text_chars),
            ));
        }
        let text = trimmed.to_owned();
        if self.current.is_some() {
            match mode {
                TurnMode::Interrupt => self.interrupt_current(FinishReason::Interrupted).await,
                TurnMode::Queue if self.queue.len() >= limits.max_queued_turns => {
                    return Err(Error::QueueFull {
                        max: limits.max_queued_turns,
                    });
                }
                TurnMode::Queue => {}
            }
        }
        let number = self.next_turn;
        self.next_turn += 1;
        self.queue.push_back(Pending {
            number,
            text,
            client_id,
        });
        if self.current.is_none() {
            self.start_next();
        }
        Ok(number)
    }

    fn start_next(&mut self) {
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
        let deps = self.deps.clone();
        let persona = self.persona.clone();
        let (session_id, user_id, coach_id) = (
            self.handle.id.to_string(),
            self.handle.user_id.to_string(),
            self.handle.coach_id.to_string(),
        );
        let text = pending.text.clone();
        let mut history = Vec::new();
        // Only as many turns as the prompt can take (two messages each).
        let keep = self.deps.limits.prompt.context_messages.div_ceil(2);
        for (user, reply) in self
            .transcript
            .iter()
            .skip(self.transcript.len().saturating_sub(keep))
        {
            history.push(crate::llm::Message::user(user.clone()));
            if !reply.is_empty() {
                history.push(crate::llm::Message::assistant(reply.clone()));
            }
        }
        let stream: EventStream = Box::pin(async_stream::stream! {
            let scope = TurnScope { session_id: &session_id, user_id: &user_id, coach_id: &coach_id };
            let began = Instant::now();
            let prompt = prompt::assemble(&*deps.context, &*deps.memory, &persona, scope, history, &text, deps.limits.prompt).await;
            let took = began.elapsed();
            deps.stats.prompt.record(took);
            tracing::debug!(session_id = %session_id, elapsed_us = took.as_micros() as u64, memories = prompt.memories_used, "prompt assembled");
            let mut inner = deps.llm.stream_task("chat", Some(prompt.system), prompt.messages, None);
            while let Some(item) = inner.next().await {
                yield item;
            }
        });
        self.current = Some(Active {
            number: pending.number,
            started: Instant::now(),
            user_text: pending.text,
            reply: String::new(),
            tokens: 0,
            stream,
            provider: None,
            model: None,
            usage: None,
            finish: None,
        });
    }

    async fn on_llm_item(&mut self, item: Option<Result<LlmEvent, LlmError>>) {
        let Some(turn) = self.current.as_mut() else {
            return;
        };
        match item {
            Some(Ok(LlmEvent::Start { provider, model })) => {
                turn.provider = Some(provider);
                turn.model = Some(model);
            }
            Some(Ok(LlmEvent::Delta(text))) => {
                let index = turn.tokens;
                if index == 0 {
                    self.deps.stats.first_token.record(turn.started.elapsed());
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
            Some(Ok(LlmEvent::Usage(u))) => turn.usage = Some(u),
            Some(Ok(LlmEvent::Finish(reason))) => turn.finish = Some(reason),
            Some(Err(e)) => {
                let number = turn.number;
                tracing::warn!(session_id = %self.handle.id, turn = number, error = %e, "turn failed");
                self.handle
                    .log
                    .publish(EventBody::error(ErrorCause::Provider(e), Some(number)));
                self.finish_turn(true, FinishReason::Error).await;
                self.start_next();
            }
            None => {
                match turn.finish.clone() {
                    Some(reason) => self.finish_turn(false, reason.into()).await,
                    None => {
                        let (number, provider) = (turn.number, turn.provider);
                        self.handle
                            .log
                            .publish(EventBody::error(ErrorCause::Incomplete(provider), Some(number)));
                        self.finish_turn(true, FinishReason::Error).await;
                    }
                }
                self.start_next();
            }
        }
    }

    /// Stops the current reply (dropping its stream aborts the upstream request) and stores the
    /// partial turn as interrupted.
    async fn interrupt_current(&mut self, reason: FinishReason) {
        if self.current.is_some() {
            self.finish_turn(true, reason).await;
        }
    }

    async fn finish_turn(&mut self, interrupted: bool, finish_reason: FinishReason) {
        let Some(turn) = self.current.take() else {
            return;
        };
        drop(turn.stream);
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
        // Not on the token path: the turn's last event is already out.
        self.deps
            .write_behind
            .enqueue(TurnRecord {
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
            })
            .await;
    }

    async fn end(&mut self, generate_notes: bool) -> EndOutcome {
        self.interrupt_current(FinishReason::SessionEnded).await;
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
                    self.handle.log.publish(EventBody::Notes { notes: notes.clone() });
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

#[cfg(test)]
mod tests;
