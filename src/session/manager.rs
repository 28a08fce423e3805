//! The ConnectionManager: the registry of live sessions (one task each), the cap on how many may
//! live at once, a short memory of recently ended sessions, and the handles and dependencies of
//! session tasks (their counters are in [`super::stats`]; sharing with other nodes in
//! [`super::cluster`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::TurnMode;
use super::actor::{Actor, Command, Ownership};
use super::cluster::Cluster;
use super::cluster::takeover::Recovered;
use super::cluster::writer::{OwnerSetup, Writer};
use super::event::{EndedBy, JobUpdate, PersonaInfo, SessionStatus, TransportKind};
use super::log::{EventLog, Subscription};
use super::store::SessionMeta;
use crate::coach::Personas;
use crate::coach::notes::{Notes, NotesStore};
use crate::coach::prompt::PromptLimits;
use crate::context::ContextCache;
use crate::error::{Error, ErrorDetail};
use crate::llm::Llm;
use crate::memory::MemoryStore;
use crate::persist::WriteBehind;

/// Limits of sessions, all configurable.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Live sessions at most.
    pub max_sessions: usize,
    /// A session with no activity and no connection for this long ends.
    pub idle_timeout: Duration,
    /// Events kept for replay.
    pub log_events: usize,
    /// Events queued per connection before it is dropped as a slow client.
    pub client_queue: usize,
    /// Messages waiting behind the current reply at most.
    pub max_queued_turns: usize,
    /// Longest user message, in characters.
    pub max_text_chars: usize,
    /// Action items per turn at most.
    pub max_actions: usize,
    /// Turns kept for the end-of-session notes.
    pub notes_max_turns: usize,
    /// Ended sessions remembered for `GET /realtime/sessions/{id}`.
    pub ended_kept: usize,
    /// Prompt assembly.
    pub prompt: PromptLimits,
}

pub use super::stats::{Counter, Gauge, GaugeGuard, Stats};

/// What a session task needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct Deps {
    /// LLM gateway.
    pub llm: Arc<Llm>,
    /// Personas.
    pub personas: Arc<Personas>,
    /// Short-term context.
    pub context: Arc<dyn ContextCache>,
    /// Long-term memory.
    pub memory: Arc<dyn MemoryStore>,
    /// Notes.
    pub notes: Arc<dyn NotesStore>,
    /// Write-behind producer.
    pub write_behind: WriteBehind,
    /// Limits.
    /// Shared: every session's actor holds a clone of these dependencies.
    pub limits: Arc<SessionLimits>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
}

/// A session's state, as `GET /realtime/sessions/{id}` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Id.
    pub session_id: String,
    /// Owner.
    pub user_id: String,
    /// Coach.
    pub coach_id: String,
    /// Persona.
    pub persona: PersonaInfo,
    /// Transport asked for at creation.
    pub transport: TransportKind,
    /// Whether the session is live.
    pub status: SessionStatus,
    /// Turns finished.
    pub turn_count: u32,
    /// The turn streaming now.
    pub streaming_turn: Option<u32>,
    /// Messages waiting.
    pub queued_turns: usize,
    /// Attached connections.
    pub connections: usize,
    /// Latest event seq.
    pub last_seq: u64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// The result of ending a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndOutcome {
    /// Id.
    pub session_id: String,
    /// Turns finished.
    pub turn_count: u32,
    /// Notes, when asked for and generated.
    pub notes: Option<Notes>,
    /// Id of the stored notes.
    pub notes_id: Option<uuid::Uuid>,
    /// Why notes are missing, when asked for.
    pub notes_error: Option<ErrorDetail>,
}

/// A live session, as handlers see it; cheap to clone.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// Id.
    pub id: Arc<str>,
    /// Owner.
    pub user_id: Arc<str>,
    /// Coach.
    pub coach_id: Arc<str>,
    /// Transport asked for at creation.
    pub transport: TransportKind,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// The event log (of this node's session task, or of its relay of another node's).
    pub log: Arc<EventLog>,
    /// Boxed commands (see `actor::command_channel`).
    tx: mpsc::Sender<Box<Command>>,
    client_queue: usize,
}

fn gone() -> Error {
    Error::NotFound("session".to_owned())
}

impl SessionHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Box::new(make(tx))).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Sends a user turn; returns its turn number.
    pub async fn user_message(
        &self,
        text: String,
        mode: TurnMode,
        client_id: Option<String>,
    ) -> Result<u32, Error> {
        self.ask(|reply| Command::UserMessage {
            text,
            mode,
            client_id,
            reply,
        })
        .await?
    }

    /// Cancels the reply streaming now; returns whether there was one.
    pub async fn cancel(&self) -> Result<bool, Error> {
        self.ask(|reply| Command::Cancel { reply }).await
    }

    /// Ends the session.
    pub async fn end(&self, generate_notes: bool) -> Result<EndOutcome, Error> {
        self.ask(|reply| Command::End {
            generate_notes,
            reply,
        })
        .await
    }

    /// Ends the session once its current and queued turns are over.
    pub async fn end_when_idle(&self) -> Result<(), Error> {
        self.tx
            .send(Box::new(Command::EndWhenIdle))
            .await
            .map_err(|_| gone())
    }

    /// Publishes a job's progress in the session (wherever its task runs); returns once it is
    /// in the log, so awaiting each update keeps them in order.
    pub async fn job_update(&self, update: JobUpdate) -> Result<(), Error> {
        self.ask(|reply| Command::Job {
            update: Box::new(update),
            reply,
        })
        .await
    }

    /// The session's state.
    pub async fn info(&self) -> Result<SessionInfo, Error> {
        self.ask(|reply| Command::Info { reply }).await
    }

    /// Attaches a connection to the event log (see [`EventLog::subscribe`]).
    pub fn subscribe(&self, after_seq: Option<u64>) -> Subscription {
        self.log.subscribe(after_seq, self.client_queue)
    }

    /// A subscription for one turn request (HTTP or SSE turn), which
    /// [`SessionHandle::disconnect_clients`] leaves alone.
    pub fn subscribe_request(&self, after_seq: Option<u64>) -> Subscription {
        self.log.subscribe_request(after_seq, self.client_queue)
    }

    /// Drops this node's connections of the session (they are told to reconnect and resume);
    /// the session and its reply in flight go on. Returns how many were attached.
    pub fn disconnect_clients(&self) -> usize {
        self.log.disconnect_all()
    }
}

/// What is remembered of an ended session.
#[derive(Debug, Clone, Serialize)]
pub struct EndedSession {
    /// Id.
    pub session_id: String,
    /// Owner.
    pub user_id: String,
    /// Coach.
    pub coach_id: String,
    /// Always `ended`.
    pub status: SessionStatus,
    /// How it ended.
    pub ended_by: EndedBy,
    /// Turns finished.
    pub turn_count: u32,
    /// When it ended.
    pub ended_at: DateTime<Utc>,
}

/// Live and recently ended sessions.
#[derive(Debug, Default)]
pub(super) struct Registry {
    live: RwLock<HashMap<Arc<str>, SessionHandle>>,
    ended: Mutex<VecDeque<EndedSession>>,
    ended_kept: usize,
}

impl Registry {
    /// Takes a session off the live list without an ended record: it lives on another node.
    pub(super) fn forget(&self, id: &str) {
        self.live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    pub(super) fn remove(&self, id: &str, turn_count: u32, ended_by: EndedBy) {
        let removed = self
            .live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(h) = removed {
            let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
            if ended.len() >= self.ended_kept.max(1) {
                ended.pop_front();
            }
            ended.push_back(EndedSession {
                session_id: id.to_owned(),
                user_id: h.user_id.to_string(),
                coach_id: h.coach_id.to_string(),
                status: SessionStatus::Ended,
                ended_by,
                turn_count,
                ended_at: Utc::now(),
            });
        }
    }
}

/// Live sessions and their tasks.
#[derive(Debug)]
pub struct ConnectionManager {
    registry: Arc<Registry>,
    pub(in crate::session) deps: Deps,
    pub(in crate::session) tracker: TaskTracker,
    /// Sessions shared with other nodes, when Redis is configured.
    pub(in crate::session) cluster: Option<Arc<Cluster>>,
    /// Relays of sessions owned by other nodes.
    pub(in crate::session) remotes: Mutex<HashMap<Arc<str>, SessionHandle>>,
    /// Serialises setting up relays and takeovers (rare, and each must happen once).
    pub(in crate::session) relay_setup: tokio::sync::Mutex<()>,
}

impl ConnectionManager {
    /// A manager whose session tasks run on `tracker`.
    pub fn new(deps: Deps, tracker: TaskTracker) -> Self {
        let registry = Arc::new(Registry {
            ended_kept: deps.limits.ended_kept,
            ..Registry::default()
        });
        ConnectionManager {
            registry,
            deps,
            tracker,
            cluster: None,
            remotes: Mutex::new(HashMap::new()),
            relay_setup: tokio::sync::Mutex::new(()),
        }
    }

    /// The same manager, sharing its sessions with the other nodes of `cluster`.
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Starts a session for `user_id` with `coach_id` (an unknown coach gets the general persona),
    /// on this node only (see [`ConnectionManager::open`] for one shared with other nodes).
    pub fn create(
        &self,
        user_id: &str,
        coach_id: &str,
        transport: TransportKind,
    ) -> Result<SessionHandle, Error> {
        let meta = SessionMeta {
            session_id: String::new(),
            user_id: user_id.to_owned(),
            coach_id: coach_id.to_owned(),
            transport,
            created_at: Utc::now(),
            status: SessionStatus::Active,
            ended_by: None,
            ended_at: None,
            progress: Default::default(),
        };
        self.start(Self::new_id(), &meta, None, None)
    }

    pub(in crate::session) fn new_id() -> Arc<str> {
        Arc::from(format!("sess_{}", uuid::Uuid::new_v4().simple()))
    }

    /// Refuses a new session at the cap or during shutdown.
    pub(in crate::session) fn check_capacity(&self) -> Result<(), Error> {
        let live = self
            .registry
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        self.refuse_at(live)
    }

    fn refuse_at(&self, live: usize) -> Result<(), Error> {
        if live >= self.deps.limits.max_sessions {
            self.deps.stats.rejected_at_capacity.inc();
            return Err(Error::Unavailable(format!(
                "the server holds its maximum of {} live sessions; try again later",
                self.deps.limits.max_sessions
            )));
        }
        if self.deps.shutdown.is_cancelled() {
            return Err(Error::Unavailable("the server is shutting down".to_owned()));
        }
        Ok(())
    }

    /// Starts the task of a session this node owns (with `owner`, its shared-log writer beside
    /// it), new or `recovered` from another node.
    pub(in crate::session) fn spawn_session(
        &self,
        id: Arc<str>,
        owner: Option<OwnerSetup>,
        recovered: Option<Recovered>,
    ) -> Result<SessionHandle, Error> {
        let meta = match &owner {
            Some(o) => o.meta.clone(),
            None => return Err(Error::Internal(anyhow::anyhow!("a session without its metadata"))),
        };
        self.start(id, &meta, owner, recovered)
    }

    fn start(
        &self,
        id: Arc<str>,
        meta: &SessionMeta,
        owner: Option<OwnerSetup>,
        recovered: Option<Recovered>,
    ) -> Result<SessionHandle, Error> {
        let mut live = self.registry.live.write().unwrap_or_else(PoisonError::into_inner);
        self.refuse_at(live.len())?;
        let (tx, rx) = super::actor::command_channel(self.deps.limits.max_queued_turns + 8);
        let capacity = self.deps.limits.log_events;
        let (log, writer) = match owner {
            None => (Arc::new(EventLog::new(&id, capacity)), None),
            Some(setup) => {
                let wake = Arc::new(Notify::new());
                let log = Arc::new(EventLog::starting_at(
                    &id,
                    capacity,
                    setup.written,
                    Some(wake.clone()),
                ));
                let fenced = tokio_util::sync::CancellationToken::new();
                let (ended_tx, ended_rx) = oneshot::channel();
                let writer = Writer::new(setup, log.clone(), wake, fenced.clone(), ended_rx);
                (
                    log,
                    Some((
                        writer,
                        Ownership {
                            fenced,
                            ended: ended_tx,
                        },
                    )),
                )
            }
        };
        let handle = SessionHandle {
            id: id.clone(),
            user_id: Arc::from(meta.user_id.as_str()),
            coach_id: Arc::from(meta.coach_id.as_str()),
            transport: meta.transport,
            created_at: meta.created_at,
            log,
            tx,
            client_queue: self.deps.limits.client_queue,
        };
        let persona = self.deps.personas.resolve(&meta.coach_id).clone();
        let fresh = recovered.is_none();
        let (writer, ownership) = match writer {
            Some((w, o)) => (Some(w), Some(o)),
            None => (None, None),
        };
        let actor = Actor::new(
            handle.clone(),
            rx,
            self.deps.clone(),
            self.registry.clone(),
            persona,
        )
        .owned(ownership, recovered);
        live.insert(id, handle.clone());
        drop(live);
        if fresh {
            self.deps.stats.sessions_created.inc();
        }
        self.tracker.spawn(Box::new(actor).run());
        if let Some(writer) = writer {
            self.tracker.spawn(writer.run());
        }
        Ok(handle)
    }

    /// The handle of a session relayed from another node: its commands go to `tx` (forwarded
    /// to the owner), its log is the relay's.
    pub(in crate::session) fn remote_handle(
        &self,
        meta: &SessionMeta,
        tx: mpsc::Sender<Box<Command>>,
    ) -> SessionHandle {
        let id: Arc<str> = Arc::from(meta.session_id.as_str());
        SessionHandle {
            log: Arc::new(EventLog::new(&id, self.deps.limits.log_events)),
            id,
            user_id: Arc::from(meta.user_id.as_str()),
            coach_id: Arc::from(meta.coach_id.as_str()),
            transport: meta.transport,
            created_at: meta.created_at,
            tx,
            client_queue: self.deps.limits.client_queue,
        }
    }

    /// A live session.
    pub fn get(&self, id: &str) -> Option<SessionHandle> {
        self.registry
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// A recently ended session.
    pub fn ended(&self, id: &str) -> Option<EndedSession> {
        self.registry
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .rev()
            .find(|e| e.session_id == id)
            .cloned()
    }

    /// Live sessions now.
    pub fn live_count(&self) -> usize {
        self.registry
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.deps.stats
    }

    /// The dependencies (shared with routes that run turns outside a live session).
    pub fn deps(&self) -> &Deps {
        &self.deps
    }

    /// Records an ended session (for callers that end one through its handle).
    pub fn note_ended(&self) {
        self.deps.stats.sessions_ended.inc();
    }
}
