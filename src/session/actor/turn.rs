//! The current turn and its phase: first one future that assembles the prompt and routes it
//! (resolving to the chosen model and its stream, or the routing error), then that stream. The
//! session loop polls whichever phase is current; dropping the turn in either phase aborts the
//! upstream request, which is what cancel and interrupt do.
//!
//! Each turn is a `turn` span with `prompt.assemble` (and its `memory.search`) and `llm.call`
//! under it (see `telemetry`). The spans are made once per turn and never entered on the token
//! path: the first token adds one event to `llm.call`, later tokens touch no span.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use tokio::time::Instant;
use tracing::Instrument as _;
use tracing::field::{Empty, display};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::Actor;
use crate::coach::prompt::{self, TurnScope};
use crate::llm::ProviderKind;
use crate::llm::{EventStream, LlmError, LlmEvent, Message, Params, Routed, Usage};
use crate::metric::FirstToken;
use crate::persist::TurnRecord;
use crate::session::cluster::takeover::FinishedTurn;
use crate::session::event::{ErrorCause, EventBody, FinishReason, TurnEndEvent, extract_actions};

/// A message waiting for its turn.
pub(super) struct Pending {
    pub(super) number: u32,
    pub(super) text: String,
    pub(super) client_id: Option<String>,
}

/// Prompt assembly and routing as one future, so dropping it drops whichever of them runs.
type Assembling = Pin<Box<dyn Future<Output = Routing> + Send>>;

/// What assembling ended with: the routing outcome, how long routing itself took (the wait on
/// providers up to the first text, which the overhead metric leaves out), and the `llm.call`
/// span for the stream that follows.
pub(super) struct Routing {
    result: Result<Routed, LlmError>,
    waited: Duration,
    span: tracing::Span,
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
    /// The `turn` span; closed when the turn is dropped.
    span: tracing::Span,
    /// The `llm.call` span, from routing to the stream's end; none while assembling.
    llm_span: tracing::Span,
    /// The turn span's context for its write-behind record; `None` when traces are off.
    trace: Option<SpanContext>,
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
pub(super) async fn next_step(current: &mut Option<Box<Turn>>) -> Step {
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
        let span = tracing::info_span!(
            "turn",
            session_id = %self.handle.id,
            // Integers as i64: the OpenTelemetry bridge records unsigned ones as strings.
            turn = i64::from(pending.number),
            tokens = Empty,
            finish_reason = Empty,
            interrupted = Empty,
            otel.status_code = Empty,
        );
        // Builds the span's trace context now (a no-op without the OpenTelemetry layer), so the
        // turn's log lines carry its trace id and its write-behind can join the trace.
        let trace = Some(span.context().span().span_context().clone()).filter(SpanContext::is_valid);
        let turn_span = span.clone();
        let assembling: Assembling = Box::pin(async move {
            let scope = TurnScope {
                session_id: &session_id,
                user_id: &user_id,
                coach_id: &coach_id,
            };
            let began = Instant::now();
            let prompt_span = tracing::info_span!(parent: &turn_span, "prompt.assemble", memories = Empty);
            let prompt = prompt::assemble(
                &*deps.context,
                &*deps.memory,
                &persona,
                scope,
                history,
                &text,
                deps.limits.prompt,
            )
            .instrument(prompt_span.clone())
            .await;
            prompt_span.record("memories", prompt.memories_used as i64);
            let took = began.elapsed();
            deps.stats.prompt.record(took);
            tracing::debug!(parent: &turn_span, session_id = %session_id, elapsed_us = took.as_micros() as u64, memories = prompt.memories_used, "prompt assembled");
            // Routing (retries and fallbacks up to the first text) and then the stream: the
            // provider call as the client waits for it.
            let llm_span = tracing::info_span!(
                parent: &turn_span,
                "llm.call",
                task = "chat",
                provider = Empty,
                model = Empty,
                first_token_ms = Empty,
                prompt_tokens = Empty,
                completion_tokens = Empty,
                error = Empty,
                otel.status_code = Empty,
            );
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
                .instrument(llm_span.clone())
                .await;
            Routing {
                result,
                waited: routing.elapsed(),
                span: llm_span,
            }
        });
        self.current = Some(Box::new(Turn {
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
            span,
            llm_span: tracing::Span::none(),
            trace,
            routing: Duration::ZERO,
            first_token: None,
        }));
    }

    pub(super) fn on_step(&mut self, step: Step) {
        let Some(turn) = self.current.as_mut() else {
            return;
        };
        match step {
            Step::Routed(Routing {
                result: Ok(routed),
                waited,
                span: llm_span,
            }) => {
                llm_span.record("provider", display(routed.provider));
                llm_span.record("model", routed.model.as_str());
                turn.llm_span = llm_span;
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
                    // Once per turn: the first-token marker of the trace.
                    turn.llm_span.add_event("first_token", Vec::new());
                    turn.llm_span
                        .record("first_token_ms", took.as_secs_f64() * 1000.0);
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
            Step::Routed(Routing {
                result: Err(e),
                span: llm_span,
                ..
            }) => {
                turn.llm_span = llm_span;
                self.fail_turn(e);
            }
            Step::Event(Some(Err(e))) => self.fail_turn(e),
            Step::Event(None) => {
                match turn.finish.take() {
                    Some(reason) => self.finish_turn(false, reason.into()),
                    None => {
                        let (number, provider) = (turn.number, turn.provider);
                        turn.llm_span
                            .record("error", "stream ended without a finish reason");
                        turn.llm_span.record("otel.status_code", "error");
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

    /// Ends the current turn on a provider error, with an `error` event, and starts the next.
    fn fail_turn(&mut self, e: LlmError) {
        if let Some(turn) = &self.current {
            let number = turn.number;
            turn.llm_span.record("error", display(&e));
            turn.llm_span.record("otel.status_code", "error");
            tracing::warn!(parent: &turn.span, session_id = %self.handle.id, turn = number, error = %e, "turn failed");
            self.handle
                .log
                .publish(EventBody::error(ErrorCause::Provider(e), Some(number)));
            self.finish_turn(true, FinishReason::Error);
        }
        self.start_next();
    }

    /// Ends the turn a taken-over session's old owner was streaming: interrupted, with the
    /// partial reply its log kept, stored like any interrupted turn.
    pub(super) fn end_recovered_turn(&mut self, number: u32, user_text: String, partial: String) {
        self.deps.stats.turns_interrupted.inc();
        let actions = extract_actions(&partial, self.deps.limits.max_actions);
        let end_seq = self.handle.log.publish(EventBody::TurnEnd(Box::new(TurnEndEvent {
            turn_number: number,
            reply_text: partial.clone(),
            actions,
            usage: None,
            finish_reason: FinishReason::Interrupted,
            interrupted: true,
            provider: None,
            model: None,
        })));
        self.turns_done += 1;
        self.transcript.push_back((user_text.clone(), partial.clone()));
        while self.transcript.len() > self.deps.limits.notes_max_turns {
            self.transcript.pop_front();
        }
        self.store_turn(
            FinishedTurn {
                number,
                user_text,
                reply_text: partial,
                finish_reason: FinishReason::Interrupted,
                interrupted: true,
                usage: None,
                end_seq,
            },
            None,
        );
    }

    /// Hands a finished turn to write-behind, which never waits (a full queue leaves it in the
    /// session's backlog). Also for a turn a taken-over session's old owner finished but may
    /// not have stored (its queue died with it): a turn stored after all is not stored twice.
    pub(super) fn store_turn(&mut self, turn: FinishedTurn, trace: Option<SpanContext>) {
        self.writer.push(TurnRecord {
            session_id: self.handle.id.to_string(),
            user_id: self.handle.user_id.to_string(),
            coach_id: self.handle.coach_id.to_string(),
            turn_number: turn.number,
            user_text: turn.user_text,
            reply_text: turn.reply_text,
            interrupted: turn.interrupted,
            finish_reason: turn.finish_reason.to_string(),
            usage: turn.usage,
            at: Utc::now(),
            trace,
            end_seq: turn.end_seq,
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
        let Some(turn) = self.current.take().map(|t| *t) else {
            return;
        };
        drop(turn.phase);
        self.last_activity = Instant::now();
        // An exported span ends when it was last exited: `llm.call` was last entered while
        // routing, so mark the end of its stream here.
        turn.llm_span.in_scope(|| {});
        if let Some(u) = &turn.usage {
            turn.llm_span.record("prompt_tokens", i64::from(u.prompt_tokens));
            turn.llm_span
                .record("completion_tokens", i64::from(u.completion_tokens));
        }
        turn.span.record("tokens", i64::from(turn.tokens));
        turn.span.record("finish_reason", display(&finish_reason));
        turn.span.record("interrupted", interrupted);
        if finish_reason == FinishReason::Error {
            turn.span.record("otel.status_code", "error");
        }
        // One line per turn, inside its span: with JSON logs and traces on, it carries the
        // turn's trace id.
        let (span, number, tokens) = (&turn.span, turn.number, turn.tokens);
        tracing::info!(
            parent: span,
            session_id = %self.handle.id,
            turn = number,
            tokens,
            finish_reason = %finish_reason,
            "turn ended"
        );
        let stats = &self.deps.stats;
        match (interrupted, &finish_reason) {
            (false, _) => stats.turns_completed.inc(),
            (true, FinishReason::Error) => stats.turns_failed.inc(),
            (true, _) => stats.turns_interrupted.inc(),
        }
        let actions = extract_actions(&turn.reply, self.deps.limits.max_actions);
        let end_seq = self.handle.log.publish(EventBody::TurnEnd(Box::new(TurnEndEvent {
            turn_number: turn.number,
            reply_text: turn.reply.clone(),
            actions,
            usage: turn.usage,
            finish_reason: finish_reason.clone(),
            interrupted,
            provider: turn.provider.map(|p| p.to_string()),
            model: turn.model,
        })));
        self.turns_done += 1;
        self.transcript
            .push_back((turn.user_text.clone(), turn.reply.clone()));
        while self.transcript.len() > self.deps.limits.notes_max_turns {
            self.transcript.pop_front();
        }
        self.store_turn(
            FinishedTurn {
                number: turn.number,
                user_text: turn.user_text,
                reply_text: turn.reply,
                finish_reason,
                interrupted,
                usage: turn.usage,
                end_seq,
            },
            turn.trace,
        );
    }
}
