//! Dependency checks behind the health routes: each component reports its status and how long
//! its check took. Checks run concurrently and each is bounded by `COACHD_HEALTH_TIMEOUT_MS`.

use std::future::Future;
use std::time::{Duration, Instant};

use fred::prelude::ClientLike;
use serde::Serialize;

use crate::embed::offline::OFFLINE_MODEL;
use crate::embed::{Embedder, EmbeddingProvider, local};
use crate::llm::{Llm, ProviderKind};

/// Status of one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Configured and answering.
    Up,
    /// Configured and not answering (or failing).
    Down,
    /// Not configured: the in-process implementation serves instead.
    Embedded,
}

/// The report of one component check.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ComponentReport {
    /// Status of the component.
    pub status: Status,
    /// What serves it: `postgresql`, `redis`, `embedded`, or an LLM provider name.
    pub backend: String,
    /// How long the check took, in milliseconds.
    pub latency_ms: f64,
    /// Why it is down, or a note on what serves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ComponentReport {
    /// Whether this component makes the service unready.
    pub fn is_down(&self) -> bool {
        self.status == Status::Down
    }
}

async fn timed<F, E>(timeout: Duration, backend: &str, check: F) -> ComponentReport
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, check).await;
    let latency_ms = (start.elapsed().as_secs_f64() * 1_000_000.0).round() / 1_000.0;
    let (status, detail) = match result {
        Ok(Ok(())) => (Status::Up, None),
        Ok(Err(e)) => (Status::Down, Some(e.to_string())),
        Err(_) => (
            Status::Down,
            Some(format!("no answer within {} ms", timeout.as_millis())),
        ),
    };
    ComponentReport {
        status,
        backend: backend.to_owned(),
        latency_ms,
        detail,
    }
}

fn embedded(what: &str) -> ComponentReport {
    ComponentReport {
        status: Status::Embedded,
        backend: "embedded".to_owned(),
        latency_ms: 0.0,
        detail: Some(format!("{what} unset: the in-process implementation is used")),
    }
}

/// PostgreSQL: one round trip on a pooled connection.
pub async fn check_db(db: Option<&sqlx::PgPool>, timeout: Duration) -> ComponentReport {
    match db {
        None => embedded("DATABASE_URL"),
        Some(pool) => {
            timed(timeout, "postgresql", async {
                sqlx::query("select 1").execute(pool).await.map(|_| ())
            })
            .await
        }
    }
}

/// Redis: a PING through the pool.
pub async fn check_redis(redis: Option<&fred::clients::Pool>, timeout: Duration) -> ComponentReport {
    match redis {
        None => embedded("REDIS_URL"),
        Some(pool) => {
            timed(timeout, "redis", async {
                pool.next().ping::<String>(None).await.map(|_| ())
            })
            .await
        }
    }
}

/// The default LLM provider: a models listing (cheap, generates nothing), or `embedded` when
/// the offline provider answers because no key is configured (`configured` is `LLM_PROVIDER`).
pub async fn check_llm(llm: &Llm, configured: ProviderKind, timeout: Duration) -> ComponentReport {
    let kind = llm.default_provider();
    if kind == ProviderKind::Offline {
        let detail = if configured == ProviderKind::Offline {
            "LLM_PROVIDER=offline: the built-in offline provider answers".to_owned()
        } else {
            format!("no API key for {configured}: the offline provider answers")
        };
        return ComponentReport {
            status: Status::Embedded,
            backend: ProviderKind::Offline.to_string(),
            latency_ms: 0.0,
            detail: Some(detail),
        };
    }
    timed(timeout, kind.as_str(), llm.check_default()).await
}

/// `coachd healthcheck`: one `GET /health/live` to the server at `addr`, for container health
/// checks in images without curl. Plain blocking std I/O with `timeout` on connect, write and
/// read: no runtime, no settings, nothing that could itself hang.
pub fn probe_live(addr: std::net::SocketAddr, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET /health/live HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    // The status line is all we need; a live answer is short, so 64 bytes hold it.
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(format!("no answer from {addr}: {e}")),
        }
        if head[..read].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let status = line.lines().next().unwrap_or_default();
    if status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(format!("/health/live answered {status:?}"))
    }
}

/// The embedder that serves memory (no request: an embedding may cost money). `up` with the
/// model's name for the local or a remote model; `embedded` when feature hashing serves, either
/// by choice or because the local model's files are missing (`configured` is
/// `COACHD_EMBEDDING_PROVIDER`).
pub fn embedder_report(configured: EmbeddingProvider, embedder: &dyn Embedder) -> ComponentReport {
    let hashing = embedder.model() == OFFLINE_MODEL;
    let detail = match (hashing, configured) {
        (true, EmbeddingProvider::Offline) => {
            "COACHD_EMBEDDING_PROVIDER=offline: feature hashing (words, not meaning)".to_owned()
        }
        (true, _) => format!(
            "the {configured} embedder is not available (its files are missing: run {}): feature hashing serves",
            local::INSTALL_COMMAND
        ),
        (false, _) => format!("{configured}: {} dimensions", embedder.dimension()),
    };
    ComponentReport {
        status: if hashing { Status::Embedded } else { Status::Up },
        backend: embedder.model().to_owned(),
        latency_ms: 0.0,
        detail: Some(detail),
    }
}

#[cfg(test)]
mod probe_tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    /// A one-shot server that answers `reply` to whatever it is sent, and returns the request.
    fn serve_once(reply: &'static str) -> (std::net::SocketAddr, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            s.write_all(reply.as_bytes()).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (addr, server)
    }

    #[test]
    fn a_200_is_live_and_anything_else_is_not() {
        let (addr, server) =
            serve_once("HTTP/1.1 200 OK\r\ncontent-length: 18\r\n\r\n{\"status\":\"alive\"}");
        assert_eq!(super::probe_live(addr, Duration::from_secs(5)), Ok(()));
        assert!(
            server
                .join()
                .unwrap()
                .starts_with("GET /health/live HTTP/1.1\r\n")
        );

        let (addr, server) = serve_once("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        let err = super::probe_live(addr, Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("503"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn nothing_listening_is_an_error() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let err = super::probe_live(addr, Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }
}
