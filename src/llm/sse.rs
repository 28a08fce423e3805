//! Server-sent-event decoding of upstream response bodies: eventsource-stream, behind a byte
//! guard for its known traps (0.2.3): a leading UTF-8 byte-order mark panics it, a final event
//! without a trailing blank line is dropped, and an invalid UTF-8 byte stalls it until the
//! connection closes. The guard strips the BOM, terminates the last event at a clean end of
//! body, and turns invalid UTF-8 into an error at once.

use bytes::{Bytes, BytesMut};
use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};

/// A decoding failure of the body or its framing.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// The connection failed while reading the body.
    #[error("reading the stream failed: {0}")]
    Transport(String),
    /// The body is not valid UTF-8.
    #[error("the stream is not valid UTF-8")]
    Utf8,
    /// The event framing is malformed.
    #[error("malformed event stream: {0}")]
    Framing(String),
}

/// Decodes an SSE body into events (comment lines are skipped by the parser).
pub fn events<S, E>(body: S) -> impl Stream<Item = Result<Event, SseError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    guard(body).eventsource().map(|r| match r {
        Ok(ev) => Ok(ev),
        Err(eventsource_stream::EventStreamError::Transport(e)) => Err(e),
        Err(e) => Err(SseError::Framing(e.to_string())),
    })
}

/// The byte guard described in the module header. Public only for the fuzz targets (`fuzz/`),
/// which check that it holds back at most an incomplete character.
#[doc(hidden)]
pub fn guard<S, E>(body: S) -> impl Stream<Item = Result<Bytes, SseError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    async_stream::stream! {
        let mut body = Box::pin(body);
        // Bytes of an incomplete UTF-8 sequence (or of a possible BOM) carried to the next chunk.
        let mut pending = BytesMut::new();
        let mut at_start = true;
        let mut last_byte: Option<u8> = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    yield Err(SseError::Transport(e.to_string()));
                    return;
                }
            };
            pending.extend_from_slice(&chunk);
            if at_start {
                // Every leading BOM, not only the one the spec ignores: eventsource-stream slices
                // a BOM it sees first at byte 1 and panics, so none may reach it.
                while pending.starts_with(b"\xEF\xBB\xBF") {
                    let _ = pending.split_to(3);
                }
                // Nothing yet, or the first bytes of another BOM: wait for more.
                if b"\xEF\xBB\xBF".starts_with(&pending) {
                    continue;
                }
                at_start = false;
            }
            match std::str::from_utf8(&pending) {
                Ok(_) => {
                    let out = pending.split().freeze();
                    last_byte = out.last().copied().or(last_byte);
                    if !out.is_empty() {
                        yield Ok(out);
                    }
                }
                Err(e) if e.error_len().is_none() => {
                    // Ends inside a multi-byte character: pass the valid part, keep the rest.
                    let valid = e.valid_up_to();
                    let out = pending.split_to(valid).freeze();
                    last_byte = out.last().copied().or(last_byte);
                    if !out.is_empty() {
                        yield Ok(out);
                    }
                }
                Err(e) => {
                    // The valid part first, as when the same bytes arrive in smaller chunks:
                    // events completed before the bad byte must not depend on where TCP cut.
                    let out = pending.split_to(e.valid_up_to()).freeze();
                    if !out.is_empty() {
                        yield Ok(out);
                    }
                    yield Err(SseError::Utf8);
                    return;
                }
            }
        }
        if !pending.is_empty() {
            // The body ended inside a multi-byte character.
            yield Err(SseError::Utf8);
            return;
        }
        // Terminate a last event that lacks its blank line, so it is dispatched, not dropped.
        if matches!(last_byte, Some(b) if b != b'\n' && b != b'\r') {
            yield Ok(Bytes::from_static(b"\n\n"));
        } else if last_byte.is_some() {
            yield Ok(Bytes::from_static(b"\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn decode(chunks: Vec<&'static [u8]>) -> Vec<Result<String, String>> {
        let body = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
        );
        events(body)
            .map(|r| r.map(|e| e.data).map_err(|e| e.to_string()))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_leading_bom_is_stripped_even_when_split() {
        let got = decode(vec![b"\xEF", b"\xBB\xBFdata: a\n\n"]).await;
        assert_eq!(got, vec![Ok("a".to_owned())]);
    }

    #[tokio::test]
    async fn a_last_event_without_blank_line_is_kept() {
        let got = decode(vec![b"data: a\n\ndata: [DONE]"]).await;
        assert_eq!(got, vec![Ok("a".to_owned()), Ok("[DONE]".to_owned())]);
    }

    #[tokio::test]
    async fn invalid_utf8_fails_at_once() {
        let got = decode(vec![b"data: a\n\n", b"data: \xFF\xFE\n\n"]).await;
        assert_eq!(got.first(), Some(&Ok("a".to_owned())));
        assert!(got.last().is_some_and(Result::is_err), "{got:?}");
    }

    #[tokio::test]
    async fn characters_split_across_chunks_survive() {
        // "é" is C3 A9; "👋" is F0 9F 91 8B.
        let got = decode(vec![b"data: caf\xC3", b"\xA9 \xF0\x9F", b"\x91\x8B\r", b"\n\r\n"]).await;
        assert_eq!(got, vec![Ok("café 👋".to_owned())]);
    }
}
