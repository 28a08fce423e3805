//! The fake upstream in a process of its own (this benchmark binary started again with
//! `COACHD_BENCH_ROLE=fake`), so its CPU per token is measured apart from the clients': the
//! yardstick for what a server in the middle spends. The parent sets each level's script over
//! the child's stdin.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use coachd::fake_upstream::{FakeUpstream, Script};
use tokio::io::AsyncBufReadExt;

use crate::BoxError;

/// The environment variable that makes this binary serve the fake instead of benchmarking.
pub const ROLE_ENV: &str = "COACHD_BENCH_ROLE";

/// In the child: serves the fake on a free port, prints its base URL, then applies every
/// `script TOKENS INTERVAL_MS` line read from stdin (answering `ok`) until stdin closes.
pub async fn serve() -> Result<(), BoxError> {
    let fake = FakeUpstream::start().await?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", fake.base_url())?;
    out.flush()?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["script", tokens, interval_ms] => match (tokens.parse(), interval_ms.parse()) {
                (Ok(tokens), Ok(interval_ms)) => {
                    fake.set_default(
                        Script::counted(tokens).paced(Duration::ZERO, Duration::from_millis(interval_ms)),
                    );
                    "ok".to_owned()
                }
                _ => format!("bad numbers: {line}"),
            },
            _ => format!("unknown command: {line}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// The fake's process, seen from the benchmark.
#[derive(Debug)]
pub struct FakeProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    base_url: String,
}

impl FakeProcess {
    /// Starts this binary again as the fake; it inherits this process's CPU placement.
    pub fn start() -> Result<Self, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(ROLE_ENV, "fake")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("fake: no stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("fake: no stdout")?);
        let mut base_url = String::new();
        stdout.read_line(&mut base_url)?;
        let base_url = base_url.trim().to_owned();
        if !base_url.starts_with("http://") {
            return Err(format!("fake did not start: {base_url:?}").into());
        }
        Ok(FakeProcess {
            child,
            stdin,
            stdout,
            base_url,
        })
    }

    /// `http://127.0.0.1:PORT/v1`, as a provider's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stream from now on: `tokens` tokens, `interval` apart (the first at once).
    pub fn set_script(&mut self, tokens: usize, interval: Duration) -> Result<(), BoxError> {
        writeln!(self.stdin, "script {tokens} {}", interval.as_millis())?;
        self.stdin.flush()?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer)?;
        match answer.trim() {
            "ok" => Ok(()),
            other => Err(format!("fake refused the script: {other:?}").into()),
        }
    }
}

impl Drop for FakeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
