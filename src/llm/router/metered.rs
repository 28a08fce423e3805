//! The metrics of one upstream attempt, as a stream around it: open streams (a gauge held while
//! it lives), the attempt's time to its first text, its failures by kind and stage, and its token
//! usage, counted once when the stream is dropped (providers may repeat the usage; the last one
//! counts, as the session keeps it). Per token it is one branch: no label, no allocation.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::time::Instant;

use crate::llm::{EventStream, LlmError, LlmEvent, ProviderKind, Usage};
use crate::metric::{UpstreamStream, upstream_error};

/// An attempt's stream, metered.
pub(super) struct Metered {
    inner: EventStream,
    provider: ProviderKind,
    handles: UpstreamStream,
    sent: Instant,
    seen_text: bool,
    usage: Option<Usage>,
}

impl Metered {
    /// Meters `inner`, the stream of a request to `provider`'s `model` (a bounded label) sent now.
    pub(super) fn new(inner: EventStream, provider: ProviderKind, model: String) -> Self {
        Metered {
            inner,
            provider,
            handles: UpstreamStream::open(provider.as_str(), model),
            sent: Instant::now(),
            seen_text: false,
            usage: None,
        }
    }
}

impl Stream for Metered {
    type Item = Result<LlmEvent, LlmError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = std::task::ready!(this.inner.poll_next_unpin(cx));
        match &item {
            Some(Ok(LlmEvent::Delta(_))) if !this.seen_text => {
                this.seen_text = true;
                this.handles.first_token(this.sent.elapsed());
            }
            Some(Ok(LlmEvent::Usage(u))) => this.usage = Some(*u),
            Some(Err(e)) => {
                let stage = if this.seen_text {
                    "after_first_token"
                } else {
                    "before_first_token"
                };
                upstream_error(this.provider.as_str(), e.kind(), stage);
            }
            _ => {}
        }
        Poll::Ready(item)
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if let Some(u) = self.usage {
            self.handles.usage(u.prompt_tokens, u.completion_tokens);
        }
    }
}
