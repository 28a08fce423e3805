//! Transcription real-time factor against the local `tiny.en` model: espeak-ng speaks a clip of
//! coaching sentences, `scripts/whisper_server.py` serves faster-whisper on a free port, and the
//! clip goes through [`Transcriber`] whole and in chunks. Prints audio seconds over wall seconds
//! (higher is faster; 10 means ten minutes of audio take a minute).
//!
//! ```text
//! scripts/whisper                      # once: espeak-ng and .services/whisper-venv
//! cargo run --release --example transcribe_rtf -- [ROUNDS] [CHUNK_SECS] [THREADS]
//! ```
//!
//! Defaults: 3 rounds, 20-second chunks for the chunked run, 2 model threads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coachd::transcribe::audio::encode_wav_at;
use coachd::transcribe::{AudioFormat, TranscribeOptions, TranscribeSettings, Transcriber};

const SENTENCES: &[&str] = &[
    "My goal this month is to run three times a week and sleep eight hours every night.",
    "Yesterday I walked for one hour and felt much better afterwards.",
    "I want to talk to my coach about eating more vegetables at lunch.",
    "Last week I missed two workouts because my job kept me late at the office.",
    "Next time I will prepare my meals on Sunday so the week is easier.",
    "When I feel stressed I take a short walk and breathe slowly for five minutes.",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let chunk_secs: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let threads: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".services/whisper-venv/bin/python");
    assert!(
        python.exists(),
        "no {}; run scripts/whisper first",
        python.display()
    );

    // One clip: every sentence, half a second of silence between them.
    let dir = std::env::temp_dir().join(format!("coachd-rtf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut samples: Vec<i16> = Vec::new();
    let mut rate = 0;
    for (i, s) in SENTENCES.iter().enumerate() {
        let path = dir.join(format!("{i}.wav"));
        let ok = Command::new("espeak-ng")
            .args(["-s", "130", "-w"])
            .arg(&path)
            .arg(s)
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "espeak-ng failed (is it installed? scripts/whisper)"
        );
        let wav = std::fs::read(&path).unwrap();
        rate = u32::from_le_bytes(wav[24..28].try_into().unwrap());
        let data = wav.windows(4).position(|w| w == b"data").unwrap() + 8;
        samples.extend(
            wav[data..]
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]])),
        );
        samples.extend(std::iter::repeat_n(0, rate as usize / 2));
    }
    let clip = Bytes::from(encode_wav_at(&samples, rate));
    let audio_secs = samples.len() as f64 / f64::from(rate);
    let _ = std::fs::remove_dir_all(&dir);

    let mut child = Command::new(&python)
        .arg(root.join("scripts/whisper_server.py"))
        .args(["--port", "0", "--threads", &threads.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines.next().expect("whisper_server.py exited").unwrap();
        if let Some(p) = line.strip_prefix("READY ") {
            break p.trim().parse().unwrap();
        }
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut settings = TranscribeSettings::new(format!("http://127.0.0.1:{port}/v1"), "tiny.en");
    settings.timeout = Duration::from_secs(600);
    println!(
        "transcription real-time factor, tiny.en (faster-whisper int8, {threads} threads), clip {audio_secs:.1} s \
         ({} sentences, espeak-ng), {rounds} rounds",
        SENTENCES.len()
    );
    for (label, chunk) in [("whole", 0u32), ("chunked", chunk_secs)] {
        let mut s = settings.clone();
        s.chunk_secs = chunk;
        let t = Transcriber::new(s, reqwest::Client::new());
        let mut rtfs = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            let out = rt
                .block_on(t.transcribe(
                    clip.clone(),
                    AudioFormat::Wav,
                    TranscribeOptions::default(),
                    &|_| {},
                ))
                .unwrap();
            let wall = started.elapsed().as_secs_f64();
            assert!(!out.text.is_empty());
            rtfs.push(audio_secs / wall);
        }
        rtfs.sort_by(f64::total_cmp);
        let label = if chunk == 0 {
            label.to_owned()
        } else {
            format!("{label} ({chunk} s chunks)")
        };
        println!(
            "  {label:<22} RTF median {:.1}x  (min {:.1}x, max {:.1}x)",
            rtfs[rtfs.len() / 2],
            rtfs[0],
            rtfs[rtfs.len() - 1]
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
