//! Services a test owns outright, so it can break them: a Redis (optionally with an append-only
//! file, so a restart keeps what was acknowledged), a PostgreSQL+pgvector cluster of its own
//! (never the shared test cluster), and `coachd` processes that can be killed with SIGKILL.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A free TCP port on loopback (free when asked; the caller binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for_port(port: u16, what: &str) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not listen on port {port}");
}

/// A client of the Redis at `url`, once it answers (a restarted one with an append-only file
/// answers `LOADING` while it reads it back).
pub async fn redis_client(url: &str) -> fred::clients::Client {
    use fred::prelude::*;
    for _ in 0..200 {
        let client = Builder::from_config(Config::from_url(url).unwrap())
            .build()
            .unwrap();
        if client.init().await.is_ok() && client.ping::<String>(None).await.is_ok() {
            return client;
        }
        let _ = client.quit().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the Redis at {url} did not answer");
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("coachd-{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // A failed test leaves its logs for the reader.
        if std::thread::panicking() {
            eprintln!("kept {} (the test failed)", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Redis of the test's own on a fixed port; `persistent` adds an append-only file fsynced on
/// every write, so a SIGKILL and restart lose nothing that was acknowledged.
pub struct OwnRedis {
    pub port: u16,
    dir: Option<PathBuf>,
    child: Child,
}

impl OwnRedis {
    /// An in-memory Redis (a restart loses everything: the epoch case).
    pub async fn start(port: u16) -> Self {
        Self::spawn(port, None).await
    }

    /// A Redis that keeps its data in `dir` across restarts.
    pub async fn start_persistent(port: u16, dir: &Path) -> Self {
        Self::spawn(port, Some(dir.to_owned())).await
    }

    async fn spawn(port: u16, dir: Option<PathBuf>) -> Self {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""]);
        match &dir {
            Some(d) => cmd
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(d),
            None => cmd.args(["--appendonly", "no"]),
        };
        let child = cmd
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on PATH");
        wait_for_port(port, "redis-server").await;
        OwnRedis { port, dir, child }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL; returns the port (and data directory) to restart on.
    pub async fn kill(mut self) -> (u16, Option<PathBuf>) {
        self.child.kill().await.unwrap();
        (self.port, self.dir.take())
    }

    /// Starts again where a killed one was.
    pub async fn restart(port: u16, dir: Option<PathBuf>) -> Self {
        Self::spawn(port, dir).await
    }
}

/// A PostgreSQL cluster of the test's own, from the pgvector-enabled build `scripts/test` names
/// in `COACHD_TEST_PG_BIN`; run as `COACHD_TEST_PG_USER` when the test runs as root (PostgreSQL
/// refuses root). Trust authentication on loopback only; fsync off (the machine does not crash,
/// only the server: its WAL in the page cache survives an immediate stop).
pub struct OwnPostgres {
    pub port: u16,
    bin: PathBuf,
    user: Option<String>,
    data: PathBuf,
    _dir: ScratchDir,
}

impl OwnPostgres {
    pub async fn start() -> Self {
        let bin = PathBuf::from(std::env::var("COACHD_TEST_PG_BIN").unwrap_or_else(|_| {
            panic!("COACHD_TEST_PG_BIN is not set: run the tests with scripts/test, which names the pgvector build")
        }));
        let user = std::env::var("COACHD_TEST_PG_USER")
            .ok()
            .filter(|u| !u.is_empty());
        let dir = ScratchDir::new("pg");
        let data = dir.0.join("data");
        if let Some(u) = &user {
            let status = Command::new("chown").arg(u).arg(&dir.0).status().await.unwrap();
            assert!(status.success(), "chown the cluster directory to {u}");
        }
        let pg = OwnPostgres {
            port: free_port(),
            bin,
            user,
            data,
            _dir: dir,
        };
        let data = pg.data.to_string_lossy().into_owned();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        .await;
        pg.start_server().await;
        pg
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        // The user PostgreSQL runs as may not be able to read the caller's working directory.
        cmd.current_dir(self.data.parent().unwrap());
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        cmd
    }

    async fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().await.unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub async fn start_server(&self) {
        let data = self.data.to_string_lossy().into_owned();
        let log = self.data.parent().unwrap().join("postgres.log");
        let opts = format!(
            "-p {} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
            self.port
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        )
        .await;
    }

    /// `pg_ctl stop -m immediate`: every backend is killed at once, as in a crash; the next start
    /// replays the WAL.
    pub async fn crash(&self) {
        let data = self.data.to_string_lossy().into_owned();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            .await;
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let exe = self.bin.join("pg_ctl");
        let mut cmd = match &self.user {
            Some(u) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", u, "--"]).arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        let _ = cmd
            .current_dir(self.data.parent().unwrap())
            .args(["-D", &data, "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A `coachd` process (`serve` or `worker`), killed on drop; its log goes to `log`.
pub struct Coachd {
    pub port: u16,
    child: Child,
}

impl Coachd {
    /// Starts `coachd <args>` with exactly `env` (plus `PORT`), and for `serve` waits until
    /// `/health/ready` answers 200.
    pub async fn start(args: &[&str], env: &[(String, String)], log: &Path) -> Self {
        Self::start_on(free_port(), args, env, log).await
    }

    /// The same on a given port (a node restarted where its clients knew it).
    pub async fn start_on(port: u16, args: &[&str], env: &[(String, String)], log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let out = log.try_clone().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_coachd"))
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("PORT", port.to_string())
            .env("COACHD_HOST", "127.0.0.1")
            .stdout(out)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start coachd");
        let me = Coachd { port, child };
        if args.first() == Some(&"serve") {
            let client = reqwest::Client::new();
            for _ in 0..600 {
                if client
                    .get(format!("{}/health/ready", me.base()))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
                {
                    return me;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("coachd {args:?} did not become ready on {port}");
        }
        me
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and reap.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}
