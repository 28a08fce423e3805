//! Relays a routed provider stream as server-sent events, for the two stateless streaming routes
//! (`/api/v1/llm/stream` and `/v1/chat/completions`): one small state machine polled once per
//! provider event, each route bringing its wire format as a [`Format`].

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::response::sse::Event;
use futures::{Stream, StreamExt};

use crate::llm::{EventStream, LlmError, LlmEvent};
use crate::metric::FirstToken;

/// A route's wire format for a relayed stream.
pub(crate) trait Format: Unpin {
    /// The first event, sent before any provider event (it names the model that serves).
    fn start(&mut self) -> Event;
    /// The event for one provider event, or `None` for one only the end reports (usage, finish).
    fn event(&mut self, event: LlmEvent) -> Option<Event>;
    /// The last event after an upstream failure (the HTTP status was sent already).
    fn error(&mut self, error: LlmError) -> Event;
    /// The events after the upstream ended, one per call, until `None`.
    fn end(&mut self) -> Option<Event>;
}

enum Phase {
    Start,
    Relaying,
    Ending,
    Done,
}

/// The SSE events of a routed stream in format `F`: `start`, one event per provider event that
/// has one, then `end` (or `error` after a failure, and nothing more).
pub(crate) struct Relay<F> {
    upstream: Option<EventStream>,
    format: F,
    phase: Phase,
    first_token: Option<FirstTokenClock>,
}

/// When a relayed request began and how long its routing waited on providers, with the
/// histograms its first text is recorded in (then dropped: nothing more per token).
pub(crate) struct FirstTokenClock {
    /// When the handler began.
    pub(crate) started: Instant,
    /// How long routing took (the wait on providers up to the first text).
    pub(crate) routing: Duration,
    /// The histograms of the model that serves.
    pub(crate) histograms: FirstToken,
}

impl<F: Format> Relay<F> {
    /// Relays `upstream` (a routed stream, already past its first token) in `format`.
    pub(crate) fn new(upstream: EventStream, format: F) -> Self {
        Relay {
            upstream: Some(upstream),
            format,
            phase: Phase::Start,
            first_token: None,
        }
    }

    /// Records the time to the first text relayed on `clock`.
    pub(crate) fn timed(mut self, clock: FirstTokenClock) -> Self {
        self.first_token = Some(clock);
        self
    }
}

impl<F: Format> Stream for Relay<F> {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.phase {
                Phase::Start => {
                    this.phase = Phase::Relaying;
                    return Poll::Ready(Some(Ok(this.format.start())));
                }
                Phase::Relaying => {
                    let Some(upstream) = this.upstream.as_mut() else {
                        this.phase = Phase::Ending;
                        continue;
                    };
                    match ready!(upstream.poll_next_unpin(cx)) {
                        Some(Ok(event)) => {
                            if matches!(event, LlmEvent::Delta(_))
                                && let Some(clock) = this.first_token.take()
                            {
                                clock.histograms.record(clock.started.elapsed(), clock.routing);
                            }
                            if let Some(out) = this.format.event(event) {
                                return Poll::Ready(Some(Ok(out)));
                            }
                        }
                        Some(Err(error)) => {
                            // Dropping the upstream at once releases its connection.
                            this.upstream = None;
                            this.phase = Phase::Done;
                            return Poll::Ready(Some(Ok(this.format.error(error))));
                        }
                        None => {
                            this.upstream = None;
                            this.phase = Phase::Ending;
                        }
                    }
                }
                Phase::Ending => match this.format.end() {
                    Some(out) => return Poll::Ready(Some(Ok(out))),
                    None => this.phase = Phase::Done,
                },
                Phase::Done => return Poll::Ready(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::FinishReason;
    use crate::llm::ProviderKind;

    /// Names each event it formats, so the test reads the relayed order.
    struct Names {
        ends: Vec<&'static str>,
    }

    impl Format for Names {
        fn start(&mut self) -> Event {
            Event::default().data("start")
        }
        fn event(&mut self, event: LlmEvent) -> Option<Event> {
            match event {
                LlmEvent::Delta(text) => Some(Event::default().data(text)),
                LlmEvent::Usage(_) | LlmEvent::Finish(_) => None,
            }
        }
        fn error(&mut self, _: LlmError) -> Event {
            Event::default().data("error")
        }
        fn end(&mut self) -> Option<Event> {
            self.ends.pop().map(|name| Event::default().data(name))
        }
    }

    /// The `data:` of every event the relay sends, rendered as axum writes them.
    async fn relayed(items: Vec<Result<LlmEvent, LlmError>>, ends: Vec<&'static str>) -> Vec<String> {
        use axum::response::IntoResponse;
        let relay = Relay::new(Box::pin(futures::stream::iter(items)), Names { ends });
        let body = axum::response::sse::Sse::new(relay).into_response().into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
            .collect()
    }

    #[tokio::test]
    async fn relays_start_each_text_then_every_end_event() {
        let items = vec![
            Ok(LlmEvent::Delta("a".into())),
            Ok(LlmEvent::Finish(FinishReason::Stop)),
            Ok(LlmEvent::Delta("b".into())),
        ];
        let got = relayed(items, vec!["[DONE]", "done"]).await;
        assert_eq!(got, ["start", "a", "b", "done", "[DONE]"]);
    }

    #[tokio::test]
    async fn an_upstream_error_is_the_last_event() {
        let items = vec![
            Ok(LlmEvent::Delta("a".into())),
            Err(LlmError::Incomplete {
                provider: ProviderKind::Openai,
            }),
            Ok(LlmEvent::Delta("never".into())),
        ];
        let got = relayed(items, vec!["done"]).await;
        assert_eq!(got, ["start", "a", "error"]);
    }
}
