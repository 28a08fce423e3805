//! The audio reader of long-recording transcription (`transcribe::audio::ChunkReader`, symphonia
//! underneath). Checks: opening and reading any bytes as any accepted format never panics; chunks
//! are never longer than the cap, follow each other without gap or overlap, and progress stays
//! within 0..=1; the end is reported consistently. Reading is bounded (a small input can decode
//! to long audio), as the transcription job bounds it by the upload size.
#![no_main]

use bytes::Bytes;
use coachd::transcribe::AudioFormat;
use coachd::transcribe::audio::{ChunkReader, RATE};
use libfuzzer_sys::fuzz_target;

/// The shortest cap the reader allows is two quiet windows (0.1 s).
const CAP: usize = RATE as usize / 2;
const MAX_CHUNKS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, audio)) = data.split_first() else {
        return;
    };
    let format = AudioFormat::ALL[usize::from(selector) % AudioFormat::ALL.len()];
    let Ok(Some(mut reader)) = ChunkReader::open(Bytes::copy_from_slice(audio), format, 1) else {
        return;
    };
    reader.cap_chunk_samples(CAP);
    let mut emitted = 0usize;
    for _ in 0..MAX_CHUNKS {
        let p = reader.progress();
        assert!((0.0..=1.0).contains(&p), "progress {p}");
        match reader.next_chunk() {
            Ok(Some(chunk)) => {
                assert!(!chunk.samples.is_empty(), "an empty chunk");
                assert!(
                    chunk.samples.len() <= CAP,
                    "a chunk of {} samples",
                    chunk.samples.len()
                );
                assert_eq!(chunk.start_secs, emitted as f64 / f64::from(RATE));
                emitted += chunk.samples.len();
                assert_eq!(reader.emitted_secs(), emitted as f64 / f64::from(RATE));
            }
            Ok(None) => {
                assert!(reader.is_done(), "no chunk, yet not done");
                assert!(matches!(reader.next_chunk(), Ok(None)), "a chunk after the end");
                return;
            }
            Err(_) => return,
        }
    }
});
