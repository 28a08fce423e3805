//! Decoding an upload into chunks for long-audio transcription: symphonia decodes the container
//! (WAV/PCM, MP3, FLAC, Ogg Vorbis, M4A with AAC, Matroska/WebM with a codec it knows), the audio
//! is mixed to mono and resampled to 16 kHz (what Whisper models take, and small enough that a
//! 10-minute chunk is a 19 MB WAV), and cut at the quietest moment near each chunk boundary so a
//! cut rarely falls inside a word. Chunks are re-encoded as 16-bit PCM WAV.
//!
//! The reader decodes one chunk at a time so memory stays bounded by the chunk length, not the
//! recording's; it is `Send`, so the caller moves it into `spawn_blocking` for each chunk.
//! Opus (the usual codec of WebM and of many Ogg files) is not among symphonia's codecs: such
//! audio is reported as not decodable here and sent upstream whole.

use std::io::{Cursor, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, Decoder, DecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::{FormatOptions, FormatReader};
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::{Hint, Probe};

use super::{AudioFormat, TranscribeError};

/// Sample rate of the chunks sent upstream.
pub const RATE: u32 = 16_000;

/// How far before a chunk boundary the cut may move to find a quiet moment.
const SEARCH_SECS: u32 = 5;

/// Length of the window whose energy is compared when looking for the quietest cut.
const QUIET_WINDOW: usize = (RATE / 20) as usize;

/// One decoded piece of the recording, 16 kHz mono.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Where the chunk starts in the recording, in seconds.
    pub start_secs: f64,
    /// Its samples.
    pub samples: Vec<i16>,
}

impl Chunk {
    /// Its length in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.samples.len() as f64 / f64::from(RATE)
    }

    /// Peak level in dBFS (`-inf` for digital silence).
    pub fn peak_dbfs(&self) -> f32 {
        let peak = self.samples.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0);
        20.0 * (f32::from(peak) / 32_768.0).log10()
    }
}

/// A byte source that reports how far the decoder has read, for progress.
struct Tracked {
    inner: Cursor<Bytes>,
    pos: Arc<AtomicU64>,
}

impl Read for Tracked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos.store(self.inner.position(), Ordering::Relaxed);
        Ok(n)
    }
}

impl Seek for Tracked {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let p = self.inner.seek(to)?;
        self.pos.store(p, Ordering::Relaxed);
        Ok(p)
    }
}

impl MediaSource for Tracked {
    fn is_seekable(&self) -> bool {
        true
    }

    fn byte_len(&self) -> Option<u64> {
        Some(self.inner.get_ref().len() as u64)
    }
}

/// Taps on each side of a windowed-sinc resampling kernel.
const TAPS: usize = 16;

/// Fractional positions the kernel is tabulated at.
const PHASES: usize = 256;

/// Streaming conversion to 16 kHz with a Hann-windowed sinc kernel whose cutoff follows the lower
/// of the two Nyquist rates (so downsampling does not alias). Whisper models are sensitive to the
/// distortion of cruder filters: a box filter cost tiny.en several words in ten.
#[derive(Debug)]
struct Resampler {
    ratio: f64,
    /// `PHASES + 1` rows of `2 * TAPS` weights.
    table: Vec<f32>,
    pending: Vec<f32>,
    /// Absolute source index of `pending[0]`.
    base: u64,
    /// Source samples seen.
    seen: u64,
    /// Next output sample's index.
    next: u64,
}

impl Resampler {
    fn new(source_rate: u32) -> Self {
        let ratio = f64::from(source_rate) / f64::from(RATE);
        let cutoff = (1.0 / ratio).min(1.0);
        let mut table = Vec::with_capacity((PHASES + 1) * 2 * TAPS);
        for phase in 0..=PHASES {
            let frac = phase as f64 / PHASES as f64;
            let row: Vec<f64> = (0..2 * TAPS)
                .map(|k| {
                    // Tap k reads source sample center - TAPS + 1 + k, at distance t.
                    let t = frac + TAPS as f64 - 1.0 - k as f64;
                    let x = cutoff * t;
                    let sinc = if x.abs() < 1e-9 {
                        1.0
                    } else {
                        (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x)
                    };
                    let w = t / TAPS as f64;
                    let hann = if w.abs() < 1.0 {
                        0.5 * (1.0 + (std::f64::consts::PI * w).cos())
                    } else {
                        0.0
                    };
                    sinc * hann
                })
                .collect();
            let sum: f64 = row.iter().sum();
            table.extend(row.iter().map(|v| (v / sum) as f32));
        }
        Resampler {
            ratio,
            table,
            pending: Vec::new(),
            base: 0,
            seen: 0,
            next: 0,
        }
    }

    /// Feeds source samples; emits every output sample whose kernel is covered.
    fn push(&mut self, mono: &[f32], out: &mut Vec<i16>) {
        self.pending.extend_from_slice(mono);
        self.seen += mono.len() as u64;
        self.emit(out, self.seen);
    }

    /// At the end: emits the remaining output samples, reading silence past the last sample.
    fn finish(&mut self, out: &mut Vec<i16>) {
        let end = self.seen;
        self.pending.extend(std::iter::repeat_n(0.0, TAPS + 1));
        let available = self.base + self.pending.len() as u64;
        let total = (end as f64 / self.ratio).ceil() as u64;
        while self.next < total {
            if !self.emit_one(out, available) {
                break;
            }
        }
        self.pending.clear();
    }

    fn emit(&mut self, out: &mut Vec<i16>, available: u64) {
        while self.emit_one(out, available) {}
        // Keep the history the next output's kernel reaches back to.
        let center = (self.next as f64 * self.ratio) as u64;
        let keep_from = center.saturating_sub(TAPS as u64).max(self.base);
        let drop = (keep_from - self.base) as usize;
        self.pending.drain(..drop.min(self.pending.len()));
        self.base += drop as u64;
    }

    fn emit_one(&mut self, out: &mut Vec<i16>, available: u64) -> bool {
        let pos = self.next as f64 * self.ratio;
        let center = pos as u64;
        if center + TAPS as u64 >= available {
            return false;
        }
        let phase = (((pos - center as f64) * PHASES as f64).round() as usize).min(PHASES);
        let row = &self.table[phase * 2 * TAPS..(phase + 1) * 2 * TAPS];
        let first = center as i64 - TAPS as i64 + 1;
        let mut acc = 0.0f32;
        for (k, w) in row.iter().enumerate() {
            let i = first + k as i64;
            // Before the first sample the signal is silence.
            if i >= self.base as i64 {
                acc += self.pending[(i - self.base as i64) as usize] * w;
            }
        }
        out.push((acc.clamp(-1.0, 1.0) * 32_767.0) as i16);
        self.next += 1;
        true
    }
}

/// Decodes a recording chunk by chunk.
pub struct ChunkReader {
    format: Box<dyn FormatReader>,
    decoder: Box<dyn Decoder>,
    track_id: u32,
    resampler: Option<Resampler>,
    buffered: Vec<i16>,
    emitted: u64,
    eof: bool,
    pos: Arc<AtomicU64>,
    len: u64,
    chunk_samples: usize,
}

impl std::fmt::Debug for ChunkReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkReader")
            .field("track_id", &self.track_id)
            .field("emitted", &self.emitted)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

/// A probe that reads only the container the upload was accepted as (its magic bytes, else its
/// declared type; `AudioFormat::detect`), with the ID3v2 tags an MP3 often starts with.
/// symphonia's default probe tries every reader it has at every marker it finds, so any bytes
/// reached every reader: raw ADTS AAC (no accepted type) overflows when it estimates the length
/// (symphonia-codec-aac 0.5.5 subtracts the start position twice), and the Matroska reader
/// overflows on a zero first byte of a size (symphonia-format-mkv 0.5.5, `read_vint`); both found
/// by the `transcribe_audio` fuzz target (panics under overflow checks, wrapped values in release;
/// either way contained, since decoding runs on a blocking thread whose panic fails the job).
fn probe_for(format: AudioFormat) -> Probe {
    use symphonia::default::formats::{FlacReader, IsoMp4Reader, MkvReader, MpaReader, OggReader, WavReader};
    let mut probe = Probe::default();
    match format {
        AudioFormat::Wav => probe.register_all::<WavReader>(),
        AudioFormat::Mp3 => probe.register_all::<MpaReader>(),
        AudioFormat::M4a => probe.register_all::<IsoMp4Reader>(),
        AudioFormat::Webm => probe.register_all::<MkvReader>(),
        AudioFormat::Ogg => probe.register_all::<OggReader>(),
        AudioFormat::Flac => probe.register_all::<FlacReader>(),
    }
    probe.register_all::<symphonia_metadata::id3v2::Id3v2Reader>();
    probe
}

/// Refuses a RIFF/WAVE file whose `fmt ` chunk says 0 channels or a sample rate of 0 before
/// symphonia sees it: symphonia 0.5 builds its time base from the rate and panics on 0 (found
/// by the `transcribe_audio` fuzz target). The caller's `spawn_blocking` would turn the panic
/// into an error too, but this names the fault and keeps a worker's log free of a backtrace.
/// Anything that is not a complete WAV header is left to symphonia.
fn check_wav_header(bytes: &[u8]) -> Result<(), TranscribeError> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Ok(());
    }
    let mut at = 12usize;
    while let Some(header) = bytes.get(at..at.saturating_add(8)) {
        let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if &header[0..4] == b"fmt " {
            let Some(fmt) = bytes.get(at + 8..(at + 8).saturating_add(8)) else {
                return Ok(());
            };
            let channels = u16::from_le_bytes([fmt[2], fmt[3]]);
            let rate = u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]);
            if channels == 0 || rate == 0 {
                return Err(TranscribeError::BadAudio(format!(
                    "the WAV header says {channels} channel(s) at {rate} Hz"
                )));
            }
            return Ok(());
        }
        // Chunks are padded to an even length.
        at = at.saturating_add(8).saturating_add(size).saturating_add(size & 1);
    }
    Ok(())
}

impl ChunkReader {
    /// Opens the recording. `Ok(None)` when its container or codec is not one decoded here
    /// (Opus, say) and it may still be valid for the upstream; an error when a format that is
    /// always decodable here (WAV, MP3, FLAC) does not parse.
    pub fn open(bytes: Bytes, format: AudioFormat, chunk_secs: u32) -> Result<Option<Self>, TranscribeError> {
        check_wav_header(&bytes)?;
        let len = bytes.len() as u64;
        let pos = Arc::new(AtomicU64::new(0));
        let source = Tracked {
            inner: Cursor::new(bytes),
            pos: pos.clone(),
        };
        let stream = MediaSourceStream::new(Box::new(source), Default::default());
        let mut hint = Hint::new();
        hint.with_extension(format.as_str());
        let must_decode = matches!(format, AudioFormat::Wav | AudioFormat::Mp3 | AudioFormat::Flac);
        let corrupt = |what: &str, e: SymphoniaError| {
            if must_decode {
                Err(TranscribeError::BadAudio(format!("{what} {format} audio: {e}")))
            } else {
                Ok(None)
            }
        };
        let probed = match probe_for(format).format(
            &hint,
            stream,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        ) {
            Ok(p) => p,
            Err(e) => return corrupt("cannot read the", e),
        };
        let format_reader = probed.format;
        let Some(track) = format_reader
            .tracks()
            .iter()
            .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        else {
            return Err(TranscribeError::Empty);
        };
        let track_id = track.id;
        let decoder =
            match symphonia::default::get_codecs().make(&track.codec_params, &DecoderOptions::default()) {
                Ok(d) => d,
                Err(e) => return corrupt("no decoder for this", e),
            };
        let chunk_samples = (chunk_secs as usize)
            .saturating_mul(RATE as usize)
            .max(RATE as usize);
        Ok(Some(ChunkReader {
            format: format_reader,
            decoder,
            track_id,
            resampler: None,
            buffered: Vec::new(),
            emitted: 0,
            eof: false,
            pos,
            len,
            chunk_samples,
        }))
    }

    /// Limits chunks to this many samples (so a chunk's WAV stays under the upload limit).
    pub fn cap_chunk_samples(&mut self, max: usize) {
        self.chunk_samples = self.chunk_samples.min(max).max(QUIET_WINDOW * 2);
    }

    /// Share of the input bytes read so far.
    pub fn progress(&self) -> f32 {
        if self.len == 0 {
            return 1.0;
        }
        (self.pos.load(Ordering::Relaxed) as f64 / self.len as f64).min(1.0) as f32
    }

    /// Whether everything was decoded and handed out.
    pub fn is_done(&self) -> bool {
        self.eof && self.buffered.is_empty()
    }

    /// Seconds of audio handed out so far.
    pub fn emitted_secs(&self) -> f64 {
        self.emitted as f64 / f64::from(RATE)
    }

    /// The next chunk, `None` at the end.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, TranscribeError> {
        while !self.eof && self.buffered.len() < self.chunk_samples {
            self.decode_packet()?;
        }
        if self.buffered.is_empty() {
            return Ok(None);
        }
        let cut = if self.eof && self.buffered.len() <= self.chunk_samples {
            self.buffered.len()
        } else {
            quietest_cut(&self.buffered, self.chunk_samples)
        };
        let rest = self.buffered.split_off(cut);
        let samples = std::mem::replace(&mut self.buffered, rest);
        let start_secs = self.emitted as f64 / f64::from(RATE);
        self.emitted += samples.len() as u64;
        Ok(Some(Chunk { start_secs, samples }))
    }

    fn end_of_stream(&mut self) {
        self.eof = true;
        if let Some(r) = self.resampler.as_mut() {
            r.finish(&mut self.buffered);
        }
    }

    fn decode_packet(&mut self) -> Result<(), TranscribeError> {
        let packet = match self.format.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.end_of_stream();
                return Ok(());
            }
            // A chained stream changing its parameters: keep what was decoded.
            Err(SymphoniaError::ResetRequired) => {
                self.end_of_stream();
                return Ok(());
            }
            Err(e) => return Err(TranscribeError::BadAudio(format!("cannot read the audio: {e}"))),
        };
        if packet.track_id() != self.track_id {
            return Ok(());
        }
        let decoded = match self.decoder.decode(&packet) {
            Ok(d) => d,
            // A damaged packet is skipped, as players do.
            Err(SymphoniaError::DecodeError(_) | SymphoniaError::IoError(_)) => return Ok(()),
            Err(e) => return Err(TranscribeError::BadAudio(format!("cannot decode the audio: {e}"))),
        };
        let spec = *decoded.spec();
        let channels = spec.channels.count().max(1);
        if decoded.frames() == 0 {
            return Ok(());
        }
        let mut interleaved = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        interleaved.copy_interleaved_ref(decoded);
        let mono: Vec<f32> = interleaved
            .samples()
            .chunks(channels)
            .map(|frame| frame.iter().sum::<f32>() / channels as f32)
            .collect();
        let resampler = self
            .resampler
            .get_or_insert_with(|| Resampler::new(spec.rate.max(1)));
        resampler.push(&mono, &mut self.buffered);
        Ok(())
    }
}

/// Where to end a chunk of about `target` samples: the middle of the longest quiet stretch in
/// the last few seconds before `target`, so the cut falls inside a pause and both chunks keep
/// some of it (Whisper transcribes a word cut short, or one at the very edge, badly). Quiet is
/// within a margin of the quietest window, since lossy codecs leave no pause at digital zero.
fn quietest_cut(samples: &[i16], target: usize) -> usize {
    let target = target.min(samples.len());
    let search = (SEARCH_SECS as usize * RATE as usize).min(target / 4);
    let from = target - search;
    let step = QUIET_WINDOW / 2;
    let mut windows = Vec::new();
    let mut at = from;
    while at + QUIET_WINDOW <= target {
        let energy: u64 = samples[at..at + QUIET_WINDOW]
            .iter()
            .map(|s| u64::from(s.unsigned_abs()))
            .sum();
        windows.push((at, energy));
        at += step;
    }
    let Some(min) = windows.iter().map(|w| w.1).min() else {
        return target.max(1);
    };
    // A mean level of about -60 dBFS above the quietest window still counts as the same pause.
    let threshold = (min * 2).max(min + QUIET_WINDOW as u64 * 32);
    let (mut best, mut run_start) = ((0usize, 0usize), None);
    for (i, (_, e)) in windows.iter().enumerate() {
        match (*e <= threshold, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                if i - s >= best.1 - best.0 {
                    best = (s, i);
                }
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start
        && windows.len() - s >= best.1 - best.0
    {
        best = (s, windows.len());
    }
    let first = windows[best.0].0;
    let last = windows[best.1.max(best.0 + 1) - 1].0 + QUIET_WINDOW;
    (first + (last - first) / 2).clamp(1, target)
}

/// 16-bit mono PCM WAV at [`RATE`].
pub fn encode_wav(samples: &[i16]) -> Vec<u8> {
    encode_wav_at(samples, RATE)
}

/// 16-bit mono PCM WAV at any rate (tests and the benchmark make their clips with it).
pub fn encode_wav_at(samples: &[i16], rate: u32) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + samples.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(secs: f64, rate: u32) -> Vec<i16> {
        (0..(secs * f64::from(rate)) as usize)
            .map(|i| ((i as f64 * 440.0 * std::f64::consts::TAU / f64::from(rate)).sin() * 8_000.0) as i16)
            .collect()
    }

    fn read_all(wav: Vec<u8>, chunk_secs: u32) -> Vec<Chunk> {
        let mut r = ChunkReader::open(Bytes::from(wav), AudioFormat::Wav, chunk_secs)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().unwrap() {
            out.push(c);
        }
        assert!(r.is_done());
        assert!((r.progress() - 1.0).abs() < 1e-6);
        out
    }

    #[test]
    fn a_wav_at_another_rate_is_resampled_and_split_at_a_quiet_moment() {
        // 25 s at 44.1 kHz: tone, with a second of silence from 8.0 s to 9.0 s.
        let mut s = tone(25.0, 44_100);
        for x in &mut s[8 * 44_100..9 * 44_100] {
            *x = 0;
        }
        let chunks = read_all(encode_wav_at(&s, 44_100), 10);
        assert_eq!(
            chunks.len(),
            3,
            "{:?}",
            chunks.iter().map(Chunk::duration_secs).collect::<Vec<_>>()
        );
        let total: f64 = chunks.iter().map(Chunk::duration_secs).sum();
        assert!((total - 25.0).abs() < 0.01, "{total}");
        // The first cut moved back into the silence rather than falling at 10.0 s.
        let first = chunks[0].duration_secs();
        assert!((8.0..9.0).contains(&first), "{first}");
        assert!((chunks[1].start_secs - first).abs() < 1e-9);
        assert!(chunks[0].peak_dbfs() > -20.0);
    }

    #[test]
    fn short_audio_is_one_chunk_and_silence_has_no_peak() {
        let chunks = read_all(encode_wav(&vec![0; 16_000]), 600);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].samples.len(), 16_000);
        assert!(chunks[0].peak_dbfs() < -90.0);
    }

    #[test]
    fn a_stereo_wav_is_mixed_to_mono() {
        let mut wav = encode_wav_at(&[1000, 3000, 1000, 3000], 16_000);
        wav[22] = 2; // channels
        wav[28..32].copy_from_slice(&64_000u32.to_le_bytes()); // byte rate
        wav[32] = 4; // block align
        let chunks = read_all(wav, 600);
        assert_eq!(chunks[0].samples.len(), 2);
        assert!(
            chunks[0].samples.iter().all(|s| (1990..=2010).contains(s)),
            "{:?}",
            chunks[0].samples
        );
    }

    #[test]
    fn corrupt_wav_is_bad_audio_and_unknown_opus_is_not_decodable_here() {
        let e = ChunkReader::open(
            Bytes::from_static(b"RIFF\0\0\0\0WAVEjunkjunk"),
            AudioFormat::Wav,
            600,
        )
        .unwrap_err();
        assert_eq!(e.code(), "bad_audio");
        let webm = Bytes::from_static(&[0x1A, 0x45, 0xDF, 0xA3, 0x80, 0, 0, 0]);
        assert!(ChunkReader::open(webm, AudioFormat::Webm, 600).unwrap().is_none());
    }
}
