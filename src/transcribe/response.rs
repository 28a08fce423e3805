//! The five answer formats of OpenAI's `/audio/transcriptions` (`json`, `text`, `srt`, `vtt`,
//! `verbose_json`), each parsed into one chunk's [`Transcript`]. Only `verbose_json`, `srt` and
//! `vtt` carry timed segments; for `json` and `text` the chunk becomes one segment spanning it.

use serde::{Deserialize, Serialize};

use super::{Segment, TranscribeError, Transcript};

/// The `response_format` asked of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// `verbose_json` for models that support it, `json` for the `gpt-4o*-transcribe` family
    /// (which rejects `verbose_json`).
    Auto,
    /// `{"text": …}`.
    Json,
    /// Plain text.
    Text,
    /// SubRip cues.
    Srt,
    /// WebVTT cues.
    Vtt,
    /// Text, language, duration and timed segments.
    VerboseJson,
}

impl ResponseFormat {
    /// Parses a setting value (`auto`, `json`, `text`, `srt`, `vtt`, `verbose_json`).
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value.to_ascii_lowercase().as_str() {
            "auto" => ResponseFormat::Auto,
            "json" => ResponseFormat::Json,
            "text" => ResponseFormat::Text,
            "srt" => ResponseFormat::Srt,
            "vtt" => ResponseFormat::Vtt,
            "verbose_json" => ResponseFormat::VerboseJson,
            _ => return None,
        })
    }

    /// The wire name; `Auto` resolved for `model`.
    pub fn wire_name(self, model: &str) -> &'static str {
        match self.resolve(model) {
            ResponseFormat::Json => "json",
            ResponseFormat::Text => "text",
            ResponseFormat::Srt => "srt",
            ResponseFormat::Vtt => "vtt",
            ResponseFormat::VerboseJson | ResponseFormat::Auto => "verbose_json",
        }
    }

    /// `Auto` made concrete for a model.
    pub fn resolve(self, model: &str) -> Self {
        match self {
            // OpenAI's gpt-4o transcription models answer 400 to verbose_json.
            ResponseFormat::Auto if model.starts_with("gpt-4o") => ResponseFormat::Json,
            ResponseFormat::Auto => ResponseFormat::VerboseJson,
            other => other,
        }
    }
}

#[derive(Deserialize)]
struct VerboseJson {
    text: String,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    segments: Option<Vec<WireSegment>>,
}

#[derive(Deserialize)]
struct WireSegment {
    start: f64,
    end: f64,
    text: String,
}

#[derive(Deserialize)]
struct Json {
    text: String,
}

/// Parses one answer. `chunk_secs`, when known, is the span given to the single segment of the
/// untimed formats.
pub fn parse(
    format: ResponseFormat,
    body: &str,
    chunk_secs: Option<f64>,
) -> Result<Transcript, TranscribeError> {
    let invalid = |e: &dyn std::fmt::Display| TranscribeError::InvalidResponse(format!("{e}"));
    let untimed = |text: String| {
        let text = text.trim().to_owned();
        let segments = if text.is_empty() {
            Vec::new()
        } else {
            vec![Segment {
                start: 0.0,
                end: chunk_secs.unwrap_or(0.0),
                text: text.clone(),
            }]
        };
        Transcript {
            text,
            language: None,
            duration_secs: chunk_secs,
            segments,
        }
    };
    match format {
        ResponseFormat::VerboseJson | ResponseFormat::Auto => {
            let v: VerboseJson = serde_json::from_str(body).map_err(|e| invalid(&e))?;
            let Some(segments) = v.segments else {
                // A compatible server that ignored verbose_json and sent plain json.
                let mut t = untimed(v.text);
                t.language = v.language;
                t.duration_secs = v.duration.or(chunk_secs);
                return Ok(t);
            };
            Ok(Transcript {
                text: v.text.trim().to_owned(),
                language: v.language,
                duration_secs: v.duration.or(chunk_secs),
                segments: segments
                    .into_iter()
                    .map(|s| Segment {
                        start: s.start,
                        end: s.end,
                        text: s.text.trim().to_owned(),
                    })
                    .filter(|s| !s.text.is_empty())
                    .collect(),
            })
        }
        ResponseFormat::Json => {
            let v: Json = serde_json::from_str(body).map_err(|e| invalid(&e))?;
            Ok(untimed(v.text))
        }
        ResponseFormat::Text => Ok(untimed(body.to_owned())),
        ResponseFormat::Srt | ResponseFormat::Vtt => {
            let segments = parse_cues(body).ok_or_else(|| invalid(&"a cue with a malformed time"))?;
            let text = segments
                .iter()
                .map(|s| s.text.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            Ok(Transcript {
                text,
                language: None,
                duration_secs: chunk_secs.or_else(|| segments.last().map(|s| s.end)),
                segments,
            })
        }
    }
}

/// SRT and WebVTT cues: a `start --> end` line, then text lines up to a blank line. Cue numbers,
/// the `WEBVTT` header, NOTE blocks and cue settings after the end time are skipped.
fn parse_cues(body: &str) -> Option<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut lines = body.lines().map(|l| l.trim_end_matches('\r'));
    while let Some(line) = lines.next() {
        let Some((start, rest)) = line.split_once("-->") else {
            continue;
        };
        let end = rest.split_whitespace().next()?;
        let (start, end) = (stamp(start.trim())?, stamp(end)?);
        let mut text = Vec::new();
        for l in lines.by_ref() {
            if l.trim().is_empty() {
                break;
            }
            text.push(l.trim());
        }
        let text = text.join(" ");
        if !text.is_empty() {
            segments.push(Segment { start, end, text });
        }
    }
    Some(segments)
}

/// `HH:MM:SS,mmm` (SRT), `HH:MM:SS.mmm` or `MM:SS.mmm` (WebVTT), in seconds. Only a finite
/// time: `f64` parsing also reads `inf`, `NaN` and `1e400` (infinite), which JSON cannot hold,
/// so the job's result would carry `null` for a number.
fn stamp(s: &str) -> Option<f64> {
    let s = s.replace(',', ".");
    let parts: Vec<&str> = s.split(':').collect();
    let (h, m, sec) = match parts.as_slice() {
        [h, m, sec] => (
            h.parse::<f64>().ok()?,
            m.parse::<f64>().ok()?,
            sec.parse::<f64>().ok()?,
        ),
        [m, sec] => (0.0, m.parse::<f64>().ok()?, sec.parse::<f64>().ok()?),
        _ => return None,
    };
    Some(h * 3600.0 + m * 60.0 + sec).filter(|t| t.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_per_model() {
        assert_eq!(ResponseFormat::Auto.wire_name("whisper-1"), "verbose_json");
        assert_eq!(
            ResponseFormat::Auto.wire_name("whisper-large-v3-turbo"),
            "verbose_json"
        );
        assert_eq!(ResponseFormat::Auto.wire_name("gpt-4o-transcribe"), "json");
        assert_eq!(ResponseFormat::Auto.wire_name("gpt-4o-mini-transcribe"), "json");
        assert_eq!(ResponseFormat::Srt.wire_name("gpt-4o-transcribe"), "srt");
        assert_eq!(
            ResponseFormat::parse("VERBOSE_JSON"),
            Some(ResponseFormat::VerboseJson)
        );
        assert_eq!(ResponseFormat::parse("xml"), None);
    }

    #[test]
    fn cue_stamps_of_both_dialects() {
        assert_eq!(stamp("00:01:02,500"), Some(62.5));
        assert_eq!(stamp("01:00:00.250"), Some(3600.25));
        assert_eq!(stamp("02:03.000"), Some(123.0));
        assert_eq!(stamp("abc"), None);
        let vtt = "WEBVTT\n\nNOTE made by hand\n\n00:00.000 --> 00:01.500 align:start\nHello\nthere.\n\n00:01.500 --> 00:03.000\nBye.\n";
        let s = parse_cues(vtt).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].text, "Hello there.");
        assert_eq!((s[1].start, s[1].end), (1.5, 3.0));
    }

    #[test]
    fn malformed_bodies_are_invalid_responses() {
        let e = parse(ResponseFormat::VerboseJson, "<html>", None).unwrap_err();
        assert_eq!(e.code(), "invalid_response");
        let e = parse(
            ResponseFormat::Srt,
            "1\n00:00:xx,000 --> 00:00:01,000\nhi\n",
            None,
        )
        .unwrap_err();
        assert_eq!(e.code(), "invalid_response");
    }
}
