//! Server-sent-event decoding of upstream response bodies: a small parser of its own, polled once
//! per body chunk, that parses each chunk where it lies (no copy unless a line or a character is
//! split across chunks) and allocates only each event's data. It keeps the fixes the previous
//! eventsource-stream-based decoder needed: a leading UTF-8 byte-order mark is stripped, a final
//! event without a trailing blank line is dispatched, and invalid UTF-8 is an error at once.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;

/// A decoding failure of the body.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// The connection failed while reading the body.
    #[error("reading the stream failed: {0}")]
    Transport(String),
    /// The body is not valid UTF-8.
    #[error("the stream is not valid UTF-8")]
    Utf8,
}

/// One dispatched event. `id` and `retry` fields are read and ignored: an LLM stream is never
/// resumed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; empty when the event named none (the SSE default type `message`).
    pub event: String,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
}

/// Decodes an SSE body into events (comment lines are skipped).
pub fn events<S, E>(body: S) -> impl Stream<Item = Result<Event, SseError>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    Events {
        body,
        parser: Parser::default(),
        done: false,
    }
}

pin_project_lite::pin_project! {
    /// The stream [`events`] returns: events parsed from the chunks read so far are queued and
    /// handed out before the body is polled again.
    struct Events<S> {
        #[pin]
        body: S,
        parser: Parser,
        done: bool,
    }
}

impl<S, E> Stream for Events<S>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    type Item = Result<Event, SseError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if let Some(event) = this.parser.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if *this.done {
                return Poll::Ready(None);
            }
            let result = match ready!(this.body.as_mut().poll_next(cx)) {
                Some(Ok(chunk)) => this.parser.feed(&chunk),
                Some(Err(e)) => Err(SseError::Transport(e.to_string())),
                None => {
                    *this.done = true;
                    this.parser.finish()
                }
            };
            if let Err(e) = result {
                *this.done = true;
                this.parser.ready.clear();
                return Poll::Ready(Some(Err(e)));
            }
        }
    }
}

/// The parser state between chunks.
#[derive(Debug)]
struct Parser {
    /// Bytes of an incomplete UTF-8 character (or of a possible BOM) carried to the next chunk.
    carry: Vec<u8>,
    /// The start of a line whose end has not come yet.
    line: String,
    at_start: bool,
    /// The last line ended with `\r`: a `\n` opening the next chunk belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    /// Events parsed, not yet handed out.
    ready: VecDeque<Event>,
}

impl Default for Parser {
    fn default() -> Self {
        Parser {
            carry: Vec::new(),
            line: String::new(),
            at_start: true,
            after_cr: false,
            event: String::new(),
            data: String::new(),
            ready: VecDeque::new(),
        }
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

impl Parser {
    /// Parses one body chunk, queueing the events it completes.
    fn feed(&mut self, chunk: &[u8]) -> Result<(), SseError> {
        // A chunk that continues a split character (rare) is joined to it; a whole one is parsed
        // where it lies.
        let joined;
        let mut bytes = chunk;
        if !self.carry.is_empty() {
            let mut j = std::mem::take(&mut self.carry);
            j.extend_from_slice(chunk);
            joined = j;
            bytes = &joined;
        }
        if self.at_start {
            if bytes.len() < BOM.len() && BOM.starts_with(bytes) {
                self.carry = bytes.to_vec();
                return Ok(());
            }
            bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
            self.at_start = false;
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) if e.error_len().is_none() => {
                // Ends inside a multi-byte character: parse the valid part, keep the rest.
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                self.carry = rest.to_vec();
                std::str::from_utf8(valid).map_err(|_| SseError::Utf8)?
            }
            Err(_) => return Err(SseError::Utf8),
        };
        self.parse(text);
        Ok(())
    }

    /// Ends the body: a split character left is an error; a last event without its blank line is
    /// dispatched.
    fn finish(&mut self) -> Result<(), SseError> {
        if !self.carry.is_empty() {
            return Err(SseError::Utf8);
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line);
        }
        self.dispatch();
        Ok(())
    }

    fn parse(&mut self, mut text: &str) {
        if self.after_cr {
            self.after_cr = false;
            text = text.strip_prefix('\n').unwrap_or(text);
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', text.as_bytes()) {
            let (line, rest) = text.split_at(end);
            let rest = match rest.strip_prefix("\r\n") {
                Some(after) => after,
                None => {
                    if rest == "\r" {
                        self.after_cr = true;
                    }
                    &rest[1..]
                }
            };
            if self.line.is_empty() {
                self.line_done(line);
            } else {
                let mut whole = std::mem::take(&mut self.line);
                whole.push_str(line);
                self.line_done(&whole);
                // Keep the buffer's allocation for the next split line.
                whole.clear();
                self.line = whole;
            }
            text = rest;
        }
        self.line.push_str(text);
    }

    /// One complete line, without its end.
    fn line_done(&mut self, line: &str) {
        if line.is_empty() {
            self.dispatch();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.data.capacity() == 0 {
                    self.data.reserve_exact(value.len() + 1);
                }
                self.data.push_str(value);
                self.data.push('\n');
            }
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            _ => {}
        }
    }

    /// A blank line: the event so far is dispatched if it has data, and reset either way.
    fn dispatch(&mut self) {
        if self.data.is_empty() {
            self.event.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        let event = std::mem::take(&mut self.event);
        self.ready.push_back(Event { event, data });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

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

    #[tokio::test]
    async fn lines_and_line_ends_split_across_chunks_survive() {
        let got = decode(vec![
            b"da",
            b"ta: a\r",
            b"\ndata: b\r",
            b"\r",
            b"data: c\n\ndata:d\r\n\r\n",
        ])
        .await;
        assert_eq!(
            got,
            vec![Ok("a\nb".to_owned()), Ok("c".to_owned()), Ok("d".to_owned())]
        );
    }

    #[tokio::test]
    async fn fields_comments_and_events_without_data() {
        let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
            b": keep-alive\n\nevent: ping\n\nevent: delta\nid: 7\nretry: 10\ndata: x\nbogus\n\ndata: y\n\n",
        ))]);
        let got: Vec<Event> = events(body).map(Result::unwrap).collect().await;
        let event = |event: &str, data: &str| Event {
            event: event.to_owned(),
            data: data.to_owned(),
        };
        assert_eq!(got, vec![event("delta", "x"), event("", "y")]);
    }

    #[tokio::test]
    async fn a_transport_error_follows_the_events_before_it() {
        let body = futures::stream::iter([
            Ok(Bytes::from_static(b"data: a\n\ndata: b\n\n")),
            Err(std::io::Error::other("reset")),
            Ok(Bytes::from_static(b"data: never\n\n")),
        ]);
        let got: Vec<Result<String, String>> = events(body)
            .map(|r| r.map(|e| e.data).map_err(|e| e.to_string()))
            .collect()
            .await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[..2], [Ok("a".to_owned()), Ok("b".to_owned())]);
        assert!(got[2].as_ref().is_err_and(|e| e.contains("reset")), "{got:?}");
    }
}
