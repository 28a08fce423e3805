//! The SSE decoder of upstream bodies (`llm::sse`): the byte guard and eventsource-stream behind
//! it. Checks, for any body cut into any chunks: the guard holds back at most an incomplete
//! character (3 bytes) after each chunk, passes the body through unchanged but for its leading BOMs
//! and the blank line it may add at the end, and fails (then stops) exactly when the body is not
//! UTF-8; the decoder never panics or stalls, and gives the same events however the body is cut.
#![no_main]

use bytes::Bytes;
use coachd::llm::sse::{self, SseError};
use coachd_fuzz::{chunks, drain, poll_ready};
use futures::channel::mpsc;
use libfuzzer_sys::fuzz_target;

type Decoded = Vec<Result<eventsource_stream::Event, String>>;

fn decode(parts: &[&[u8]]) -> Decoded {
    let body = futures::stream::iter(
        parts
            .iter()
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let events = std::pin::pin!(sse::events(body));
    drain(events)
        .into_iter()
        .map(|r| r.map_err(|e| e.to_string()))
        .collect()
}

/// The body without its leading BOMs (all of them: see the guard).
fn strip_boms(mut body: &[u8]) -> &[u8] {
    while let Some(rest) = body.strip_prefix(b"\xEF\xBB\xBF") {
        body = rest;
    }
    body
}

fn check_guard(body: &[u8], parts: &[&[u8]]) {
    let (tx, rx) = mpsc::unbounded::<Result<Bytes, std::io::Error>>();
    let mut guard = std::pin::pin!(sse::guard(rx));
    let mut out: Vec<Result<Bytes, SseError>> = Vec::new();
    let mut fed = 0usize;
    let text = strip_boms(body);
    let boms = (body.len() - text.len()) / 3;
    for part in parts {
        tx.unbounded_send(Ok(Bytes::copy_from_slice(part)))
            .expect("the guard holds its body");
        fed += part.len();
        if poll_ready(guard.as_mut(), &mut out) {
            break;
        }
        if out.iter().any(Result::is_err) {
            break;
        }
        let passed: usize = out.iter().filter_map(|r| r.as_ref().ok()).map(Bytes::len).sum();
        let skipped = 3 * boms.min(fed / 3);
        assert!(
            fed - skipped - passed <= 3,
            "the guard holds {} bytes after {fed} fed",
            fed - skipped - passed
        );
    }
    drop(tx);
    assert!(
        poll_ready(guard.as_mut(), &mut out),
        "the guard stalled at the end of its body"
    );

    let errors = out.iter().filter(|r| r.is_err()).count();
    if std::str::from_utf8(text).is_ok() {
        assert_eq!(errors, 0, "a UTF-8 body failed");
        let passed: Vec<u8> = out
            .iter()
            .flat_map(|r| r.as_ref().expect("ok").to_vec())
            .collect();
        assert!(passed.starts_with(text), "the guard changed the body");
        let tail = &passed[text.len()..];
        assert!(matches!(tail, b"" | b"\n" | b"\n\n"), "the guard added {tail:?}");
        // Every body that ends ends its last event.
        if !text.is_empty() {
            assert!(passed.ends_with(b"\n") || passed.ends_with(b"\r"));
        }
    } else {
        assert_eq!(errors, 1, "a body that is not UTF-8 gave {errors} errors");
        assert!(out.last().is_some_and(Result::is_err), "bytes after the error");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let parts = chunks(body, u64::from(seed));
    check_guard(body, &parts);
    let whole = decode(&[body]);
    let cut = decode(&parts);
    assert_eq!(whole, cut, "the events depend on where the body is cut");
    let bytewise: Vec<&[u8]> = body.chunks(1).collect();
    if body.len() < 512 {
        assert_eq!(whole, decode(&bytewise), "byte by byte");
    }
});
