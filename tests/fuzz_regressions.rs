//! Inputs found by the cargo-fuzz targets (`fuzz/`, RELIABILITY.md "2. Fuzzing"), each kept as a
//! test of the normal suite with the input inlined, so the fix cannot regress without a fuzzer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use coachd::config::parse_dotenv;

/// dotenv target: a line without `=` made the syntax error quote the whole line, value and all
/// (an API key in a real `.env`), since the name was taken as everything before the first `=`.
#[test]
fn a_dotenv_syntax_error_names_the_variable_not_its_value() {
    let err = parse_dotenv(b"A=1\nOPENAI_API_KEY sk-not-a-real-key\nB=2\n").unwrap_err();
    assert!(!err.contains("sk-not-a-real-key"), "{err}");
    assert!(err.contains("OPENAI_API_KEY"), "{err}");
    // A line that opens with its value names no variable at all.
    let err = parse_dotenv(b"\"sk-not-a-real-key\"\n").unwrap_err();
    assert!(!err.contains("sk-not-a-real-key"), "{err}");
    // An unterminated quote runs to the end of the file: still only the name.
    let err = parse_dotenv(b"KEY=\"sk-not-a-real-key\nB=2\n").unwrap_err();
    assert!(!err.contains("sk-not-a-real-key"), "{err}");
    assert!(err.contains("KEY"), "{err}");
    // The line the target made of `.env.example` (two lines run together): the message quoted
    // the next line's comment.
    let err = parse_dotenv(
        b"COACHD_DB_MAX_CONNECTIONS=10\nCOACHD_DB_CONNECT_TIMEOUTn this directory instead of PostgreSQL\n",
    )
    .unwrap_err();
    assert_eq!(
        err,
        "cannot read .env: syntax error in the line of COACHD_DB_CONNECT_TIMEOUTn (check its quoting)"
    );
}

/// The data of each event an SSE body decodes to (errors as their message), fed in `chunks`.
async fn sse_data(chunks: Vec<&'static [u8]>) -> Vec<Result<String, String>> {
    use futures::StreamExt;
    let body = futures::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from_static(c))),
    );
    coachd::llm::sse::events(body)
        .map(|r| r.map(|e| e.data).map_err(|e| e.to_string()))
        .collect()
        .await
}

/// sse_decode target: an invalid byte after a complete event dropped that event when both came
/// in one chunk, and kept it when the bytes came one by one: what a client got depended on
/// where TCP cut the body. The event before the bad byte is now delivered either way.
#[tokio::test]
async fn an_event_before_invalid_utf8_is_kept_however_the_body_is_cut() {
    const BODY: &[u8] = b"retry: 10\ndata:x\r\rdat\xe1:y \n";
    let whole = sse_data(vec![BODY]).await;
    let bytewise = sse_data(BODY.chunks(1).collect()).await;
    assert_eq!(whole, bytewise);
    assert_eq!(
        whole,
        vec![
            Ok("x".to_owned()),
            Err("the stream is not valid UTF-8".to_owned())
        ]
    );
}

/// transcribe_response target: a cue time of `00:00:03.277e377` (from the fuzzer's WebVTT) read
/// as infinity, and `NaN` as NaN; both became `null` in the job's JSON result, which then no
/// longer read back as a transcript. A time that is not finite is now a malformed cue.
#[test]
fn a_cue_time_that_is_not_finite_is_malformed() {
    use coachd::transcribe::TranscribeError;
    use coachd::transcribe::response::{ResponseFormat, parse};
    for body in [
        "WEBVTT\n\n01:00:01.500 --> 00:00:03.277e377\nHello\n",
        "1\nNaN:00:00,000 --> 00:00:01,000\nHello\n",
        "00:00.000 --> inf:00.000\nHello\n",
    ] {
        let got = parse(ResponseFormat::Vtt, body, None);
        assert!(
            matches!(got, Err(TranscribeError::InvalidResponse(_))),
            "{body:?}: {got:?}"
        );
    }
    // A well-formed cue still reads, and its transcript reads back from its JSON.
    let t = parse(
        ResponseFormat::Srt,
        "1\n00:00:00,000 --> 00:00:01,500\nHello\n",
        None,
    )
    .unwrap();
    assert_eq!((t.segments[0].start, t.segments[0].end), (0.0, 1.5));
    let back: coachd::transcribe::Transcript =
        serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
    assert_eq!(back, t);
}

/// sse_decode target: a body opening with two BOMs panicked inside eventsource-stream, which
/// strips one and then slices the second at byte 1. Every leading BOM is now stripped, however
/// the bytes are cut.
#[tokio::test]
async fn a_body_opening_with_two_boms_decodes_without_a_panic() {
    const BODY: &[u8] = b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\n";
    let whole = sse_data(vec![BODY]).await;
    assert_eq!(whole, vec![Ok("a".to_owned())]);
    let bytewise = sse_data(BODY.chunks(1).collect()).await;
    assert_eq!(bytewise, whole);
}

/// A 16-bit PCM WAV of `channels` at `rate` Hz with `frames` silent frames.
fn wav(channels: u16, rate: u32, frames: u32) -> Vec<u8> {
    let data_len = frames * u32::from(channels) * 2;
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&channels.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * u32::from(channels) * 2).to_le_bytes());
    w.extend_from_slice(&(channels * 2).to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    w.resize(w.len() + data_len as usize, 0);
    w
}

/// transcribe_audio target: a WAV whose header says a sample rate of 0 panicked symphonia 0.5.5
/// (it builds a `TimeBase` with that denominator) inside `ChunkReader::open`. It is now refused
/// as bad audio, naming the header, before symphonia sees it; so is a header with 0 channels.
#[test]
fn a_wav_with_sample_rate_zero_is_bad_audio_not_a_panic() {
    use coachd::transcribe::audio::ChunkReader;
    use coachd::transcribe::{AudioFormat, TranscribeError};
    for (channels, rate, frames) in [(1, 0, 4), (0, 16_000, 0), (1, 0, 0)] {
        let bytes = bytes::Bytes::from(wav(channels, rate, frames));
        let got = std::panic::catch_unwind(|| ChunkReader::open(bytes, AudioFormat::Wav, 600))
            .unwrap_or_else(|_| panic!("open panicked on a WAV of {channels} ch at {rate} Hz"));
        match got {
            Err(TranscribeError::BadAudio(m)) => assert!(m.contains("WAV header"), "{m}"),
            other => panic!("{channels} ch at {rate} Hz: {other:?}"),
        }
    }
    // The same file with a real rate still opens and decodes.
    let ok = ChunkReader::open(bytes::Bytes::from(wav(1, 16_000, 1600)), AudioFormat::Wav, 600)
        .unwrap()
        .expect("a WAV is decodable here");
    assert!(!ok.is_done());
}

#[test]
fn a_markdown_heading_right_after_its_paragraph_keeps_the_document_as_written() {
    // Found by the extract_parse target: a Markdown upload's output is the document as written
    // (here a heading follows its paragraph without a blank line), while its sections, split at
    // the heading, join with one. Same lines, in the same order.
    use coachd::extract::{DocFormat, Extracted, Limits, parse};
    let doc = b"# Intake\n\nFirst.\n## Goals\n- Run\n";
    let limits = Limits {
        max_pages: 8,
        max_output_bytes: 64 * 1024,
    };
    let e = parse(doc, DocFormat::Markdown, limits).unwrap();
    assert_eq!(e.markdown, "# Intake\n\nFirst.\n## Goals\n- Run");
    let titles: Vec<Option<&str>> = e.sections.iter().map(|s| s.title.as_deref()).collect();
    assert_eq!(titles, [Some("Intake"), Some("Goals")]);
    let rebuilt = Extracted::from_sections(DocFormat::Markdown, e.sections.clone(), e.pages);
    assert_eq!(rebuilt.markdown, "# Intake\n\nFirst.\n\n## Goals\n- Run");
    let lines = |m: &str| {
        m.lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(lines(&rebuilt.markdown), lines(&e.markdown));
}

/// transcribe_audio target, twice: bytes accepted as WAV that are no WAV (a shifted `RIFF`) but
/// hold another container's marker further in. symphonia's default probe tried every reader at
/// every marker: as raw ADTS AAC its length estimate overflowed (symphonia-codec-aac 0.5.5
/// subtracts the start position twice), as Matroska its size reader did (symphonia-format-mkv
/// 0.5.5, a zero first byte); panics under overflow checks. coachd now reads an upload only as
/// the container it was accepted as, so both are bad audio.
#[test]
fn bytes_accepted_as_wav_are_read_only_as_wav() {
    use coachd::transcribe::audio::ChunkReader;
    use coachd::transcribe::{AudioFormat, TranscribeError};
    for input in [
        &include_bytes!("data/fuzz/adts-length-overflow.bin")[..],
        &include_bytes!("data/fuzz/mkv-vint-overflow.bin")[..],
    ] {
        let bytes = bytes::Bytes::from_static(input);
        let got = std::panic::catch_unwind(|| ChunkReader::open(bytes, AudioFormat::Wav, 600))
            .unwrap_or_else(|_| panic!("open panicked on {} bytes", input.len()));
        assert!(matches!(got, Err(TranscribeError::BadAudio(_))), "{got:?}");
    }
}
