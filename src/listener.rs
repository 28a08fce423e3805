//! The accept side of the server: the open-file limit raised at start-up, the number of client
//! connections it leaves room for, and a listener that counts live connections and marks each new
//! one as admitted or past capacity.
//!
//! Why count at accept: a server out of descriptors fails in `accept` with EMFILE, and axum's serve
//! loop logs that and sleeps a second, over and over, while clients wait in the backlog without an
//! answer. Keeping the live count below the limit leaves descriptors in reserve, so a connection
//! past capacity is still accepted, answered (503 with `Retry-After`, or a WebSocket close 1013:
//! `routes::capacity`) and closed, and the streams already running carry on. Past a second,
//! higher mark (capacity plus half the reserve) a new connection is closed at once, unanswered:
//! refusing must not itself use up the reserve.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How many client connections one node takes (`COACHD_MAX_CONNECTIONS`, `COACHD_FD_RESERVE`,
/// `COACHD_CAPACITY_RETRY_AFTER_SECS`).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most live client connections; 0 derives it from the open-file limit (see [`capacity`]).
    pub max_connections: usize,
    /// Descriptors kept out of the client count: database and Redis pools, log files, the
    /// listener, job workers, and the connections that are refused.
    pub fd_reserve: u64,
    /// `Retry-After` of a refusal.
    pub retry_after: Duration,
}

/// The process's open-file limit after [`raise_open_file_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit in force.
    pub soft: u64,
    /// The hard limit, the most the soft one can be raised to without privileges.
    pub hard: u64,
    /// The soft limit before start-up raised it, when it did.
    pub raised_from: Option<u64>,
}

/// Linux refuses an open-file limit above `fs.nr_open` (1 048 576 by default), so an unlimited
/// hard limit is raised to that instead.
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Raises the soft open-file limit to the hard one: the default soft limit (often 1 024) is there
/// for programs that use `select`, which coachd does not, and every connection costs a descriptor.
pub fn raise_open_file_limit() -> io::Result<OpenFiles> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let target = if hard == rlimit::INFINITY { nr_open() } else { hard };
    if soft >= target {
        return Ok(OpenFiles {
            soft,
            hard,
            raised_from: None,
        });
    }
    rlimit::setrlimit(rlimit::Resource::NOFILE, target, hard)?;
    Ok(OpenFiles {
        soft: target,
        hard,
        raised_from: Some(soft),
    })
}

/// The live client connections the node takes. Without `COACHD_MAX_CONNECTIONS`, half of what the
/// open-file limit leaves after the reserve: a relayed stream holds its client's descriptor and,
/// while each stream opens an upstream connection of its own, one more.
pub fn capacity(limits: &ConnectionLimits, files: &OpenFiles) -> usize {
    if limits.max_connections > 0 {
        return limits.max_connections;
    }
    let room = files.soft.saturating_sub(limits.fd_reserve) / 2;
    usize::try_from(room).unwrap_or(usize::MAX).max(1)
}

/// Live and refused connections, shared by the listener and whoever reports them.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    live: AtomicUsize,
    refused: AtomicU64,
    dropped: AtomicU64,
}

impl ConnectionCounts {
    /// Connections open now, refused ones included until they close.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Connections accepted past capacity (answered with a refusal) since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed unanswered at accept, past the refusal reserve, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Wraps a listener: counts every accepted connection until it closes and marks whether it came
/// within capacity ([`Admission`], read by the `routes::capacity` layer through `ConnectInfo`).
#[derive(Debug)]
pub struct CountingListener<L> {
    inner: L,
    counts: Arc<ConnectionCounts>,
    capacity: usize,
    /// At or above this many live connections a new one is closed at once.
    hard_mark: usize,
}

impl<L> CountingListener<L> {
    /// `capacity` connections are admitted; `refusal_room` more are accepted to be refused.
    pub fn new(inner: L, capacity: usize, refusal_room: usize) -> Self {
        Self {
            inner,
            counts: Arc::default(),
            capacity,
            hard_mark: capacity.saturating_add(refusal_room.max(1)),
        }
    }

    /// The counters, for logs and the health report.
    pub fn counts(&self) -> Arc<ConnectionCounts> {
        self.counts.clone()
    }
}

/// Decrements the live count when its connection closes, whatever closes it.
#[derive(Debug)]
struct Live(Arc<ConnectionCounts>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<L: Listener> Listener for CountingListener<L> {
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            let before = self.counts.live.fetch_add(1, Ordering::Relaxed);
            let live = Live(self.counts.clone());
            if before >= self.hard_mark {
                let dropped = self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                // One line per thousand: a flood must not turn into a flood of logs.
                if dropped.is_multiple_of(1_000) {
                    tracing::warn!(
                        live = before,
                        capacity = self.capacity,
                        dropped = dropped + 1,
                        "connection closed unanswered: past capacity and the refusal reserve"
                    );
                }
                drop((io, live));
                continue;
            }
            let admitted = before < self.capacity;
            if !admitted {
                let refused = self.counts.refused.fetch_add(1, Ordering::Relaxed);
                if refused.is_multiple_of(1_000) {
                    tracing::warn!(
                        live = before,
                        capacity = self.capacity,
                        refused = refused + 1,
                        "connection past capacity: answered with a refusal"
                    );
                }
            }
            return (
                Counted {
                    io,
                    admitted,
                    _live: live,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection, counted while it is open.
#[derive(Debug)]
pub struct Counted<Io> {
    io: Io,
    admitted: bool,
    _live: Live,
}

impl<Io> Counted<Io> {
    /// Whether the connection came within capacity: the `ConnectInfo` its requests carry.
    pub fn admission(&self) -> Admission {
        Admission {
            admitted: self.admitted,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Counted<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Counted<Io> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Whether a connection came within capacity: the `ConnectInfo` of every request (inserted by
/// the server loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// False for a connection accepted past capacity, which gets a refusal and is closed.
    pub admitted: bool,
}

/// A listener of scripted connections (in-memory pipes), so the listener and the server loop
/// are tested without sockets, in paused time.
#[cfg(test)]
pub(crate) struct Pipes(pub(crate) tokio::sync::mpsc::UnboundedReceiver<tokio::io::DuplexStream>);

#[cfg(test)]
impl Listener for Pipes {
    type Io = tokio::io::DuplexStream;
    type Addr = ();

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.recv().await {
            Some(io) => (io, ()),
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, reserve: u64) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: max,
            fd_reserve: reserve,
            retry_after: Duration::from_secs(5),
        }
    }

    fn files(soft: u64) -> OpenFiles {
        OpenFiles {
            soft,
            hard: soft,
            raised_from: None,
        }
    }

    #[test]
    fn capacity_is_half_the_descriptors_left_after_the_reserve_unless_set() {
        assert_eq!(capacity(&limits(0, 256), &files(20_000)), 9_872);
        assert_eq!(capacity(&limits(0, 256), &files(100)), 1, "never zero");
        assert_eq!(capacity(&limits(500, 256), &files(20_000)), 500);
    }

    #[test]
    fn raising_the_limit_leaves_the_soft_limit_at_the_hard_one() {
        let got = raise_open_file_limit().expect("getrlimit works on Linux");
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
        assert_eq!(got.soft, soft);
        assert_eq!(got.hard, hard);
        assert!(
            hard == rlimit::INFINITY || soft == hard,
            "soft {soft}, hard {hard}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connections_past_capacity_are_marked_and_past_the_reserve_closed() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut listener = CountingListener::new(Pipes(rx), 2, 1);
        let counts = listener.counts();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (client, server) = tokio::io::duplex(64);
            clients.push(client);
            tx.send(server).expect("listener alive");
        }
        let (a, ()) = listener.accept().await;
        let (b, ()) = listener.accept().await;
        let (c, ()) = listener.accept().await;
        assert!(a.admitted && b.admitted);
        assert!(!c.admitted, "the third is past a capacity of two");
        assert_eq!((counts.live(), counts.refused()), (3, 1));

        // The fourth is past the reserve: closed unanswered, and accept waits for the next one.
        let next = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(next.is_err(), "no fifth connection was offered");
        assert_eq!((counts.live(), counts.dropped()), (3, 1));

        // A closed connection frees its place: the next one is admitted again.
        drop((a, c));
        assert_eq!(counts.live(), 1);
        let (client, server) = tokio::io::duplex(64);
        clients.push(client);
        tx.send(server).expect("listener alive");
        let (d, ()) = listener.accept().await;
        assert!(d.admitted);
        assert_eq!(counts.live(), 2);
    }
}
