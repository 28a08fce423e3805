//! Helpers shared by the fuzz targets: driving a stream to its end without a runtime (every
//! input is in memory, so a stream that is pending with nothing left to wait for has stalled),
//! and cutting one input into the chunks a network would deliver.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;

/// Polls until the stream is pending (`false`) or ended (`true`), pushing what it yields.
pub fn poll_ready<S: Stream + ?Sized>(stream: Pin<&mut S>, out: &mut Vec<S::Item>) -> bool {
    let mut stream = stream;
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    loop {
        match stream.as_mut().poll_next(&mut cx) {
            Poll::Ready(Some(item)) => out.push(item),
            Poll::Ready(None) => return true,
            Poll::Pending => return false,
        }
    }
}

/// Every item of a stream whose input is all available; a stall is a bug, so it panics.
pub fn drain<S: Stream + ?Sized>(mut stream: Pin<&mut S>) -> Vec<S::Item> {
    let mut out = Vec::new();
    assert!(
        poll_ready(stream.as_mut(), &mut out),
        "the stream stalled with all of its input available"
    );
    out
}

/// Splits `body` at lengths drawn from `seed` (1 to 16 bytes, with the occasional long chunk),
/// deterministically, so a failing input replays the same chunking.
pub fn chunks(body: &[u8], seed: u64) -> Vec<&[u8]> {
    let mut state = seed | 1;
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        // xorshift64: no dependency, the same cuts on every run.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = if state % 8 == 0 {
            64 + (state >> 8) % 512
        } else {
            1 + (state >> 8) % 16
        };
        let len = (len as usize).min(rest.len());
        let (head, tail) = rest.split_at(len);
        out.push(head);
        rest = tail;
    }
    out
}

/// A `reqwest::Response` whose body arrives in these chunks, as the provider decoders take it.
pub fn response(chunks: Vec<Vec<u8>>) -> reqwest::Response {
    let body = futures::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))),
    );
    let response = http::Response::new(reqwest::Body::wrap_stream(body));
    reqwest::Response::from(response)
}
