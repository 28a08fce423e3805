//! The parser of the five answer formats of `/audio/transcriptions` (`transcribe::response`).
//! Checks: it never panics; every segment it keeps has trimmed, non-empty text; the cue formats'
//! text is their segments' text joined; the untimed formats give at most one segment, spanning
//! the chunk; and a transcript reads back from the JSON the job store keeps of it (no time that
//! JSON cannot hold).
#![no_main]

use coachd::transcribe::Transcript;
use coachd::transcribe::response::{ResponseFormat, parse};
use libfuzzer_sys::fuzz_target;

const FORMATS: [ResponseFormat; 6] = [
    ResponseFormat::Auto,
    ResponseFormat::Json,
    ResponseFormat::Text,
    ResponseFormat::Srt,
    ResponseFormat::Vtt,
    ResponseFormat::VerboseJson,
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let format = FORMATS[usize::from(selector) % FORMATS.len()];
    let chunk_secs = (selector & 0x80 != 0).then_some(600.0);
    // Bodies are read as text, invalid bytes replaced (reqwest's `text()`).
    let body = String::from_utf8_lossy(body);
    let Ok(t) = parse(format, &body, chunk_secs) else {
        return;
    };
    for s in &t.segments {
        assert!(!s.text.is_empty() && s.text.trim() == s.text, "{s:?}");
    }
    assert_eq!(t.text.trim(), t.text);
    match format {
        ResponseFormat::Srt | ResponseFormat::Vtt => {
            let joined: Vec<&str> = t.segments.iter().map(|s| s.text.as_str()).collect();
            assert_eq!(t.text, joined.join(" "));
        }
        ResponseFormat::Json | ResponseFormat::Text => {
            assert!(t.segments.len() <= 1);
            assert_eq!(t.segments.is_empty(), t.text.is_empty());
            if let Some(s) = t.segments.first() {
                assert_eq!(
                    (s.start, s.end, s.text.as_str()),
                    (0.0, chunk_secs.unwrap_or(0.0), t.text.as_str())
                );
            }
        }
        _ => {}
    }
    // JSON has no NaN or infinity: serde_json writes them as `null`, which the job's result
    // schema (numbers) refuses and which does not read back.
    let json = serde_json::to_string(&t).expect("a transcript serialises");
    let back: Transcript = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
    assert_eq!(back.segments.len(), t.segments.len());
    assert_eq!(back.text, t.text);
});
