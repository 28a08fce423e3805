//! The HTTP server loop: what `axum::serve` does (accept, serve each connection with upgrades,
//! stop accepting on shutdown and let open connections finish), with the limits hyper has but
//! `axum::serve` leaves unset. `axum::serve` builds hyper without a timer, so hyper's
//! header-read timeout never fires: a client that sends half a request head (slowloris) or
//! nothing at all held its connection, and a slot of `COACHD_MAX_CONNECTIONS`, for ever.
//!
//! Here every connection must deliver its first request head within `COACHD_HTTP_HEADER_TIMEOUT_SECS`
//! (checked by this loop, since hyper's own timer starts only once it knows the protocol), every
//! later head on a keep-alive connection within the same time (hyper's timer), a head may hold
//! at most `COACHD_HTTP_MAX_HEADER_BYTES` and `COACHD_HTTP_MAX_HEADERS` (431 past them), and an
//! HTTP/2 connection may open at most `COACHD_HTTP2_MAX_STREAMS` streams at once. A request body
//! that stalls is bounded by a layer of the router (`COACHD_HTTP_BODY_TIMEOUT_SECS`).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::listener::{Admission, Counted};

/// Limits of the HTTP layer (`COACHD_HTTP_*`).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// `COACHD_HTTP_HEADER_TIMEOUT_SECS`: longest wait for a complete request head, counted from
    /// the connection's opening for the first request and from the last response for the next.
    pub header_timeout: Duration,
    /// `COACHD_HTTP_BODY_TIMEOUT_SECS`: longest a request body may send nothing.
    pub body_timeout: Duration,
    /// `COACHD_HTTP_MAX_HEADER_BYTES`: largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// `COACHD_HTTP_MAX_HEADERS`: most header fields in one request.
    pub max_headers: usize,
    /// `COACHD_HTTP2_MAX_STREAMS`: most concurrent streams on one HTTP/2 connection.
    pub h2_max_streams: u32,
}

/// Smallest read buffer hyper accepts (`max_buf_size` panics below it).
const MIN_HEAD_BYTES: usize = 8_192;

fn builder(limits: &HttpLimits) -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEAD_BYTES))
        .max_headers(limits.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        // WebSocket over HTTP/2 (RFC 8441), as `axum::serve` enables it.
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.h2_max_streams);
    b
}

/// Serves `app` on `listener` until `stop` is cancelled, then stops accepting and waits for the
/// open connections to finish their requests (the caller bounds that wait with its grace period
/// by dropping this future). Each request carries the connection's [`Admission`] as `ConnectInfo`.
pub async fn serve<L, I>(
    mut listener: L,
    app: Router,
    limits: HttpLimits,
    stop: CancellationToken,
) -> io::Result<()>
where
    L: Listener<Io = Counted<I>>,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = Arc::new(builder(&limits));
    // Connection tasks are tracked, not detached: shutdown waits for them (or the caller drops
    // this future past the grace period, and the runtime's end drops them).
    let connections = TaskTracker::new();
    loop {
        let (io, _addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let admission = io.admission();
        connections.spawn(serve_connection(
            io,
            app.clone(),
            admission,
            builder.clone(),
            limits.header_timeout,
            stop.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve_connection<I>(
    io: Counted<I>,
    app: Router,
    admission: Admission,
    builder: Arc<Builder<TokioExecutor>>,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let first_request = Arc::new(AtomicBool::new(false));
    let seen = first_request.clone();
    let service = app.map_request(move |mut req: Request<Incoming>| {
        seen.store(true, Ordering::Relaxed);
        req.extensions_mut().insert(ConnectInfo(admission));
        req
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    // hyper cannot time the first head: the auto builder first reads bytes to tell HTTP/1 from
    // HTTP/2, without a timer. So the first request must have arrived by this deadline.
    let first_deadline = tokio::time::sleep(header_timeout);
    tokio::pin!(first_deadline);
    let mut waiting_first = true;
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut first_deadline, if waiting_first => {
                if !first_request.load(Ordering::Relaxed) {
                    tracing::debug!(
                        timeout_secs = header_timeout.as_secs_f64(),
                        "closing a connection that sent no complete request head in time"
                    );
                    return;
                }
                waiting_first = false;
            }
            () = stop.cancelled(), if !closing => {
                // In-flight requests finish; idle keep-alive connections close now.
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::{CountingListener, Pipes};
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn limits() -> HttpLimits {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_header_bytes: 16_384,
            max_headers: 20,
            h2_max_streams: 10,
        }
    }

    /// A server on in-memory pipes; returns the sender of new client connections.
    fn start(
        stop: CancellationToken,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<DuplexStream>,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let listener = CountingListener::new(Pipes(rx), 100, 10);
        let app = Router::new().route("/", get(|| async { "ok" }));
        #[allow(clippy::disallowed_methods, reason = "the test keeps the handle")]
        let server = tokio::spawn(serve(listener, app, limits(), stop));
        (tx, server)
    }

    fn connect(tx: &tokio::sync::mpsc::UnboundedSender<DuplexStream>) -> DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tx.send(server).unwrap();
        client
    }

    /// Sends one GET and returns the reply, leaving the connection open.
    async fn get_root(client: &mut DuplexStream) -> String {
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 1024];
        let n = client.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Reads until the server closes the pipe; what it wrote.
    async fn read_to_close(client: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_or_half_a_head_is_closed_at_the_header_timeout() {
        let stop = CancellationToken::new();
        let (tx, _server) = start(stop.clone());
        let mut silent = connect(&tx);
        let mut slow = connect(&tx);
        // The first bytes of a head, never finished (and `P` keeps the protocol undecided).
        slow.write_all(b"PRI").await.unwrap();
        let began = tokio::time::Instant::now();
        assert_eq!(read_to_close(&mut silent).await, "");
        assert_eq!(read_to_close(&mut slow).await, "");
        let waited = began.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_connection_is_served_then_closed_when_it_stalls_mid_head() {
        let stop = CancellationToken::new();
        let (tx, _server) = start(stop.clone());
        let mut client = connect(&tx);
        let reply = get_root(&mut client).await;
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok"),
            "{reply}"
        );
        // Past the first deadline, hyper's own timer bounds the next head.
        tokio::time::sleep(Duration::from_secs(5)).await;
        client.write_all(b"GET / HTTP/1.1\r\nhost").await.unwrap();
        let rest = read_to_close(&mut client).await;
        assert!(rest.is_empty() || rest.starts_with("HTTP/1.1 408"), "{rest}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_past_the_size_limit_gets_431() {
        let stop = CancellationToken::new();
        let (tx, _server) = start(stop.clone());
        let mut client = connect(&tx);
        let big = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        client.write_all(big.as_bytes()).await.unwrap();
        let reply = read_to_close(&mut client).await;
        assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");

        let mut client = connect(&tx);
        let many: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
        client
            .write_all(format!("GET / HTTP/1.1\r\nhost: x\r\n{many}\r\n").as_bytes())
            .await
            .unwrap();
        let reply = read_to_close(&mut client).await;
        assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_accepting_and_lets_an_idle_connection_go() {
        let stop = CancellationToken::new();
        let (tx, server) = start(stop.clone());
        let mut client = connect(&tx);
        assert!(get_root(&mut client).await.starts_with("HTTP/1.1 200"));
        stop.cancel();
        // The idle keep-alive connection closes, and the loop returns once it has.
        assert_eq!(read_to_close(&mut client).await, "");
        server.await.unwrap().unwrap();
    }
}
