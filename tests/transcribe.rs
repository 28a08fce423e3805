//! The transcription client (`coachd::transcribe`) against the fake upstream's
//! `/v1/audio/transcriptions`: every response format, chunking with the previous chunk's text as
//! prompt and offset segment times, retries on 429 (honouring `retry-after`), 5xx and timeouts,
//! no retry on other 4xx, limits checked before any request, and the key kept out of output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coachd::config::Secret;
use coachd::fake_upstream::{FakeUpstream, Fault, Script};
use coachd::transcribe::audio::{encode_wav, encode_wav_at};
use coachd::transcribe::{
    AudioFormat, ResponseFormat, TranscribeError, TranscribeOptions, TranscribeSettings, Transcriber,
};

const KEY: &str = "sk-transcribe-secret-4242";

/// A 440 Hz tone at 16 kHz with a silent gap at each whole multiple of `gap_every` seconds.
fn speech_like(secs: f64, gap_every: f64) -> Vec<i16> {
    (0..(secs * 16_000.0) as usize)
        .map(|i| {
            let t = i as f64 / 16_000.0;
            let in_gap = gap_every > 0.0 && (t % gap_every) > gap_every - 0.5;
            if in_gap {
                0
            } else {
                ((t * 440.0 * std::f64::consts::TAU).sin() * 6_000.0) as i16
            }
        })
        .collect()
}

fn settings(fake: &FakeUpstream) -> TranscribeSettings {
    let mut s = TranscribeSettings::new(fake.base_url(), "whisper-1");
    s.api_key = Some(Secret::new(KEY));
    s.timeout = Duration::from_secs(5);
    s.retry_base = Duration::from_millis(10);
    s.max_retry_wait = Duration::from_secs(3);
    s
}

fn client(s: TranscribeSettings) -> Transcriber {
    Transcriber::new(s, reqwest::Client::new())
}

async fn run(t: &Transcriber, wav: Vec<u8>) -> Result<coachd::transcribe::Transcript, TranscribeError> {
    t.transcribe(
        Bytes::from(wav),
        AudioFormat::Wav,
        TranscribeOptions::default(),
        &|_| {},
    )
    .await
}

#[tokio::test]
async fn every_response_format_is_parsed() {
    let fake = FakeUpstream::start_with_key(Some(KEY)).await.unwrap();
    let wav = encode_wav(&speech_like(4.0, 0.0));
    let n = wav.len();
    let expected = format!("Audio audio.wav has {n} bytes. Prompt had 0 characters.");
    for format in [
        ResponseFormat::VerboseJson,
        ResponseFormat::Json,
        ResponseFormat::Text,
        ResponseFormat::Srt,
        ResponseFormat::Vtt,
    ] {
        let mut s = settings(&fake);
        s.response_format = format;
        let t = run(&client(s), wav.clone()).await.unwrap();
        assert_eq!(t.text, expected, "{format:?}");
        assert_eq!(t.duration_secs, Some(4.0), "{format:?}");
        match format {
            ResponseFormat::VerboseJson | ResponseFormat::Srt | ResponseFormat::Vtt => {
                assert_eq!(t.segments.len(), 2, "{format:?}");
                assert_eq!(t.segments[0].text, format!("Audio audio.wav has {n} bytes."));
                assert!(
                    (t.segments[0].end - 2.0).abs() < 1e-3,
                    "{format:?} {:?}",
                    t.segments
                );
                assert!(
                    (t.segments[1].end - 4.0).abs() < 1e-3,
                    "{format:?} {:?}",
                    t.segments
                );
            }
            _ => {
                // Untimed formats: one segment spanning the chunk.
                assert_eq!(t.segments.len(), 1, "{format:?}");
                assert_eq!((t.segments[0].start, t.segments[0].end), (0.0, 4.0));
            }
        }
        if format == ResponseFormat::VerboseJson {
            assert_eq!(t.language.as_deref(), Some("english"));
        }
    }
    let sent: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r.body["response_format"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent, ["verbose_json", "json", "text", "srt", "vtt"]);
    let r = &fake.requests()[0];
    assert_eq!(r.body["model"], "whisper-1");
    assert_eq!(r.body["file"]["content_type"], "audio/wav");
    assert_eq!(r.body["file"]["bytes"], n);
}

#[tokio::test]
async fn gpt_4o_models_are_asked_for_json_and_give_one_segment() {
    let fake = FakeUpstream::start().await.unwrap();
    let t = client(settings(&fake));
    let opts = TranscribeOptions {
        model: Some("gpt-4o-mini-transcribe".into()),
        language: Some("en".into()),
        prompt: None,
    };
    let out = t
        .transcribe(
            Bytes::from(encode_wav(&speech_like(3.0, 0.0))),
            AudioFormat::Wav,
            opts,
            &|_| {},
        )
        .await
        .unwrap();
    let r = &fake.requests()[0];
    assert_eq!(r.body["model"], "gpt-4o-mini-transcribe");
    assert_eq!(r.body["response_format"], "json");
    assert_eq!(r.body["language"], "en");
    assert_eq!(out.segments.len(), 1);
    assert_eq!(out.language.as_deref(), Some("en"));

    // Forcing verbose_json on such a model is OpenAI's 400, which is final.
    let mut s = settings(&fake);
    s.response_format = ResponseFormat::VerboseJson;
    s.model = "gpt-4o-transcribe".into();
    let e = run(&client(s), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, TranscribeError::Upstream { status: 400, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("not compatible"), "{e}");
    assert_eq!(fake.request_count("/audio/transcriptions"), 2);
}

#[tokio::test]
async fn long_audio_is_chunked_with_the_previous_text_as_prompt_and_offset_times() {
    let fake = FakeUpstream::start().await.unwrap();
    let mut s = settings(&fake);
    s.chunk_secs = 10;
    let progress = Mutex::new(Vec::new());
    // 25 s with a half-second gap before every 10 s mark; the cuts land in the gaps.
    let audio = encode_wav(&speech_like(25.0, 10.0));
    let opts = TranscribeOptions {
        prompt: Some("Coaching session with Dana.".into()),
        ..Default::default()
    };
    let t = client(s)
        .transcribe(Bytes::from(audio), AudioFormat::Wav, opts, &|p| {
            progress.lock().unwrap().push(p)
        })
        .await
        .unwrap();

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3);
    let names: Vec<&str> = reqs
        .iter()
        .map(|r| r.body["file"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["chunk-1.wav", "chunk-2.wav", "chunk-3.wav"]);
    // The first chunk carries the caller's prompt, each later one the text of the one before.
    assert_eq!(reqs[0].body["prompt"], "Coaching session with Dana.");
    let chunk_text = |i: usize| {
        format!(
            "Audio chunk-{}.wav has {} bytes. Prompt had {} characters.",
            i + 1,
            reqs[i].body["file"]["bytes"],
            reqs[i].body["prompt"].as_str().map_or(0, |p| p.chars().count())
        )
    };
    assert_eq!(reqs[1].body["prompt"], chunk_text(0));
    assert_eq!(reqs[2].body["prompt"], chunk_text(1));
    assert_eq!(
        t.text,
        format!("{} {} {}", chunk_text(0), chunk_text(1), chunk_text(2))
    );

    // Two segments per chunk, times moved to the chunk's place in the recording.
    assert_eq!(t.segments.len(), 6);
    let chunk_secs: Vec<f64> = reqs
        .iter()
        .map(|r| (r.body["file"]["bytes"].as_u64().unwrap() - 44) as f64 / 32_000.0)
        .collect();
    assert!((9.5..=10.0).contains(&chunk_secs[0]), "{chunk_secs:?}");
    assert!(
        (t.segments[2].start - chunk_secs[0]).abs() < 1e-6,
        "{:?}",
        t.segments
    );
    assert!((t.segments[5].end - 25.0).abs() < 1e-3, "{:?}", t.segments);
    assert!(t.segments.windows(2).all(|w| w[0].end <= w[1].start + 1e-9));
    assert_eq!(t.duration_secs.map(|d| (d * 1000.0).round()), Some(25_000.0));

    let p = progress.lock().unwrap().clone();
    assert_eq!(p.first(), Some(&0.0));
    assert_eq!(p.last(), Some(&1.0));
    assert!(p.len() >= 5 && p.windows(2).all(|w| w[0] <= w[1]), "{p:?}");
}

#[tokio::test]
async fn audio_at_another_rate_is_sent_whole_when_it_fits_one_chunk() {
    let fake = FakeUpstream::start().await.unwrap();
    let samples: Vec<i16> = speech_like(2.0, 0.0).iter().flat_map(|s| [*s, *s, *s]).collect();
    let wav = encode_wav_at(&samples, 48_000);
    let n = wav.len();
    let t = run(&client(settings(&fake)), wav).await.unwrap();
    let r = &fake.requests()[0];
    assert_eq!(r.body["file"]["name"], "audio.wav");
    assert_eq!(r.body["file"]["bytes"], n);
    assert_eq!(t.duration_secs, Some(2.0));
}

#[tokio::test]
async fn rate_limits_are_retried_after_retry_after() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.enqueue(
        "*",
        Script::default().with_fault(Fault::Status {
            status: 429,
            retry_after: Some(1),
        }),
    );
    let started = Instant::now();
    let t = run(&client(settings(&fake)), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    assert!(t.text.starts_with("Audio audio.wav"));
    assert_eq!(fake.request_count("/audio/transcriptions"), 2);

    // A retry-after longer than the longest wait ends the attempts at once, typed.
    fake.enqueue(
        "*",
        Script::default().with_fault(Fault::Status {
            status: 429,
            retry_after: Some(60),
        }),
    );
    let e = run(&client(settings(&fake)), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        TranscribeError::RateLimited {
            retry_after: Some(Duration::from_secs(60)),
            message: "Rate limit reached for gpt-4 in organization org-********** on tokens per min (TPM): Limit 10000, Used 9348, Requested 5086. Please try again in 26.604s.".into()
        }
    );
    assert!(e.is_retryable());
    assert_eq!(fake.request_count("/audio/transcriptions"), 3);
}

#[tokio::test]
async fn server_errors_and_timeouts_are_retried_then_reported() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.enqueue("*", Script::status(500));
    fake.enqueue("*", Script::status(503));
    let t = run(&client(settings(&fake)), encode_wav(&speech_like(1.0, 0.0))).await;
    assert!(t.is_ok(), "{t:?}");
    assert_eq!(fake.request_count("/audio/transcriptions"), 3);

    // Three 502s with two retries: the last error comes back, typed and retryable.
    for _ in 0..3 {
        fake.enqueue("*", Script::status(502));
    }
    let e = run(&client(settings(&fake)), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, TranscribeError::Upstream { status: 502, .. }),
        "{e:?}"
    );
    assert!(e.is_retryable());
    assert_eq!(fake.request_count("/audio/transcriptions"), 6);

    // A slow answer times out, and the retry that is fast succeeds.
    let slow = Script {
        header_delay: Duration::from_secs(3),
        ..Script::default()
    };
    fake.enqueue("*", slow);
    let mut s = settings(&fake);
    s.timeout = Duration::from_millis(300);
    let t = run(&client(s.clone()), encode_wav(&speech_like(1.0, 0.0))).await;
    assert!(t.is_ok(), "{t:?}");
    assert_eq!(fake.request_count("/audio/transcriptions"), 8);

    s.max_retries = 0;
    fake.enqueue("*", Script::default().with_fault(Fault::Stall { after: 0 }));
    let e = run(&client(s), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        TranscribeError::Timeout {
            after: Duration::from_millis(300)
        }
    );
    assert_eq!(e.code(), "upstream_timeout");
}

#[tokio::test]
async fn other_client_errors_are_not_retried() {
    let fake = FakeUpstream::start_with_key(Some("another-key")).await.unwrap();
    let e = run(&client(settings(&fake)), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, TranscribeError::Authentication { status: 401, .. }),
        "{e:?}"
    );
    assert!(!e.to_string().contains(KEY));
    assert_eq!(fake.request_count("/audio/transcriptions"), 1);

    let fake = FakeUpstream::start().await.unwrap();
    fake.enqueue("*", Script::status(400));
    let e = run(&client(settings(&fake)), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, TranscribeError::Upstream { status: 400, .. }),
        "{e:?}"
    );
    assert!(!e.is_retryable());
    assert_eq!(fake.request_count("/audio/transcriptions"), 1);

    fake.enqueue("*", Script::status(413));
    let e = run(&client(settings(&fake)), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, TranscribeError::TooLarge { limit: None, .. }),
        "{e:?}"
    );
    assert_eq!(fake.request_count("/audio/transcriptions"), 2);

    fake.enqueue("*", Script::default().with_fault(Fault::Quota));
    let e = run(&client(settings(&fake)), encode_wav(&speech_like(1.0, 0.0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "upstream_quota");
    assert_eq!(fake.request_count("/audio/transcriptions"), 3);
}

#[tokio::test]
async fn bad_input_fails_before_any_request() {
    let fake = FakeUpstream::start().await.unwrap();
    let mut s = settings(&fake);
    s.max_bytes = 10_000;
    let t = client(s);
    let e = run(&t, encode_wav(&speech_like(1.0, 0.0))).await.unwrap_err();
    assert_eq!(
        e,
        TranscribeError::TooLarge {
            bytes: 32_044,
            limit: Some(10_000)
        }
    );
    assert!(e.is_client_error());
    assert_eq!(run(&t, Vec::new()).await.unwrap_err(), TranscribeError::Empty);
    // A header and no samples.
    assert_eq!(
        run(&t, encode_wav(&[])).await.unwrap_err(),
        TranscribeError::Empty
    );
    // Digital silence is not sent.
    let e = run(&t, encode_wav(&vec![0; 4_000])).await.unwrap_err();
    assert_eq!(e.code(), "silent_audio");
    // Not a WAV at all.
    let e = run(&t, b"RIFF\x10\0\0\0WAVEjunkjunkjunk".to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.code(), "bad_audio");
    // An ID3 tag followed by noise: no MP3 frame to decode.
    let mut mp3 = b"ID3\x04\0\0\0\0\0\x10".to_vec();
    mp3.extend((0..4_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x7F));
    let e = t
        .transcribe(
            Bytes::from(mp3),
            AudioFormat::Mp3,
            TranscribeOptions::default(),
            &|_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(e.code(), "bad_audio" | "empty_audio"), "{e:?}");
    assert!(e.is_client_error());
    assert_eq!(fake.request_count("/audio/transcriptions"), 0);
}

#[tokio::test]
async fn audio_not_decodable_here_is_sent_whole() {
    let fake = FakeUpstream::start().await.unwrap();
    // An EBML header: WebM whose codec (Opus, typically) is not decoded here.
    let webm = Bytes::from_static(&[0x1A, 0x45, 0xDF, 0xA3, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let t = client(settings(&fake))
        .transcribe(webm, AudioFormat::Webm, TranscribeOptions::default(), &|_| {})
        .await
        .unwrap();
    let r = &fake.requests()[0];
    assert_eq!(r.body["file"]["name"], "audio.webm");
    assert_eq!(r.body["file"]["content_type"], "audio/webm");
    assert!(t.text.contains("has 16 bytes"), "{}", t.text);
}

#[tokio::test]
async fn the_key_is_sent_as_a_bearer_and_never_shown() {
    let fake = FakeUpstream::start_with_key(Some(KEY)).await.unwrap();
    let t = client(settings(&fake));
    run(&t, encode_wav(&speech_like(1.0, 0.0))).await.unwrap();
    assert_eq!(
        fake.requests()[0]
            .headers
            .get("authorization")
            .map(String::as_str),
        Some(format!("Bearer {KEY}").as_str())
    );
    let shown = format!("{t:?} {:?}", t.settings());
    assert!(!shown.contains(KEY), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
}

/// The fake's own wire format, read raw (so a mistake shared by the fake and the client's parser
/// cannot hide): OpenAI's bodies and content types per format, and its refusals.
#[tokio::test]
async fn the_fake_speaks_openais_wire_format() {
    let fake = FakeUpstream::start().await.unwrap();
    let url = format!("{}/audio/transcriptions", fake.base_url());
    let http = reqwest::Client::new();
    let post = |fields: Vec<(&'static str, String)>, file: Option<(&'static str, Vec<u8>)>| {
        let mut form = reqwest::multipart::Form::new();
        for (k, v) in fields {
            form = form.text(k, v);
        }
        if let Some((name, bytes)) = file {
            form = form.part("file", reqwest::multipart::Part::bytes(bytes).file_name(name));
        }
        http.post(&url).multipart(form).send()
    };
    let wav = encode_wav(&speech_like(2.0, 0.0));
    let fields = |format: &str| {
        vec![
            ("model", "whisper-1".to_owned()),
            ("response_format", format.to_owned()),
        ]
    };

    let r = post(fields("srt"), Some(("a.wav", wav.clone()))).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let body = r.text().await.unwrap();
    assert!(
        body.starts_with("1\n00:00:00,000 --> 00:00:01,000\nAudio a.wav has 64044 bytes.\n\n2\n"),
        "{body:?}"
    );
    let body = post(fields("vtt"), Some(("a.wav", wav.clone())))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n"),
        "{body:?}"
    );
    let body = post(fields("text"), Some(("a.wav", wav.clone())))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "Audio a.wav has 64044 bytes. Prompt had 0 characters.\n");
    let v: serde_json::Value = post(fields("verbose_json"), Some(("a.wav", wav.clone())))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["task"], "transcribe");
    assert_eq!(v["duration"], 2.0);
    for key in [
        "id",
        "seek",
        "start",
        "end",
        "text",
        "tokens",
        "temperature",
        "avg_logprob",
        "compression_ratio",
        "no_speech_prob",
    ] {
        assert!(!v["segments"][0][key].is_null(), "segment lacks {key}: {v}");
    }
    let v: serde_json::Value = post(
        vec![("model", "whisper-1".to_owned())],
        Some(("a.wav", wav.clone())),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        v["usage"],
        serde_json::json!({"type": "duration", "seconds": 2}),
        "json is the default"
    );

    // Refusals, in OpenAI's error shape.
    for (fields, file, status, needle) in [
        (fields("json"), None, 400, "field required"),
        (
            fields("json"),
            Some(("notes.pdf", b"%PDF".to_vec())),
            400,
            "Invalid file format",
        ),
        (fields("xml"), Some(("a.wav", wav.clone())), 400, "is not one of"),
        (
            vec![
                ("model", "gpt-4o-transcribe".to_owned()),
                ("response_format", "verbose_json".to_owned()),
            ],
            Some(("a.wav", wav.clone())),
            400,
            "not compatible",
        ),
        (
            fields("json"),
            Some(("big.wav", vec![0; 25 * 1024 * 1024 + 1])),
            413,
            "Maximum content size",
        ),
    ] {
        let r = post(fields, file).await.unwrap();
        assert_eq!(r.status(), status, "{needle}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{v}");
    }
}
