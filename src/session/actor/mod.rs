//! The task of one live session. It owns turn order (a message sent while a reply streams is
//! queued, or interrupts it), drives the current turn itself (so a cancel is a drop, which aborts
//! the upstream request at once), publishes every event to the session's log, and hands finished
//! turns to write-behind without waiting. Client connections only read the log: a disconnect
//! never touches the generation.
//!
//! Reading order: this file is the loop and its commands; `turn` the current turn and its phase
//! (assembling, then streaming); `end` ending a session and its notes.

mod end;
mod turn;

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::turn::{Pending, Turn, next_step};
use super::cluster::takeover::{FinishedTurn, Recovered};
use super::event::{
    EndedBy, ErrorCause, EventBody, FinishReason, JobUpdate, PersonaInfo, SessionEvent, SessionStatus,
};
use super::manager::{Deps, EndOutcome, Registry, SessionInfo};
use super::{SessionHandle, TurnMode};
use crate::coach::Persona;
use crate::error::Error;
use crate::persist::SessionWriter;

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
    /// Publish a job's progress as a `job` event: the session's task is the one writer of its
    /// log, so the event gets its seq in order with the turns and reaches the shared log.
    Job {
        /// What the job did (boxed: a channel's block holds 32 commands, each as large as the
        /// largest, and every session has such a channel).
        update: Box<JobUpdate>,
        /// Answered once published, so a caller that awaits each keeps their order.
        reply: oneshot::Sender<()>,
    },
}

/// A session's command channel, of boxed commands: tokio's channel allocates its first block of
/// 32 slots with the channel, so every session pays 32 of whatever a slot holds (a pointer, not
/// a 64-byte command; 2 KiB of every idle session).
pub(crate) fn command_channel(capacity: usize) -> (mpsc::Sender<Box<Command>>, mpsc::Receiver<Box<Command>>) {
    mpsc::channel(capacity)
}

enum Flow {
    Continue,
    Stop,
}

/// What the task of a session shared with other nodes holds besides its own state.
#[derive(Debug)]
pub(super) struct Ownership {
    /// Cancelled by the session's shared-log writer when another node holds the lease.
    pub(super) fenced: CancellationToken,
    /// Tells the writer how the session ended (whether to mark it ended or hand it over).
    pub(super) ended: oneshot::Sender<EndedBy>,
}

pub(super) struct Actor {
    handle: SessionHandle,
    rx: mpsc::Receiver<Box<Command>>,
    deps: Deps,
    registry: Arc<Registry>,
    persona: Arc<Persona>,
    turns_done: u32,
    next_turn: u32,
    /// Boxed: an idle session (most of them) would otherwise carry a turn's 368 bytes.
    current: Option<Box<Turn>>,
    queue: VecDeque<Pending>,
    transcript: VecDeque<(String, String)>,
    /// Finished turns on their way to write-behind; never waited on inside the loop.
    writer: SessionWriter,
    // Tokio's clock, not std's: paused-time tests move it, and the idle timer compares with it.
    last_activity: Instant,
    end_when_idle: bool,
    /// Never cancelled for a session of this node only.
    fenced: CancellationToken,
    ended_tx: Option<oneshot::Sender<EndedBy>>,
    /// A taken-over session's turn that was streaming on its old owner: number, user text,
    /// partial reply; ended as interrupted when the task starts.
    recovered_open: Option<(u32, String, String)>,
    /// A taken-over session's turns that the old owner may not have stored.
    recovered_unstored: Vec<FinishedTurn>,
}

impl Actor {
    pub(super) fn new(
        handle: SessionHandle,
        rx: mpsc::Receiver<Box<Command>>,
        deps: Deps,
        registry: Arc<Registry>,
        persona: Arc<Persona>,
    ) -> Self {
        let writer = deps.write_behind.session_writer(&handle.id);
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
            writer,
            last_activity: Instant::now(),
            end_when_idle: false,
            fenced: CancellationToken::new(),
            ended_tx: None,
            recovered_open: None,
            recovered_unstored: Vec::new(),
        }
    }

    /// The task of a shared session (with `ownership`), possibly `recovered` from another node.
    pub(super) fn owned(mut self, ownership: Option<Ownership>, recovered: Option<Recovered>) -> Self {
        if let Some(o) = ownership {
            self.fenced = o.fenced;
            self.ended_tx = Some(o.ended);
        }
        if let Some(r) = recovered {
            self.turns_done = r.turns_done;
            self.next_turn = r.next_turn;
            self.transcript = r.transcript;
            self.recovered_open = r.open;
            self.recovered_unstored = r.unstored;
        }
        self
    }

    fn persona_info(&self) -> PersonaInfo {
        PersonaInfo {
            id: self.persona.id.clone(),
            name: self.persona.name.clone(),
            domain: self.persona.domain.clone(),
        }
    }

    fn session_event(&self, status: SessionStatus) -> EventBody {
        EventBody::Session(Box::new(SessionEvent {
            user_id: self.handle.user_id.to_string(),
            coach_id: self.handle.coach_id.to_string(),
            persona: self.persona_info(),
            status,
            turn_count: self.turns_done,
            created_at: self.handle.created_at.to_rfc3339(),
        }))
    }

    /// The session's task. The actor is boxed: an async fn that takes its receiver by value
    /// keeps it twice in its future (once as the argument, once moved into the body), which
    /// was a kilobyte of every session's task.
    pub(super) async fn run(mut self: Box<Self>) {
        for turn in std::mem::take(&mut self.recovered_unstored) {
            self.store_turn(turn, None);
        }
        if let Some((number, user_text, partial)) = self.recovered_open.take() {
            self.end_recovered_turn(number, user_text, partial);
        }
        self.handle.log.publish(self.session_event(SessionStatus::Active));
        let idle = self.deps.limits.idle_timeout;
        let shutdown = self.deps.shutdown.clone();
        // Both made once: a fresh cancellation future or timer per loop turn (that is, per token)
        // would register and unregister a waiter or a timer entry every time.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let idle_timer = tokio::time::sleep_until(self.last_activity + idle);
        tokio::pin!(idle_timer);
        let fenced = self.fenced.clone();
        let moved = fenced.cancelled();
        tokio::pin!(moved);
        let mut ended_by = EndedBy::Ended;
        loop {
            tokio::select! {
                () = &mut moved => {
                    // Another node holds the lease: it runs the session now, and ends the turn
                    // streaming here. Stop without a word (this node may not write any more).
                    self.current = None;
                    self.handle.log.close_moved();
                    self.registry.forget(&self.handle.id);
                    self.writer.flush().await;
                    return;
                }
                () = &mut cancelled => {
                    self.interrupt_current(FinishReason::ServerShutdown);
                    self.handle.log.publish(EventBody::error(ErrorCause::ServerShutdown, None));
                    ended_by = EndedBy::Shutdown;
                    break;
                }
                command = self.rx.recv() => {
                    let Some(command) = command else { break };
                    self.last_activity = Instant::now();
                    if let Flow::Stop = self.on_command(*command).await {
                        break;
                    }
                }
                // The current turn, in whichever phase it is: routed, or its next event.
                // No clock read here (this is the token path): the idle timer only runs between
                // turns, so a turn's end, which `finish_turn` stamps, is its last activity.
                step = next_step(&mut self.current) => self.on_step(step),
                // Records a full queue could not take, handed over as room appears; the session
                // goes on meanwhile (see persist's module header).
                () = self.writer.hand_over(), if self.writer.has_backlog() => {}
                () = std::future::ready(()), if self.end_when_idle && self.current.is_none() && self.queue.is_empty() => {
                    self.handle.log.publish(self.session_event(SessionStatus::Ended));
                    self.deps.stats.sessions_ended.inc();
                    break;
                }
                () = &mut idle_timer, if self.current.is_none() => {
                    // Activity only moves `last_activity`; the timer catches up when it fires.
                    let deadline = self.last_activity + idle;
                    if deadline > Instant::now() {
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
                    idle_timer.as_mut().reset(self.last_activity + idle);
                }
            }
        }
        // A shared session outlives its node's shutdown: another node takes it over on its next
        // command, so its relays there must not hear that it ended.
        let handed_over = ended_by == EndedBy::Shutdown && self.ended_tx.is_some();
        if ended_by != EndedBy::Ended && !handed_over {
            self.handle.log.publish(self.session_event(SessionStatus::Ended));
        }
        if let Some(tx) = self.ended_tx.take() {
            let _ = tx.send(ended_by);
        }
        self.handle.log.close();
        self.registry.remove(&self.handle.id, self.turns_done, ended_by);
        // The session is gone for its clients; its last records still go to write-behind. The
        // task ends only then, and shutdown stops the workers only after every session task.
        self.writer.flush().await;
    }

    async fn on_command(&mut self, command: Command) -> Flow {
        match command {
            Command::UserMessage {
                text,
                mode,
                client_id,
                reply,
            } => {
                let result = self.accept_message(text, mode, client_id);
                let _ = reply.send(result);
                Flow::Continue
            }
            Command::Cancel { reply } => {
                let running = self.current.is_some();
                self.interrupt_current(FinishReason::Cancelled);
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
            Command::Job { update, reply } => {
                self.handle.log.publish(EventBody::Job(update));
                let _ = reply.send(());
                Flow::Continue
            }
            Command::End {
                generate_notes,
                reply,
            } => {
                // Boxed: ending (with the notes call) is the largest future a session awaits
                // and runs once; inline, its space would sit in every live session's task.
                let outcome = Box::pin(self.end(generate_notes)).await;
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

    fn accept_message(
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
                TurnMode::Interrupt => self.interrupt_current(FinishReason::Interrupted),
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
}

#[cfg(test)]
mod tests;
