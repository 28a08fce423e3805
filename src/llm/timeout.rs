//! The four upstream timeouts around one provider call: connect (in the HTTP client), first
//! token (request sent → first text delta), idle (between events once text flows) and total.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::{Instant, timeout_at};

use super::error::TimeoutPhase;
use super::{EventStream, LlmError, LlmEvent};
use crate::llm::{LlmTimeouts, ProviderKind};

/// Runs `start` (which sends the request and waits for headers) and then its stream under the
/// first-token, idle and total timeouts. The connect timeout is the HTTP client's own. The total
/// one ends at `total_deadline`: the deadline of the whole routed call (every retry and fallback
/// included), `t.total` after it began.
pub fn with_timeouts<F>(
    provider: ProviderKind,
    t: LlmTimeouts,
    total_deadline: Instant,
    start: F,
) -> EventStream
where
    F: Future<Output = Result<EventStream, LlmError>> + Send + 'static,
{
    let stream = async_stream::stream! {
        let begun = Instant::now();
        // The nearer of a phase's own deadline and the total one, with the error it means.
        let limit = |deadline: Instant, phase: TimeoutPhase, after: Duration| {
            if deadline < total_deadline {
                (deadline, LlmError::Timeout { provider, phase, after })
            } else {
                (total_deadline, LlmError::Timeout { provider, phase: TimeoutPhase::Total, after: t.total })
            }
        };
        let first_token = limit(begun + t.first_token, TimeoutPhase::FirstToken, t.first_token);

        let mut inner = match timeout_at(first_token.0, start).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                yield Err(e);
                return;
            }
            Err(_) => {
                yield Err(first_token.1);
                return;
            }
        };
        let mut seen_text = false;
        // One timer for the whole stream, re-armed lazily: each event only records when it came,
        // and the timer, when it fires, either moves on to the new deadline or is the timeout.
        // Arming a fresh timer per event would cost a timer-wheel insert and removal per token.
        let mut last_event = Instant::now();
        let timer = tokio::time::sleep_until(first_token.0);
        tokio::pin!(timer);
        loop {
            let item = tokio::select! {
                biased;
                item = inner.next() => Some(item),
                () = &mut timer => None,
            };
            match item {
                Some(Some(Ok(event))) => {
                    last_event = Instant::now();
                    if !seen_text && matches!(&event, LlmEvent::Delta(text) if !text.is_empty()) {
                        seen_text = true;
                        // The idle deadline may come before the first-token one still armed.
                        let (deadline, _) = limit(last_event + t.idle, TimeoutPhase::Idle, t.idle);
                        if deadline < timer.deadline() {
                            timer.as_mut().reset(deadline);
                        }
                    }
                    yield Ok(event);
                }
                Some(Some(Err(e))) => {
                    yield Err(e);
                    return;
                }
                Some(None) => return,
                None => {
                    let (deadline, error) = if seen_text {
                        limit(last_event + t.idle, TimeoutPhase::Idle, t.idle)
                    } else {
                        first_token.clone()
                    };
                    if Instant::now() >= deadline {
                        yield Err(error);
                        return;
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
    };
    Box::pin(stream)
}
