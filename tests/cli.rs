//! The `coachd` binary end to end: configuration errors, `.env` loading, serving with no external
//! service, and a graceful stop on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("coachd-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn coachd(envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coachd"));
    cmd.current_dir(tempdir()).env_clear().envs(envs.iter().copied());
    cmd
}

#[test]
fn each_kind_of_bad_setting_stops_start_up_with_one_line() {
    let cases: &[(&str, &str, &str)] = &[
        ("PORT", "abc", "an integer from 0 to 65535"),
        ("PORT", "70000", "an integer from 0 to 65535"),
        ("RATE_LIMIT_REQUESTS", "-1", "an integer from 1 to"),
        ("RATE_LIMIT_TTL", "0", "an integer from 1 to"),
        ("SESSION_CONTEXT_TTL", "1h", "an integer from 1 to"),
        ("RATE_LIMIT_ENABLED", "maybe", "true or false"),
        ("DEBUG", "2", "true or false"),
        (
            "DATABASE_URL",
            "localhost:5432/coach",
            "a URL such as postgres://",
        ),
        ("REDIS_URL", "http://localhost:6379", "a URL such as redis://"),
        (
            "LLM_PROVIDER",
            "cohere",
            "one of openai, groq, anthropic, openrouter, offline",
        ),
        ("COACHD_LOG_FORMAT", "xml", "text or json"),
        ("COACHD_OPENAI_BASE_URL", "ftp://x", "an http(s) URL"),
        ("COACHD_HOST", "not-an-ip", "an IP address"),
    ];
    for (var, value, expected) in cases {
        let out = coachd(&[(var, value)]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{var}={value}: exit code; stderr: {stderr}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{var}={value}: one line, got {stderr:?}"
        );
        assert!(
            stderr.contains(var),
            "{var}={value}: names the variable: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{var}={value}: says the expected form: {stderr}"
        );
    }
}

#[test]
fn a_malformed_url_is_not_echoed() {
    let out = coachd(&[("DATABASE_URL", "postgres//admin:TopSecret@db")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("DATABASE_URL") && !stderr.contains("TopSecret"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_database_fails_start_up_without_leaking_the_password() {
    let out = coachd(&[
        ("DATABASE_URL", "postgres://coach:TopSecret@127.0.0.1:1/coach"),
        ("COACHD_DB_CONNECT_TIMEOUT_SECS", "2"),
        ("PORT", "0"),
    ])
    .output()
    .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(
        all.contains("cannot connect to PostgreSQL at postgres://coach:***@127.0.0.1:1/coach"),
        "{all}"
    );
    assert!(!all.contains("TopSecret"), "password leaked: {all}");
}

#[test]
fn settings_are_read_from_a_dotenv_file() {
    let dir = tempdir();
    std::fs::write(dir.join(".env"), "# comment\nRATE_LIMIT_REQUESTS=zero\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_coachd"))
        .current_dir(&dir)
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("RATE_LIMIT_REQUESTS") && stderr.contains("\"zero\""),
        "{stderr}"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serves_with_no_external_service_and_stops_cleanly_on_sigterm() {
    let port = free_port();
    let mut child = coachd(&[
        ("PORT", &port.to_string()),
        ("COACHD_HOST", "127.0.0.1"),
        ("COACHD_LOG_FORMAT", "json"),
        ("COACHD_SHUTDOWN_DRAIN_DELAY_SECS", "1"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                use std::io::Write;
                s.write_all(b"GET /health/all HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .unwrap();
                let mut buf = String::new();
                s.read_to_string(&mut buf).unwrap();
                break buf;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("coachd did not listen on {port}: {e}"),
        }
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains(r#""backend":"embedded""#), "{body}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "coachd did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(0), "graceful stop exits 0");

    let mut logs = String::new();
    child.stdout.take().unwrap().read_to_string(&mut logs).unwrap();
    let lines: Vec<&str> = logs.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
    }
    assert!(
        logs.contains("embedded in-process"),
        "says which storage it uses: {logs}"
    );
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(
        logs.contains("serving on for the drain delay"),
        "the stop drains before the listener closes: {logs}"
    );
}

#[test]
fn a_dotenv_syntax_error_names_the_variable_but_no_value() {
    let dir = tempdir();
    std::fs::write(
        dir.join(".env"),
        "PORT=8000\nBROKEN='unterminated\nOPENAI_API_KEY=sk-very-secret\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_coachd"))
        .current_dir(&dir)
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("BROKEN"), "{stderr}");
    assert!(!stderr.contains("sk-very-secret"), "secret leaked: {stderr}");
}

#[test]
fn the_documented_env_example_is_a_valid_configuration() {
    let dir = tempdir();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example"),
        dir.join(".env"),
    )
    .unwrap();
    // `help` exits before reading settings, so use an invalid extra variable to stop right after
    // the .env file and settings are read: the only complaint must be about that variable.
    let out = Command::new(env!("CARGO_BIN_EXE_coachd"))
        .current_dir(&dir)
        .env_clear()
        .env("COACHD_HEALTH_TIMEOUT_MS", "x")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("COACHD_HEALTH_TIMEOUT_MS"),
        ".env.example must parse: {stderr}"
    );
}

#[test]
fn healthcheck_exits_0_while_the_server_is_live_and_1_once_it_is_gone() {
    let port = free_port();
    let port_s = port.to_string();
    let mut child = coachd(&[("PORT", &port_s), ("COACHD_HOST", "127.0.0.1")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let probe = |host: &str| {
        coachd(&[("PORT", &port_s), ("COACHD_HOST", host)])
            .arg("healthcheck")
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "coachd did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let live = probe("127.0.0.1");
    assert_eq!(live.status.code(), Some(0), "{:?}", live);
    // 0.0.0.0 (the container's COACHD_HOST) is probed on the loopback address.
    assert_eq!(probe("0.0.0.0").status.code(), Some(0));

    child.kill().unwrap();
    child.wait().unwrap();
    let gone = probe("127.0.0.1");
    assert_eq!(gone.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(
        stderr.starts_with("coachd healthcheck: cannot connect"),
        "{stderr}"
    );

    let bad = coachd(&[("PORT", "x")]).arg("healthcheck").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
