//! Runs the fake LLM upstream as its own process, so coachd can be pointed at it like at a real
//! provider (no key, no network, no cost):
//!
//! ```sh
//! cargo run --example fake_upstream -- --port 9100 --tokens 40 --interval-ms 25
//! COACHD_OPENAI_BASE_URL=http://127.0.0.1:9100/v1 OPENAI_API_KEY=fake cargo run
//! # speech to text against the fake's /v1/audio/transcriptions:
//! COACHD_TRANSCRIBE_BASE_URL=http://127.0.0.1:9100/v1 cargo run
//! ```

use std::time::Duration;

use coachd::fake_upstream::{FakeUpstream, Script};

fn arg(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} takes a whole number")),
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let port = arg(&args, "--port", 9100)?;
    let tokens = arg(&args, "--tokens", 40)?;
    let first_ms = arg(&args, "--first-token-ms", 150)?;
    let interval_ms = arg(&args, "--interval-ms", 25)?;
    let port = u16::try_from(port).map_err(|_| "--port must be below 65536".to_owned())?;
    let addr = format!("127.0.0.1:{port}").parse().map_err(|e| format!("{e}"))?;
    let fake = FakeUpstream::bind(addr, None)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let tokens = usize::try_from(tokens).map_err(|e| e.to_string())?;
    fake.set_default(Script::counted(tokens).paced(
        Duration::from_millis(first_ms),
        Duration::from_millis(interval_ms),
    ));
    println!(
        "fake upstream on {} ({tokens} tokens, first after {first_ms} ms, then every {interval_ms} ms)",
        fake.base_url()
    );
    println!(
        "OpenAI-compatible: POST /v1/chat/completions, Anthropic: POST /v1/messages, POST /v1/embeddings"
    );
    tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
    Ok(())
}
