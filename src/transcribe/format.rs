//! The audio formats coachd accepts for transcription, and how an upload's format is told: magic
//! bytes first (they cannot lie about the container), then the declared content type, then the
//! file name's extension.

use serde::{Deserialize, Serialize};

/// A container format accepted for transcription (the set OpenAI's and Groq's endpoints take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    /// RIFF/WAVE (or RF64).
    Wav,
    /// MPEG-1/2 layer III, with or without an ID3 tag.
    Mp3,
    /// MPEG-4 audio (`ftyp` box): m4a, mp4, mp4a.
    M4a,
    /// WebM / Matroska (EBML), usually Opus.
    Webm,
    /// Ogg (Vorbis, Opus or FLAC inside).
    Ogg,
    /// Native FLAC.
    Flac,
}

impl AudioFormat {
    /// Every accepted format.
    pub const ALL: [AudioFormat; 6] = [
        AudioFormat::Wav,
        AudioFormat::Mp3,
        AudioFormat::M4a,
        AudioFormat::Webm,
        AudioFormat::Ogg,
        AudioFormat::Flac,
    ];

    /// Detects the format from the first bytes of the file (at least 12 help), the declared
    /// content type and the file name. Magic bytes win over the declarations; `None` when none
    /// of the three names an accepted format.
    pub fn detect(content_type: Option<&str>, filename: Option<&str>, head: &[u8]) -> Option<Self> {
        Self::from_magic(head)
            .or_else(|| content_type.and_then(Self::from_content_type))
            .or_else(|| filename.and_then(Self::from_filename))
    }

    /// The lowercase name, also the file extension sent upstream.
    pub fn as_str(&self) -> &'static str {
        match self {
            AudioFormat::Wav => "wav",
            AudioFormat::Mp3 => "mp3",
            AudioFormat::M4a => "m4a",
            AudioFormat::Webm => "webm",
            AudioFormat::Ogg => "ogg",
            AudioFormat::Flac => "flac",
        }
    }

    /// The MIME type sent upstream with the file part.
    pub fn mime(&self) -> &'static str {
        match self {
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Mp3 => "audio/mpeg",
            AudioFormat::M4a => "audio/mp4",
            AudioFormat::Webm => "audio/webm",
            AudioFormat::Ogg => "audio/ogg",
            AudioFormat::Flac => "audio/flac",
        }
    }

    fn from_magic(head: &[u8]) -> Option<Self> {
        let at = |i: usize, magic: &[u8]| head.get(i..i + magic.len()) == Some(magic);
        if (at(0, b"RIFF") || at(0, b"RF64")) && at(8, b"WAVE") {
            return Some(AudioFormat::Wav);
        }
        if at(0, b"fLaC") {
            return Some(AudioFormat::Flac);
        }
        if at(0, b"OggS") {
            return Some(AudioFormat::Ogg);
        }
        if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
            return Some(AudioFormat::Webm);
        }
        if at(4, b"ftyp") {
            return Some(AudioFormat::M4a);
        }
        if at(0, b"ID3") {
            return Some(AudioFormat::Mp3);
        }
        // An MPEG audio frame sync: 11 set bits, then a version and a layer that are not
        // "reserved"; layer bits 00 are AAC's ADTS header, which is not MP3.
        if let [0xFF, b1, ..] = head {
            let version = (b1 >> 3) & 0b11;
            let layer = (b1 >> 1) & 0b11;
            if b1 & 0xE0 == 0xE0 && version != 0b01 && layer == 0b01 {
                return Some(AudioFormat::Mp3);
            }
        }
        None
    }

    fn from_content_type(ct: &str) -> Option<Self> {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        Some(match essence.as_str() {
            "audio/wav" | "audio/x-wav" | "audio/wave" | "audio/vnd.wave" => AudioFormat::Wav,
            "audio/mpeg" | "audio/mp3" | "audio/mpeg3" | "audio/x-mpeg-3" => AudioFormat::Mp3,
            "audio/mp4" | "audio/m4a" | "audio/x-m4a" | "audio/mp4a-latm" | "video/mp4" => AudioFormat::M4a,
            "audio/webm" | "video/webm" => AudioFormat::Webm,
            "audio/ogg" | "application/ogg" | "audio/opus" | "audio/vorbis" => AudioFormat::Ogg,
            "audio/flac" | "audio/x-flac" => AudioFormat::Flac,
            _ => return None,
        })
    }

    fn from_filename(name: &str) -> Option<Self> {
        let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
        Some(match ext.as_str() {
            "wav" | "wave" => AudioFormat::Wav,
            "mp3" | "mpga" | "mpeg" => AudioFormat::Mp3,
            "m4a" | "mp4" => AudioFormat::M4a,
            "webm" => AudioFormat::Webm,
            "ogg" | "oga" | "opus" => AudioFormat::Ogg,
            "flac" => AudioFormat::Flac,
            _ => return None,
        })
    }
}

impl std::fmt::Display for AudioFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::AudioFormat::{self, *};

    #[test]
    fn magic_bytes_win_over_declarations() {
        let wav = b"RIFF\x24\x00\x00\x00WAVEfmt ";
        assert_eq!(
            AudioFormat::detect(Some("audio/mpeg"), Some("x.mp3"), wav),
            Some(Wav)
        );
        assert_eq!(AudioFormat::detect(None, None, b"fLaC\0\0\0\x22"), Some(Flac));
        assert_eq!(AudioFormat::detect(None, None, b"OggS\0\x02"), Some(Ogg));
        assert_eq!(
            AudioFormat::detect(None, None, &[0x1A, 0x45, 0xDF, 0xA3, 1]),
            Some(Webm)
        );
        assert_eq!(AudioFormat::detect(None, None, b"\0\0\0\x20ftypM4A "), Some(M4a));
        assert_eq!(AudioFormat::detect(None, None, b"ID3\x04\0"), Some(Mp3));
        assert_eq!(
            AudioFormat::detect(None, None, &[0xFF, 0xFB, 0x90, 0x64]),
            Some(Mp3)
        );
        // ADTS AAC has a frame sync too, but layer bits 00: not MP3.
        assert_eq!(AudioFormat::detect(None, None, &[0xFF, 0xF1, 0x50, 0x80]), None);
    }

    #[test]
    fn declarations_are_used_when_the_bytes_say_nothing() {
        assert_eq!(
            AudioFormat::detect(Some("audio/webm;codecs=opus"), None, b""),
            Some(Webm)
        );
        assert_eq!(AudioFormat::detect(Some("Audio/X-WAV"), None, b"??"), Some(Wav));
        assert_eq!(
            AudioFormat::detect(Some("application/octet-stream"), Some("a.M4A"), b""),
            Some(M4a)
        );
        assert_eq!(AudioFormat::detect(None, Some("voice.opus"), b""), Some(Ogg));
        assert_eq!(
            AudioFormat::detect(Some("application/pdf"), Some("notes.pdf"), b"%PDF-1.7"),
            None
        );
        assert_eq!(AudioFormat::detect(None, Some("noext"), b""), None);
        for f in AudioFormat::ALL {
            assert_eq!(AudioFormat::detect(None, Some(&format!("x.{f}")), b""), Some(f));
            assert_eq!(AudioFormat::detect(Some(f.mime()), None, b""), Some(f));
        }
    }

    #[test]
    fn serializes_as_the_lowercase_name() {
        assert_eq!(serde_json::to_string(&M4a).unwrap(), "\"m4a\"");
        assert_eq!(serde_json::from_str::<AudioFormat>("\"flac\"").unwrap(), Flac);
    }
}
