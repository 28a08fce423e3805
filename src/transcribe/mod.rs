//! Speech to text through an OpenAI-compatible `POST /audio/transcriptions`: OpenAI (`whisper-1`,
//! `gpt-4o-transcribe`, `gpt-4o-mini-transcribe`), Groq (`whisper-large-v3`,
//! `whisper-large-v3-turbo`, base URL `…/openai/v1`) or any compatible server (the local
//! faster-whisper of `scripts/whisper_server.py`, say). The `transcribe` job kind calls
//! [`Transcriber::transcribe`]; this module owns the client, its settings and its typed errors.
//!
//! Long recordings are decoded and split into chunks of `chunk_secs` (cut at a quiet moment, see
//! [`audio`]), each sent as a 16 kHz WAV with the previous chunk's text as `prompt` so the model
//! keeps names and style across the cut; segment times are offset by the chunk's start. A
//! recording that fits in one chunk is sent as it came. Silent chunks are not sent at all.
//! Audio that cannot be decoded here (Opus in WebM or Ogg) is sent whole, so it must fit the
//! upload limit; it cannot be split.
//!
//! Each request is retried on 429 (after its `retry-after`), 5xx, timeouts and connection
//! failures, with exponential backoff; other 4xx are final. The key is a [`Secret`], sent only in
//! the `Authorization` header marked sensitive.

pub mod audio;
mod format;
pub mod response;

use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::multipart::{Form, Part};
use serde::{Deserialize, Serialize};

pub use format::AudioFormat;
pub use response::ResponseFormat;

use crate::secret::Secret;
use audio::{Chunk, ChunkReader};

/// Longest prompt sent with a chunk, in characters: Whisper reads only the last 224 tokens of
/// its prompt, which is about this much English.
pub const MAX_PROMPT_CHARS: usize = 800;

/// Longest upstream error message kept (they can quote the request).
const MAX_ERROR_MESSAGE: usize = 500;

/// How the client reaches its upstream and splits audio (`COACHD_TRANSCRIBE_*`).
#[derive(Debug, Clone)]
pub struct TranscribeSettings {
    /// `COACHD_TRANSCRIBE_BASE_URL`, e.g. `https://api.openai.com/v1`; `/audio/transcriptions`
    /// is appended.
    pub base_url: String,
    /// `COACHD_TRANSCRIBE_API_KEY`; `None` sends no `Authorization` (local servers).
    pub api_key: Option<Secret>,
    /// `COACHD_TRANSCRIBE_MODEL`.
    pub model: String,
    /// `COACHD_TRANSCRIBE_MAX_BYTES`: largest recording accepted, and largest chunk sent.
    pub max_bytes: usize,
    /// `COACHD_TRANSCRIBE_TIMEOUT_SECS`: limit of one upstream request.
    pub timeout: Duration,
    /// `COACHD_TRANSCRIBE_MAX_RETRIES`: retries of one chunk after its first attempt.
    pub max_retries: u32,
    /// `COACHD_TRANSCRIBE_CHUNK_SECS`: length of the chunks long audio is cut into; 0 never
    /// splits (every recording is sent whole).
    pub chunk_secs: u32,
    /// `COACHD_TRANSCRIBE_RETRY_BASE_MS`: first backoff; doubled per retry.
    pub retry_base: Duration,
    /// `COACHD_TRANSCRIBE_MAX_RETRY_WAIT_MS`: longest wait before a retry; a `retry-after`
    /// longer than this ends the attempts with [`TranscribeError::RateLimited`].
    pub max_retry_wait: Duration,
    /// `COACHD_TRANSCRIBE_RESPONSE_FORMAT`.
    pub response_format: ResponseFormat,
    /// `COACHD_TRANSCRIBE_SILENCE_DBFS`: a chunk whose peak stays below this level is silence
    /// and is not sent.
    pub silence_dbfs: f32,
}

impl TranscribeSettings {
    /// Every default, against `base_url` (tests, examples).
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        TranscribeSettings {
            base_url: base_url.into(),
            api_key: None,
            model: model.into(),
            max_bytes: 25 * 1024 * 1024,
            timeout: Duration::from_secs(300),
            max_retries: 2,
            chunk_secs: 600,
            retry_base: Duration::from_millis(500),
            max_retry_wait: Duration::from_secs(30),
            response_format: ResponseFormat::Auto,
            silence_dbfs: -60.0,
        }
    }
}

/// Per-request choices (they cross the job boundary, so they serialize).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscribeOptions {
    /// ISO-639-1 language of the audio (`en`); helps accuracy and latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Vocabulary or context for the first chunk (later chunks get the previous chunk's text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Model instead of the configured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// A recording's transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    /// The whole text.
    pub text: String,
    /// Language as the upstream named it (`english`), or as asked when it names none.
    pub language: Option<String>,
    /// Length of the recording in seconds, when known.
    pub duration_secs: Option<f64>,
    /// Timed pieces, in order, times from the start of the recording. Models that give no
    /// times (`gpt-4o-transcribe`) yield one segment per chunk.
    pub segments: Vec<Segment>,
}

/// One timed piece of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    /// Start, seconds.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
    /// Its text.
    pub text: String,
}

/// Why a transcription failed. Messages never hold the API key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TranscribeError {
    /// Not one of the accepted formats.
    #[error("unsupported audio format (accepted: wav, mp3, m4a, webm, ogg, flac)")]
    Unsupported,
    /// Over the configured limit (before any request), or refused by the upstream with 413.
    #[error("audio too large: {bytes} bytes{}", limit.map(|l| format!(" (limit {l})")).unwrap_or_else(|| " (refused by the upstream)".to_owned()))]
    TooLarge {
        /// Size of what was to be sent.
        bytes: usize,
        /// The configured limit; `None` when it was the upstream's.
        limit: Option<usize>,
    },
    /// The file is not valid audio of its format.
    #[error("bad audio: {0}")]
    BadAudio(String),
    /// No audio at all (zero bytes, or no samples).
    #[error("the audio is empty")]
    Empty,
    /// Only silence: nothing to transcribe.
    #[error("the audio is silent (peak below {threshold_dbfs} dBFS)")]
    Silent {
        /// The configured silence level.
        threshold_dbfs: f32,
    },
    /// 429: retried after `retry_after` until the retries ran out.
    #[error("rate limited by the transcription upstream{}: {message}", retry_after.map(|d| format!(" (retry after {} ms)", d.as_millis())).unwrap_or_default())]
    RateLimited {
        /// From `retry-after-ms` / `retry-after`.
        retry_after: Option<Duration>,
        /// The upstream's message.
        message: String,
    },
    /// 429 `insufficient_quota`, 402: waiting will not help.
    #[error("transcription quota exhausted: {message}")]
    Quota {
        /// The upstream's message.
        message: String,
    },
    /// 401/403: the key is wrong or missing.
    #[error("the transcription upstream refused the key ({status}): {message}")]
    Authentication {
        /// HTTP status.
        status: u16,
        /// The upstream's message.
        message: String,
    },
    /// Any other HTTP error: 5xx (retried) or a 4xx (final).
    #[error("transcription upstream answered {status}: {message}")]
    Upstream {
        /// HTTP status.
        status: u16,
        /// The upstream's message.
        message: String,
    },
    /// No answer within the request timeout.
    #[error("the transcription upstream did not answer within {} s", after.as_secs())]
    Timeout {
        /// The limit that passed.
        after: Duration,
    },
    /// No connection (refused, reset, DNS).
    #[error("the transcription upstream is unreachable: {0}")]
    Unavailable(String),
    /// A 200 whose body is not the asked format.
    #[error("invalid answer from the transcription upstream: {0}")]
    InvalidResponse(String),
}

impl TranscribeError {
    /// A stable machine-readable code, for job errors and API bodies.
    pub fn code(&self) -> &'static str {
        match self {
            TranscribeError::Unsupported => "unsupported_audio",
            TranscribeError::TooLarge { .. } => "audio_too_large",
            TranscribeError::BadAudio(_) => "bad_audio",
            TranscribeError::Empty => "empty_audio",
            TranscribeError::Silent { .. } => "silent_audio",
            TranscribeError::RateLimited { .. } => "upstream_rate_limited",
            TranscribeError::Quota { .. } => "upstream_quota",
            TranscribeError::Authentication { .. } => "upstream_auth",
            TranscribeError::Upstream { .. } => "upstream_error",
            TranscribeError::Timeout { .. } => "upstream_timeout",
            TranscribeError::Unavailable(_) => "upstream_unavailable",
            TranscribeError::InvalidResponse(_) => "invalid_response",
        }
    }

    /// Whether trying the same audio again later may succeed (the job layer's retry rule; the
    /// client has already retried these itself).
    pub fn is_retryable(&self) -> bool {
        match self {
            TranscribeError::RateLimited { .. }
            | TranscribeError::Timeout { .. }
            | TranscribeError::Unavailable(_) => true,
            TranscribeError::Upstream { status, .. } => *status >= 500 || *status == 408,
            _ => false,
        }
    }

    /// Whether the bad input is the caller's (a 4xx at submit, a failed job without retries).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            TranscribeError::Unsupported
                | TranscribeError::TooLarge { .. }
                | TranscribeError::BadAudio(_)
                | TranscribeError::Empty
                | TranscribeError::Silent { .. }
        )
    }
}

/// The transcription client; cheap to clone.
#[derive(Debug, Clone)]
pub struct Transcriber {
    settings: TranscribeSettings,
    http: reqwest::Client,
    url: String,
}

/// What one request sends.
struct Upload<'a> {
    bytes: Bytes,
    format: AudioFormat,
    name: String,
    model: &'a str,
    prompt: Option<String>,
    language: Option<&'a str>,
    /// Length in seconds when decoded here.
    secs: Option<f64>,
}

impl Transcriber {
    /// A client for `settings`, sending through `http` (its pool is shared with the app).
    pub fn new(settings: TranscribeSettings, http: reqwest::Client) -> Self {
        let url = format!("{}/audio/transcriptions", settings.base_url.trim_end_matches('/'));
        Transcriber { settings, http, url }
    }

    /// The settings in force.
    pub fn settings(&self) -> &TranscribeSettings {
        &self.settings
    }

    /// Transcribes a recording. `progress` is called with 0 at the start, after each chunk with
    /// the share of the input done, and with 1 at the end.
    pub async fn transcribe(
        &self,
        audio: Bytes,
        format: AudioFormat,
        opts: TranscribeOptions,
        progress: &(dyn Fn(f32) + Send + Sync),
    ) -> Result<Transcript, TranscribeError> {
        if audio.is_empty() {
            return Err(TranscribeError::Empty);
        }
        if audio.len() > self.settings.max_bytes {
            return Err(TranscribeError::TooLarge {
                bytes: audio.len(),
                limit: Some(self.settings.max_bytes),
            });
        }
        let model = opts.model.as_deref().unwrap_or(&self.settings.model);
        let language = opts.language.as_deref();
        progress(0.0);

        let reader = if self.settings.chunk_secs == 0 {
            None
        } else {
            let (bytes, secs) = (audio.clone(), self.settings.chunk_secs);
            blocking(move || ChunkReader::open(bytes, format, secs)).await?
        };
        let Some(mut reader) = reader else {
            // Not decodable here (or splitting is off): the upstream gets the file as it came.
            let upload = Upload {
                bytes: audio,
                format,
                name: format!("audio.{}", format.as_str()),
                model,
                prompt: opts.prompt.clone(),
                language,
                secs: None,
            };
            let mut t = self.send_with_retries(&upload).await?;
            if t.language.is_none() {
                t.language = opts.language.clone();
            }
            progress(1.0);
            return Ok(t);
        };
        // A chunk's WAV (2 bytes a sample plus the header) must fit the upload limit too.
        reader.cap_chunk_samples(self.settings.max_bytes.saturating_sub(44) / 2);

        let mut out = Transcript {
            text: String::new(),
            language: None,
            duration_secs: None,
            segments: Vec::new(),
        };
        let mut previous: Option<String> = opts.prompt.clone();
        let mut index = 0usize;
        let mut sent_any = false;
        loop {
            let (r, chunk) = blocking(move || {
                let c = reader.next_chunk();
                Ok((reader, c))
            })
            .await?;
            reader = r;
            let Some(chunk) = chunk? else { break };
            let first_and_only = index == 0 && reader.is_done();
            index += 1;
            if chunk.peak_dbfs() < self.settings.silence_dbfs {
                progress(reader.progress());
                continue;
            }
            let upload = if first_and_only {
                Upload {
                    bytes: audio.clone(),
                    format,
                    name: format!("audio.{}", format.as_str()),
                    model,
                    prompt: previous.clone(),
                    language,
                    secs: Some(chunk.duration_secs()),
                }
            } else {
                self.chunk_upload(&chunk, index, model, previous.as_deref(), language)
            };
            let t = self.send_with_retries(&upload).await?;
            sent_any = true;
            if !t.text.is_empty() {
                previous = Some(prompt_tail(&t.text));
            }
            merge(&mut out, t, chunk.start_secs);
            progress(reader.progress());
        }
        let total = reader.emitted_secs();
        if total <= 0.0 {
            return Err(TranscribeError::Empty);
        }
        if !sent_any {
            return Err(TranscribeError::Silent {
                threshold_dbfs: self.settings.silence_dbfs,
            });
        }
        out.duration_secs = Some(total);
        if out.language.is_none() {
            out.language = opts.language.clone();
        }
        progress(1.0);
        Ok(out)
    }

    fn chunk_upload<'a>(
        &self,
        chunk: &Chunk,
        index: usize,
        model: &'a str,
        prompt: Option<&str>,
        language: Option<&'a str>,
    ) -> Upload<'a> {
        Upload {
            bytes: Bytes::from(audio::encode_wav(&chunk.samples)),
            format: AudioFormat::Wav,
            name: format!("chunk-{index}.wav"),
            model,
            prompt: prompt.map(str::to_owned),
            language,
            secs: Some(chunk.duration_secs()),
        }
    }

    async fn send_with_retries(&self, upload: &Upload<'_>) -> Result<Transcript, TranscribeError> {
        if upload.bytes.len() > self.settings.max_bytes {
            return Err(TranscribeError::TooLarge {
                bytes: upload.bytes.len(),
                limit: Some(self.settings.max_bytes),
            });
        }
        let mut attempt = 0u32;
        loop {
            let err = match self.send_once(upload).await {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            if attempt >= self.settings.max_retries || !err.is_retryable() {
                return Err(err);
            }
            let wait = match &err {
                TranscribeError::RateLimited {
                    retry_after: Some(after),
                    ..
                } => {
                    if *after > self.settings.max_retry_wait {
                        return Err(err);
                    }
                    *after
                }
                _ => self.backoff(attempt),
            };
            tracing::warn!(
                code = err.code(),
                attempt = attempt + 1,
                wait_ms = wait.as_millis() as u64,
                "transcription request failed; retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.settings.retry_base.saturating_mul(1u32 << attempt.min(16));
        // Up to a quarter more, so clients that failed together do not retry together.
        let jitter = base.mul_f64(rand::thread_rng().gen_range(0.0..0.25));
        (base + jitter).min(self.settings.max_retry_wait)
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(key) = &self.settings.api_key
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        {
            v.set_sensitive(true);
            h.insert(AUTHORIZATION, v);
        }
        h
    }

    async fn send_once(&self, upload: &Upload<'_>) -> Result<Transcript, TranscribeError> {
        let format = self.settings.response_format.resolve(upload.model);
        let file = Part::stream_with_length(upload.bytes.clone(), upload.bytes.len() as u64)
            .file_name(upload.name.clone())
            .mime_str(upload.format.mime())
            .map_err(|e| TranscribeError::InvalidResponse(e.to_string()))?;
        let mut form = Form::new()
            .part("file", file)
            .text("model", upload.model.to_owned())
            .text("response_format", format.wire_name(upload.model));
        if let Some(p) = upload.prompt.as_deref().filter(|p| !p.trim().is_empty()) {
            form = form.text("prompt", p.to_owned());
        }
        if let Some(l) = upload.language {
            form = form.text("language", l.to_owned());
        }
        let response = self
            .http
            .post(&self.url)
            .headers(self.headers())
            .timeout(self.settings.timeout)
            .multipart(form)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.map_err(|e| self.transport_error(&e))?;
        if !(200..300).contains(&status) {
            return Err(map_status(status, &headers, &body, upload.bytes.len()));
        }
        response::parse(format, &body, upload.secs)
    }

    fn transport_error(&self, e: &reqwest::Error) -> TranscribeError {
        if e.is_timeout() {
            return TranscribeError::Timeout {
                after: self.settings.timeout,
            };
        }
        // reqwest's messages name the URL, never the headers: no key can leak here.
        TranscribeError::Unavailable(truncate(&e.to_string()))
    }
}

/// Runs decoding off the async threads; a decoder that panics becomes [`TranscribeError::BadAudio`].
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TranscribeError> + Send + 'static,
) -> Result<T, TranscribeError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(_) => Err(TranscribeError::BadAudio(
            "the audio decoder failed on this file".to_owned(),
        )),
    }
}

/// Appends one chunk's transcript, its times moved by the chunk's start.
fn merge(out: &mut Transcript, t: Transcript, offset: f64) {
    if !t.text.is_empty() {
        if !out.text.is_empty() {
            out.text.push(' ');
        }
        out.text.push_str(&t.text);
    }
    if out.language.is_none() {
        out.language = t.language;
    }
    out.segments.extend(t.segments.into_iter().map(|s| Segment {
        start: s.start + offset,
        end: s.end + offset,
        text: s.text,
    }));
}

/// The end of `text`, at most [`MAX_PROMPT_CHARS`] characters, starting at a word.
pub fn prompt_tail(text: &str) -> String {
    let chars = text.chars().count();
    if chars <= MAX_PROMPT_CHARS {
        return text.to_owned();
    }
    let tail: String = text.chars().skip(chars - MAX_PROMPT_CHARS).collect();
    match tail.split_once(char::is_whitespace) {
        Some((_, rest)) if !rest.is_empty() => rest.trim_start().to_owned(),
        _ => tail,
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_ERROR_MESSAGE {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(MAX_ERROR_MESSAGE).collect();
    t.push('…');
    t
}

/// Retry-after from `retry-after-ms` (OpenAI) or `retry-after` (seconds).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    let secs = text("retry-after")?.parse::<f64>().ok()?;
    Some(Duration::from_secs_f64(secs.max(0.0)))
}

/// An HTTP error status and OpenAI's `{"error":{message,type,code}}` body, typed.
fn map_status(status: u16, headers: &HeaderMap, body: &str, sent: usize) -> TranscribeError {
    let parsed: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let err = &parsed["error"];
    let message = truncate(
        err["message"]
            .as_str()
            .or_else(|| parsed["detail"].as_str())
            .unwrap_or(&format!("HTTP {status}")),
    );
    let code = err["code"].as_str().unwrap_or_default();
    let kind = err["type"].as_str().unwrap_or_default();
    match status {
        413 => TranscribeError::TooLarge {
            bytes: sent,
            limit: None,
        },
        401 | 403 => TranscribeError::Authentication { status, message },
        402 => TranscribeError::Quota { message },
        429 if code == "insufficient_quota" || kind == "insufficient_quota" => {
            TranscribeError::Quota { message }
        }
        429 => TranscribeError::RateLimited {
            retry_after: retry_after(headers),
            message,
        },
        400 if {
            let m = message.to_ascii_lowercase();
            m.contains("corrupt")
                || m.contains("decode")
                || m.contains("file format")
                || m.contains("invalid file")
        } =>
        {
            TranscribeError::BadAudio(message)
        }
        _ => TranscribeError::Upstream { status, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_keeps_the_end_of_the_text_from_a_word() {
        assert_eq!(prompt_tail("short text"), "short text");
        let long = "word ".repeat(400);
        let tail = prompt_tail(long.trim());
        assert!(tail.chars().count() <= MAX_PROMPT_CHARS);
        assert!(tail.starts_with("word"), "{tail:?}");
    }

    #[test]
    fn statuses_are_typed() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        let e = map_status(
            429,
            &h,
            r#"{"error":{"message":"slow down","code":"rate_limit_exceeded"}}"#,
            1,
        );
        assert_eq!(
            e,
            TranscribeError::RateLimited {
                retry_after: Some(Duration::from_secs(2)),
                message: "slow down".into()
            }
        );
        assert!(e.is_retryable());
        let q = map_status(
            429,
            &h,
            r#"{"error":{"message":"x","type":"insufficient_quota"}}"#,
            1,
        );
        assert_eq!(q.code(), "upstream_quota");
        assert!(!q.is_retryable());
        assert_eq!(map_status(413, &h, "", 9).code(), "audio_too_large");
        assert!(map_status(503, &h, "", 1).is_retryable());
        assert!(!map_status(400, &h, "{}", 1).is_retryable());
        let bad = map_status(
            400,
            &h,
            r#"{"error":{"message":"Audio file might be corrupted or unsupported"}}"#,
            1,
        );
        assert_eq!(bad.code(), "bad_audio");
        assert!(bad.is_client_error());
    }

    #[test]
    fn chunks_merge_with_offsets() {
        let mut out = Transcript {
            text: String::new(),
            language: None,
            duration_secs: None,
            segments: vec![],
        };
        let part = |text: &str| Transcript {
            text: text.into(),
            language: Some("english".into()),
            duration_secs: Some(10.0),
            segments: vec![Segment {
                start: 1.0,
                end: 2.0,
                text: text.into(),
            }],
        };
        merge(&mut out, part("a"), 0.0);
        merge(&mut out, part("b"), 10.0);
        assert_eq!(out.text, "a b");
        assert_eq!(out.segments[1].start, 11.0);
        assert_eq!(out.language.as_deref(), Some("english"));
    }
}
