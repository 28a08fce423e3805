//! The `transcribe` job kind: the job's uploaded recording through `transcribe::Transcriber`
//! (chunking, prompts, upstream retries are the client's), its progress reported as the job's,
//! its typed errors turned into job errors with their retryability. The result is the
//! [`Transcript`] (`text`, `language`, `duration_secs`, `segments`), whose `text` feeds the next
//! step of a chain.
//!
//! [`Transcript`]: crate::transcribe::Transcript

use serde_json::Value;
use tokio::sync::watch;

use super::runner::Progress;
use super::{Job, JobBackend, JobError};
use crate::transcribe::{AudioFormat, TranscribeError, TranscribeOptions, Transcriber};

impl From<TranscribeError> for JobError {
    fn from(e: TranscribeError) -> Self {
        JobError {
            code: e.code().to_owned(),
            message: e.to_string(),
            retryable: e.is_retryable(),
        }
    }
}

/// The transcription options of a job (`language`, `prompt`, `model`); other names belong to
/// the other steps of its chain.
pub fn options(options: &Value) -> Result<TranscribeOptions, String> {
    let pick = |name: &str| -> Result<Option<String>, String> {
        match options.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 2_000 => Ok(Some(s.clone())),
            Some(_) => Err(format!("{name} must be a non-empty string of at most 2000 bytes")),
        }
    };
    Ok(TranscribeOptions {
        language: pick("language")?,
        prompt: pick("prompt")?,
        model: pick("model")?,
    })
}

/// Transcribes the job's upload.
pub async fn run(
    transcriber: &Transcriber,
    backend: &dyn JobBackend,
    job: &Job,
    progress: &Progress,
) -> Result<Value, JobError> {
    let opts = options(&job.options).map_err(|m| JobError::permanent("invalid_options", m))?;
    let (info, bytes) = backend.upload(job.id).await?.ok_or_else(|| {
        JobError::permanent(
            "missing_input",
            "the job has no recording (an expired upload is deleted)",
        )
    })?;
    let head = &bytes[..bytes.len().min(64)];
    let format = AudioFormat::detect(info.content_type.as_deref(), info.filename.as_deref(), head)
        .ok_or_else(|| JobError::from(TranscribeError::Unsupported))?;

    // The client reports progress through a plain callback; a watch channel carries it to the
    // job record without blocking the client (only the latest value matters).
    let (tx, mut rx) = watch::channel(0.0f32);
    let work = async move {
        let report = move |p: f32| {
            let _ = tx.send(p);
        };
        transcriber.transcribe(bytes, format, opts, &report).await
        // `report` and its sender drop here, which ends the forwarding below.
    };
    let forward = async {
        while rx.changed().await.is_ok() {
            let p = *rx.borrow_and_update();
            progress.report(p * 0.99, "transcribing").await;
        }
    };
    let (transcript, ()) = tokio::join!(work, forward);
    let transcript = transcript?;
    serde_json::to_value(&transcript)
        .map_err(|e| JobError::permanent("internal", format!("cannot encode the transcript: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_take_their_names_and_check_them() {
        let o = options(&json!({"language": "en", "store_notes": false})).unwrap();
        assert_eq!(o.language.as_deref(), Some("en"));
        assert_eq!(o.prompt, None);
        assert!(options(&json!({"model": 3})).is_err());
        assert!(options(&json!({"prompt": " "})).is_err());
    }
}
