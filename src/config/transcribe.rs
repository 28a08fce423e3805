//! The transcription section: `COACHD_TRANSCRIBE_*`, read into the client's own
//! [`TranscribeSettings`]. The key falls back to `OPENAI_API_KEY` only while the base URL is
//! OpenAI's own host, so an OpenAI key is never sent to another host by accident.

use super::ConfigError;
use super::source::{Reader, Source, invalid};
use crate::transcribe::{ResponseFormat, TranscribeSettings};

/// OpenAI's limit on one upload, also the default limit of a recording.
const DEFAULT_MAX_BYTES: usize = 25 * 1024 * 1024;

/// Reads `COACHD_TRANSCRIBE_*`.
pub(super) fn read<S: Source>(r: &Reader<'_, S>) -> Result<TranscribeSettings, ConfigError> {
    let base_url = r.base_url("COACHD_TRANSCRIBE_BASE_URL", "https://api.openai.com/v1")?;
    let api_key = r.secret("COACHD_TRANSCRIBE_API_KEY").or_else(|| {
        (base_url.host_str() == Some("api.openai.com"))
            .then(|| r.secret("OPENAI_API_KEY"))
            .flatten()
    });
    let format = r.string("COACHD_TRANSCRIBE_RESPONSE_FORMAT", "auto");
    let response_format = ResponseFormat::parse(&format).ok_or_else(|| {
        invalid(
            "COACHD_TRANSCRIBE_RESPONSE_FORMAT",
            "one of auto, verbose_json, json, text, srt, vtt",
            Some(format.clone()),
        )
    })?;
    let silence: f32 = r.parse(
        "COACHD_TRANSCRIBE_SILENCE_DBFS",
        -60.0,
        "a level in dBFS from -120 to 0, such as -60",
    )?;
    if !(-120.0..=0.0).contains(&silence) {
        return Err(invalid(
            "COACHD_TRANSCRIBE_SILENCE_DBFS",
            "a level in dBFS from -120 to 0, such as -60",
            r.raw("COACHD_TRANSCRIBE_SILENCE_DBFS"),
        ));
    }
    Ok(TranscribeSettings {
        base_url: base_url.as_str().trim_end_matches('/').to_owned(),
        api_key,
        model: r.string("COACHD_TRANSCRIBE_MODEL", "whisper-1"),
        max_bytes: r.int("COACHD_TRANSCRIBE_MAX_BYTES", DEFAULT_MAX_BYTES, 1_024, 1 << 31)?,
        timeout: r.seconds("COACHD_TRANSCRIBE_TIMEOUT_SECS", 300, 1, 3_600)?,
        max_retries: r.int("COACHD_TRANSCRIBE_MAX_RETRIES", 2, 0, 10)?,
        chunk_secs: r.int("COACHD_TRANSCRIBE_CHUNK_SECS", 600, 0, 3_600)?,
        retry_base: r.millis("COACHD_TRANSCRIBE_RETRY_BASE_MS", 500, 0, 60_000)?,
        max_retry_wait: r.millis("COACHD_TRANSCRIBE_MAX_RETRY_WAIT_MS", 30_000, 0, 600_000)?,
        response_format,
        silence_dbfs: silence,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use crate::config::Settings;
    use crate::transcribe::ResponseFormat;

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, crate::config::ConfigError> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        Settings::from_source(&map)
    }

    #[test]
    fn defaults_are_openai_whisper_with_its_upload_limit() {
        let t = load(&[]).unwrap().transcribe;
        assert_eq!(t.base_url, "https://api.openai.com/v1");
        assert_eq!(t.model, "whisper-1");
        assert_eq!(t.max_bytes, 25 * 1024 * 1024);
        assert_eq!(t.chunk_secs, 600);
        assert_eq!(t.max_retries, 2);
        assert_eq!(t.timeout, Duration::from_secs(300));
        assert_eq!(t.response_format, ResponseFormat::Auto);
        assert!(t.api_key.is_none());
    }

    #[test]
    fn groq_and_the_key_fallback() {
        let t = load(&[
            ("COACHD_TRANSCRIBE_BASE_URL", "https://api.groq.com/openai/v1/"),
            ("COACHD_TRANSCRIBE_MODEL", "whisper-large-v3-turbo"),
            ("COACHD_TRANSCRIBE_MAX_BYTES", "41943040"),
            ("COACHD_TRANSCRIBE_CHUNK_SECS", "0"),
            ("OPENAI_API_KEY", "sk-openai"),
        ])
        .unwrap()
        .transcribe;
        assert_eq!(t.base_url, "https://api.groq.com/openai/v1");
        assert_eq!(t.max_bytes, 40 << 20);
        assert_eq!(t.chunk_secs, 0);
        // An OpenAI key is not sent to another host.
        assert!(t.api_key.is_none());
        let t = load(&[("OPENAI_API_KEY", "sk-openai")]).unwrap().transcribe;
        assert_eq!(t.api_key.unwrap().expose(), "sk-openai");
        let t = load(&[
            ("COACHD_TRANSCRIBE_API_KEY", "gsk-1"),
            ("OPENAI_API_KEY", "sk-openai"),
        ])
        .unwrap()
        .transcribe;
        assert_eq!(t.api_key.unwrap().expose(), "gsk-1");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = load(&[("COACHD_TRANSCRIBE_RESPONSE_FORMAT", "xml")]).unwrap_err();
        assert_eq!(e.var, "COACHD_TRANSCRIBE_RESPONSE_FORMAT");
        let e = load(&[("COACHD_TRANSCRIBE_MAX_RETRIES", "99")]).unwrap_err();
        assert_eq!(e.var, "COACHD_TRANSCRIBE_MAX_RETRIES");
        let e = load(&[("COACHD_TRANSCRIBE_SILENCE_DBFS", "3")]).unwrap_err();
        assert_eq!(e.var, "COACHD_TRANSCRIBE_SILENCE_DBFS");
        let e = load(&[("COACHD_TRANSCRIBE_BASE_URL", "ftp://x")]).unwrap_err();
        assert_eq!(e.var, "COACHD_TRANSCRIBE_BASE_URL");
        let s = format!(
            "{:?}",
            load(&[("COACHD_TRANSCRIBE_API_KEY", "sk-hidden-9")]).unwrap()
        );
        assert!(!s.contains("sk-hidden-9"));
    }
}
