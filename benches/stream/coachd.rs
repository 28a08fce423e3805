//! coachd as its own process (the release binary, embedded stores unless told otherwise, the
//! fake as its OpenAI upstream, rate limits off, one API key), and where the processes run.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::BoxError;

/// The API key coachd is started with; every client sends it.
pub const API_KEY: &str = "bench-key";

/// A running coachd; killed on drop.
#[derive(Debug)]
pub struct Coachd {
    child: Child,
    pub base: String,
    pub port: u16,
}

impl Coachd {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Coachd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The coachd binary: `COACHD_BENCH_BIN` (for example a build of another checkout, to profile
/// it), else the one cargo built next to this benchmark.
fn binary() -> String {
    std::env::var("COACHD_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_coachd").to_owned())
}

/// Where the processes run. By default coachd, the fake and the clients share every CPU, as
/// they must on a small machine. With `COACHD_BENCH_PIN=1` (two or more CPUs and `taskset`),
/// the server under test gets the last CPU to itself and this process, the fake and the
/// clients the others, closer to a load generator on a separate machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Pinned { server_cpu: usize },
    Shared,
}

impl Placement {
    /// Reads `COACHD_BENCH_PIN`; pins this process's threads (before the fake is started, so
    /// it inherits them).
    pub fn choose() -> Self {
        if std::env::var_os("COACHD_BENCH_PIN").is_none() {
            return Placement::Shared;
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus < 2 {
            eprintln!("COACHD_BENCH_PIN needs two CPUs; running shared");
            return Placement::Shared;
        }
        let server_cpu = cpus - 1;
        // Every thread of this process (tokio's workers already exist) onto the other CPUs.
        let ok = Command::new("taskset")
            .args([
                "-a",
                "-cp",
                &format!("0-{}", server_cpu - 1),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Placement::Pinned { server_cpu }
        } else {
            eprintln!("taskset failed; running shared");
            Placement::Shared
        }
    }

    pub fn describe(self) -> String {
        match self {
            Placement::Pinned { server_cpu } => format!(
                "the server under test pinned to CPU {server_cpu} (coachd: one runtime worker), the fake and the clients to CPU 0-{}",
                server_cpu - 1
            ),
            Placement::Shared => "the server under test, the fake and the clients share every CPU".to_owned(),
        }
    }

    /// A command for `program`, through `taskset` when pinned (taskset execs it, so the
    /// child's pid is the program's own, for its RSS and CPU time).
    pub fn command(self, program: &str) -> Command {
        match self {
            Placement::Pinned { server_cpu } => {
                let mut c = Command::new("taskset");
                c.args(["-c", &server_cpu.to_string(), program]);
                c
            }
            Placement::Shared => Command::new(program),
        }
    }
}

/// Where a child's stdout goes: with `COACHD_BENCH_LOG`, to this process's stderr.
pub fn child_log() -> Stdio {
    if std::env::var_os("COACHD_BENCH_LOG").is_some() {
        Stdio::from(std::io::stderr())
    } else {
        Stdio::null()
    }
}

/// Polls `url` until it answers (any status), for up to `patience`.
pub async fn wait_until_up(url: &str, patience: Duration, child: &mut Child) -> Result<(), BoxError> {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + patience;
    while std::time::Instant::now() < deadline {
        if client.get(url).send().await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!("{url}: the server exited ({status})").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{url} did not answer within {patience:?}").into())
}

pub async fn start_coachd(
    fake_base_url: &str,
    placement: Placement,
    extra_env: &[(&str, String)],
) -> Result<Coachd, BoxError> {
    let port = free_port()?;
    let mut child = placement
        .command(&binary())
        .env_clear()
        .env("PORT", port.to_string())
        .env("COACHD_HOST", "127.0.0.1")
        .env("LLM_PROVIDER", "openai")
        .env("OPENAI_API_KEY", "bench")
        .env("COACHD_OPENAI_BASE_URL", fake_base_url)
        // `COACHD_BENCH_UPSTREAM=h2`: the streams share h2c connections to the fake instead of
        // one HTTP/1.1 connection (and descriptor) each.
        .env(
            "COACHD_OPENAI_HTTP_VERSION",
            std::env::var("COACHD_BENCH_UPSTREAM").unwrap_or_else(|_| "auto".into()),
        )
        .env("COACHD_API_KEYS", API_KEY)
        // Over shared h2c a relayed stream holds one descriptor (its client's), not two, so the
        // derived capacity ((open files - reserve) / 2) would refuse streams the node can hold.
        .envs(
            std::env::var("COACHD_BENCH_UPSTREAM")
                .is_ok_and(|u| u == "h2")
                .then_some(("COACHD_MAX_CONNECTIONS", "19000")),
        )
        .env(
            "COACHD_LOG",
            std::env::var("COACHD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("COACHD_MAX_SESSIONS", "20000")
        .env("RATE_LIMIT_ENABLED", "false")
        // Nothing balances load onto this process: stop at once instead of draining readiness.
        .env("COACHD_SHUTDOWN_DRAIN_DELAY_SECS", "0")
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(std::env::temp_dir())
        .stdout(child_log())
        .stderr(Stdio::inherit())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    match wait_until_up(&format!("{base}/health"), Duration::from_secs(30), &mut child).await {
        Ok(()) => Ok(Coachd { child, base, port }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("coachd did not start: {e}").into())
        }
    }
}
