//! The fake's OpenAI `POST /v1/audio/transcriptions`: multipart in (`file`, `model`,
//! `response_format`, `prompt`, `language`, `temperature`), every response format out (`json`,
//! `text`, `srt`, `vtt`, `verbose_json`), with OpenAI's own refusals (no file, a file type it does
//! not take, `verbose_json` asked of a `gpt-4o*-transcribe` model, over 25 MiB) and the scripted
//! faults and delays of chat (a queued `Script::status(429)` answers 429 with `retry-after`).
//!
//! Unless a script gives text, the answer is derived from the request so tests can check what
//! was sent: `Audio <file name> has <N> bytes.` then `Prompt had <P> characters.`, as two
//! segments splitting the file's duration (read from a WAV header; for other formats one second
//! per 16 000 bytes).
//!
//! Each request is recorded (`FakeUpstream::requests`) with a JSON body of its fields:
//! `{model, response_format, prompt, language, temperature, file: {name, content_type, bytes}}`.

use std::sync::Arc;

use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Dialect, Fault, Script, Shared, check_key, error_response, lock, quota_response};

/// OpenAI's upload limit.
const MAX_FILE_BYTES: usize = 25 * 1024 * 1024;

const EXTENSIONS: &[&str] = &[
    "flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm",
];

#[derive(Default)]
struct Fields {
    file: Option<(String, String, axum::body::Bytes)>,
    model: Option<String>,
    response_format: Option<String>,
    prompt: Option<String>,
    language: Option<String>,
    temperature: Option<String>,
}

pub(super) async fn transcriptions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> Response {
    let mut f = Fields::default();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return openai_error(400, &format!("Could not parse multipart form: {e}"), None),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let file_name = field.file_name().unwrap_or_default().to_owned();
            let content_type = field.content_type().unwrap_or_default().to_owned();
            match field.bytes().await {
                Ok(b) => f.file = Some((file_name, content_type, b)),
                Err(e) => return openai_error(400, &format!("Could not parse multipart form: {e}"), None),
            }
            continue;
        }
        let Ok(text) = field.text().await else {
            return openai_error(400, "Could not parse multipart form", None);
        };
        match name.as_str() {
            "model" => f.model = Some(text),
            "response_format" => f.response_format = Some(text),
            "prompt" => f.prompt = Some(text),
            "language" => f.language = Some(text),
            "temperature" => f.temperature = Some(text),
            _ => {}
        }
    }
    let recorded = json!({
        "model": f.model,
        "response_format": f.response_format,
        "prompt": f.prompt,
        "language": f.language,
        "temperature": f.temperature,
        "file": f.file.as_ref().map(|(name, ct, b)| json!({"name": name, "content_type": ct, "bytes": b.len()})),
    });
    shared.record("/v1/audio/transcriptions", &headers, &recorded);
    if let Some(denied) = check_key(&shared, &headers, Dialect::OpenAi) {
        return denied;
    }
    let model = f.model.clone().unwrap_or_default();
    let script = scripted(&shared, &model);
    if let Some(s) = &script {
        if !s.header_delay.is_zero() {
            tokio::time::sleep(s.header_delay).await;
        }
        match s.fault {
            Some(Fault::Status { status, retry_after }) => {
                return error_response(Dialect::OpenAi, status, retry_after);
            }
            Some(Fault::Quota) => return quota_response(),
            Some(Fault::Stall { .. }) => std::future::pending::<()>().await,
            _ => {}
        }
    }

    let Some((file_name, _, file)) = f.file else {
        return openai_error(
            400,
            "1 validation error for Request\nbody -> file\n  field required (type=value_error.missing)",
            None,
        );
    };
    if model.is_empty() {
        return openai_error(400, "you must provide a model parameter", Some("model"));
    }
    if file.len() > MAX_FILE_BYTES {
        return error_response(Dialect::OpenAi, 413, None);
    }
    let ext = file_name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    if !ext.as_deref().is_some_and(|e| EXTENSIONS.contains(&e)) {
        return openai_error(
            400,
            "Invalid file format. Supported formats: ['flac', 'm4a', 'mp3', 'mp4', 'mpeg', 'mpga', 'oga', 'ogg', 'wav', 'webm']",
            None,
        );
    }
    let format = f.response_format.as_deref().unwrap_or("json");
    let gpt4o = model.starts_with("gpt-4o");
    if gpt4o && !matches!(format, "json" | "text") {
        return openai_error(
            400,
            &format!(
                "response_format '{format}' is not compatible with model '{model}'. Use 'json' or 'text' instead."
            ),
            Some("response_format"),
        );
    }

    let duration = wav_duration(&file).unwrap_or(file.len() as f64 / 16_000.0);
    let prompt_chars = f.prompt.as_deref().map_or(0, |p| p.chars().count());
    let segments: Vec<(f64, f64, String)> = match &script {
        Some(s) if !s.echo && !s.tokens.is_empty() => vec![(0.0, duration, s.tokens.concat())],
        _ => vec![
            (
                0.0,
                duration / 2.0,
                format!("Audio {file_name} has {} bytes.", file.len()),
            ),
            (
                duration / 2.0,
                duration,
                format!("Prompt had {prompt_chars} characters."),
            ),
        ],
    };
    let text = segments
        .iter()
        .map(|(_, _, t)| t.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    match format {
        "json" => {
            let usage = if gpt4o {
                json!({"type": "tokens", "input_tokens": 14, "output_tokens": 45, "total_tokens": 59,
                       "input_token_details": {"text_tokens": 0, "audio_tokens": 14}})
            } else {
                json!({"type": "duration", "seconds": duration.ceil() as u64})
            };
            axum::Json(json!({"text": text, "usage": usage})).into_response()
        }
        "text" => plain(format!("{text}\n")),
        "srt" => plain(cues(&segments, false)),
        "vtt" => plain(cues(&segments, true)),
        "verbose_json" => axum::Json(json!({
            "task": "transcribe",
            "language": f.language.as_deref().map_or("english", language_name),
            "duration": duration,
            "text": text,
            "segments": segments.iter().enumerate().map(|(i, (start, end, t))| json!({
                "id": i,
                "seek": 0,
                "start": start,
                "end": end,
                "text": format!(" {t}"),
                "tokens": [50364, 2264, 13, 50414],
                "temperature": 0.0,
                "avg_logprob": -0.25,
                "compression_ratio": 1.1,
                "no_speech_prob": 0.01,
            })).collect::<Vec<Value>>(),
            "usage": {"type": "duration", "seconds": duration.ceil() as u64},
        }))
        .into_response(),
        other => openai_error(
            400,
            &format!(
                "'{other}' is not one of ['json', 'text', 'srt', 'verbose_json', 'vtt'] - 'response_format'"
            ),
            Some("response_format"),
        ),
    }
}

/// The script for this request, or `None` when nothing was scripted (then the answer is derived).
fn scripted(shared: &Shared, model: &str) -> Option<Script> {
    for key in [model, "*"] {
        if let Some(s) = lock(&shared.queued)
            .get_mut(key)
            .and_then(std::collections::VecDeque::pop_front)
        {
            return Some(s);
        }
    }
    if let Some(s) = lock(&shared.per_model).get(model) {
        return Some(s.clone());
    }
    lock(&shared.default).clone()
}

fn language_name(code: &str) -> &str {
    match code {
        "en" => "english",
        "de" => "german",
        "fr" => "french",
        "es" => "spanish",
        other => other,
    }
}

fn plain(body: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn cues(segments: &[(f64, f64, String)], vtt: bool) -> String {
    let stamp = |t: f64| {
        let ms = (t * 1000.0).round() as u64;
        let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        if vtt {
            format!("{h:02}:{m:02}:{s:02}.{ms:03}")
        } else {
            format!("{h:02}:{m:02}:{s:02},{ms:03}")
        }
    };
    let mut out = if vtt {
        "WEBVTT\n\n".to_owned()
    } else {
        String::new()
    };
    for (i, (start, end, text)) in segments.iter().enumerate() {
        if !vtt {
            out.push_str(&format!("{}\n", i + 1));
        }
        out.push_str(&format!("{} --> {}\n{text}\n\n", stamp(*start), stamp(*end)));
    }
    out
}

/// Duration of a PCM WAV from its header: the `data` size over the byte rate.
fn wav_duration(b: &[u8]) -> Option<f64> {
    if b.get(0..4)? != b"RIFF" || b.get(8..12)? != b"WAVE" {
        return None;
    }
    let u32_at = |i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let mut at = 12;
    let mut byte_rate = None;
    while at + 8 <= b.len() {
        let id = &b[at..at + 4];
        let size = u32_at(at + 4)? as usize;
        if id == b"fmt " {
            byte_rate = u32_at(at + 16);
        } else if id == b"data" {
            let rate = f64::from(byte_rate?.max(1));
            let size = size.min(b.len() - at - 8);
            return Some(size as f64 / rate);
        }
        at += 8 + size + (size & 1);
    }
    None
}

fn openai_error(status: u16, message: &str, param: Option<&str>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        axum::Json(json!({"error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": if param == Some("response_format") { Value::from("unsupported_value") } else { Value::Null },
        }})),
    )
        .into_response()
}
