//! The process boundary: the parent side spawns `coachd __extract`, feeds it the document on
//! stdin and reads one JSON reply from stdout, under a deadline and an output bound; the child
//! side ([`run_child`]) limits its own address space, parses, and writes the reply. A panic,
//! an abort, a signal or a hang in the parser ends the child only, and comes back typed.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{CHILD_COMMAND, DocFormat, ExtractError, Extracted, Limits, parse};

/// Bytes of the child's stderr kept for the crash message (the end, where a panic's is).
const STDERR_TAIL: usize = 4096;

/// The child's one line of output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Ok(Extracted),
    Err(ExtractError),
}

/// Runs one parse in a child process of `exe`.
pub(super) async fn run(
    exe: &Path,
    bytes: Bytes,
    format: DocFormat,
    limits: Limits,
    max_memory_mb: u64,
    timeout: Duration,
) -> Result<Extracted, ExtractError> {
    let mut child = tokio::process::Command::new(exe)
        .arg(CHILD_COMMAND)
        .args(["--format", format.as_str()])
        .args(["--max-pages", &limits.max_pages.to_string()])
        .args(["--max-output-bytes", &limits.max_output_bytes.to_string()])
        .args(["--max-memory-mb", &max_memory_mb.to_string()])
        // The parser sees the document and nothing else: no API keys, no database URL.
        .env_clear()
        .env("RUST_BACKTRACE", "0")
        // mimalloc reserves 1 GiB of address space for its first arena, which counts against
        // the child's RLIMIT_AS: under a 1 GiB limit nothing was left for the PDF parser's
        // thread pool, and the limit meant 1 GiB less than it said. Small arenas make it mean
        // what it says.
        .env("MIMALLOC_ARENA_RESERVE", "32MiB")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A cancelled job drops this future; the child must not outlive it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ExtractError::Internal(format!("cannot start {}: {e}", exe.display())))?;
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(ExtractError::Internal(
            "the parser's pipes were not set up".to_owned(),
        ));
    };
    // The JSON holds the Markdown twice (whole and in sections), escaped.
    let max_reply = limits.max_output_bytes.saturating_mul(3).saturating_add(1 << 20);

    let work = async {
        // Written while the output is read, so neither side blocks on a full pipe. A child
        // that exits early (a bound hit on the first bytes) closes stdin: not our error.
        let write = async move {
            let _ = stdin.write_all(&bytes).await;
            drop(stdin);
        };
        let (_, out, err) = tokio::join!(write, read_bounded(stdout, max_reply), read_tail(stderr));
        (out, err)
    };
    let (out, err) = match tokio::time::timeout(timeout, work).await {
        Ok(done) => done,
        Err(_) => {
            kill(&mut child).await;
            return Err(ExtractError::Timeout {
                secs: timeout.as_secs().max(1),
            });
        }
    };
    let Some(out) = out else {
        kill(&mut child).await;
        return Err(ExtractError::OutputTooLarge {
            max: limits.max_output_bytes,
        });
    };
    // Both pipes are closed, so the child is exiting; the deadline still bounds the wait.
    let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(ExtractError::Internal(format!("cannot wait for the parser: {e}"))),
        Err(_) => {
            kill(&mut child).await;
            return Err(ExtractError::Timeout {
                secs: timeout.as_secs().max(1),
            });
        }
    };
    if status.success()
        && let Ok(reply) = serde_json::from_slice::<Reply>(&out)
    {
        return match reply {
            Reply::Ok(extracted) => Ok(extracted),
            Reply::Err(e) => Err(e),
        };
    }
    Err(ExtractError::Crashed(describe_exit(status, &err)))
}

async fn kill(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// All of `r`, or `None` once it passes `max` bytes.
async fn read_bounded(r: impl AsyncRead + Unpin, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    r.take(limit).read_to_end(&mut out).await.ok()?;
    (out.len() <= max).then_some(out)
}

/// The last [`STDERR_TAIL`] bytes of `r`.
async fn read_tail(mut r: impl AsyncRead + Unpin) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
    }
    let start = tail.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&tail[start..]).into_owned()
}

/// "panicked: <message>", "killed by signal 6 (SIGABRT): memory allocation of ... failed", ...
fn describe_exit(status: std::process::ExitStatus, stderr: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let detail = if let Some(oom) = lines.iter().find(|l| l.starts_with("memory allocation of")) {
        oom
    } else if let Some(i) = lines.iter().position(|l| l.contains("panicked at")) {
        // Since Rust 1.73 the message is on the line after "thread 'main' panicked at file:line:".
        lines.get(i + 1).or(lines.get(i)).copied().unwrap_or_default()
    } else {
        lines
            .iter()
            .rev()
            .find(|l| !l.starts_with("note:"))
            .copied()
            .unwrap_or_default()
    };
    let detail: String = detail.chars().take(500).collect();
    let how = match (status.code(), status.signal()) {
        (Some(101), _) => "panicked".to_owned(),
        (Some(0), _) => "gave an unreadable reply".to_owned(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}{}", signal_name(sig)),
        (None, None) => "ended abnormally".to_owned(),
    };
    if detail.is_empty() {
        how
    } else {
        format!("{how}: {detail}")
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        6 => " (SIGABRT)",
        9 => " (SIGKILL, out of memory?)",
        11 => " (SIGSEGV)",
        _ => "",
    }
}

/// The message of a panic caught on a blocking thread (in-process isolation).
pub(super) fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            format!("panicked: {msg}")
        }
        Err(e) => format!("the parse task ended: {e}"),
    }
}

/// The `coachd __extract` subcommand: `--format F --max-pages N --max-output-bytes N
/// --max-memory-mb N`, the document on stdin, one JSON reply on stdout. Exit status 0 with a
/// reply (success or a typed error); anything else is a crash for the parent.
pub fn run_child(args: impl IntoIterator<Item = String>) -> ExitCode {
    let mut format = None;
    let mut limits = Limits::default();
    let mut max_memory_mb: u64 = 0;
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        let ok = match flag.as_str() {
            "--format" => {
                format = DocFormat::parse(&value);
                format.is_some()
            }
            "--max-pages" => value.parse().map(|v| limits.max_pages = v).is_ok(),
            "--max-output-bytes" => value.parse().map(|v| limits.max_output_bytes = v).is_ok(),
            "--max-memory-mb" => value.parse().map(|v| max_memory_mb = v).is_ok(),
            _ => false,
        };
        if !ok {
            eprintln!("coachd {CHILD_COMMAND}: bad argument {flag} {value:?}");
            return ExitCode::from(2);
        }
    }
    let Some(format) = format else {
        eprintln!("coachd {CHILD_COMMAND}: --format is required");
        return ExitCode::from(2);
    };
    if max_memory_mb > 0 {
        let bytes = max_memory_mb.saturating_mul(1 << 20);
        if let Err(e) = rlimit::setrlimit(rlimit::Resource::AS, bytes, bytes) {
            eprintln!("coachd {CHILD_COMMAND}: cannot limit memory: {e}");
            return ExitCode::from(2);
        }
    }
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut input) {
        eprintln!("coachd {CHILD_COMMAND}: cannot read the document: {e}");
        return ExitCode::from(2);
    }
    let reply = match parse(&input, format, limits) {
        Ok(extracted) => Reply::Ok(extracted),
        Err(e) => Reply::Err(e),
    };
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &reply).is_ok() && stdout.flush().is_ok();
    if written {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Test-only faults, compiled with the `fake-upstream` feature: a document starting with
/// `%coachd-test-fault:<kind>` makes the parser panic, abort, hang, spin or exhaust memory, so
/// tests (here and in the job tests) can show that a failing parser never takes its caller down.
#[cfg(feature = "fake-upstream")]
#[allow(clippy::panic, reason = "the fault being simulated is a panicking parser")]
pub(super) fn fault(bytes: &[u8]) {
    const MARK: &[u8] = b"%coachd-test-fault:";
    let Some(rest) = bytes.strip_prefix(MARK) else {
        return;
    };
    match rest.split(u8::is_ascii_whitespace).next().unwrap_or_default() {
        b"panic" => panic!("test fault: the parser panicked"),
        b"abort" => std::process::abort(),
        b"hang" => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        b"spin" => loop {
            std::hint::spin_loop();
        },
        b"alloc" => {
            // Touch every page so the memory is really wanted, not just reserved.
            let v = vec![1u8; 4 << 30];
            std::hint::black_box(&v);
        }
        _ => {}
    }
}
