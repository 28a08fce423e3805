//! What the session layer's unit tests share (test builds only): a ConnectionManager over a
//! scripted provider, which stands in for the paid LLM API at the trait level (scripted tokens,
//! scripted delays), and the real in-process stores. The actor's tests and the transports' tests
//! drive sessions through it, so neither needs the composition layer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coach::Personas;
use crate::coach::notes::InProcessNotesStore;
use crate::coach::prompt::PromptLimits;
use crate::context::{ContextCache, ContextLimits, in_process::InProcessContextCache};
use crate::embed::offline::OfflineEmbedder;
use crate::llm::router::RetryPolicy;
use crate::llm::{
    ChatRequest, EventStream, FinishReason, Llm, LlmError, LlmEvent, ModelRef, Params, Provider, TaskSpec,
    Usage,
};
use crate::llm::{LlmTimeouts, ProviderKind};
use crate::memory::{MemoryLimits, MemoryStore, in_process::InProcessMemoryStore};
use crate::persist::{WriteBehind, WriteBehindConfig};
use crate::session::event::TransportKind;
use crate::session::log::Subscription;
use crate::session::{ConnectionManager, Deps, SessionHandle, SessionLimits, Stats};

/// What one provider call does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Script {
    /// `tokens` tokens, each after `gap`, then usage and a finish reason.
    Reply { tokens: usize, gap: Duration },
    /// The request fails before any token (a 503, not retried).
    Refuse,
}

/// The provider of these tests: plays one script per call (the last one again when they run out)
/// and counts the upstream streams still open, so a test can see a cancel abort the request.
#[derive(Debug)]
pub(crate) struct Scripted {
    scripts: Mutex<VecDeque<Script>>,
    open: Arc<AtomicUsize>,
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Provider for Scripted {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Openai
    }

    fn default_model(&self) -> &str {
        "scripted"
    }

    fn supports_json_schema(&self) -> bool {
        false
    }

    fn supports_json_object(&self) -> bool {
        false
    }

    async fn stream(&self, _request: ChatRequest) -> Result<EventStream, LlmError> {
        let script = {
            let mut scripts = self.scripts.lock().unwrap();
            if scripts.len() > 1 {
                scripts.pop_front().unwrap()
            } else {
                *scripts.front().unwrap()
            }
        };
        let (tokens, gap) = match script {
            Script::Refuse => {
                return Err(LlmError::Unavailable {
                    provider: ProviderKind::Openai,
                    status: Some(503),
                    message: "scripted outage".into(),
                });
            }
            Script::Reply { tokens, gap } => (tokens, gap),
        };
        self.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(self.open.clone());
        Ok(Box::pin(async_stream::stream! {
            let _guard = guard;
            for i in 0..tokens {
                tokio::time::sleep(gap).await;
                yield Ok(LlmEvent::Delta(format!("w{i} ")));
            }
            yield Ok(LlmEvent::Usage(Usage { prompt_tokens: 3, completion_tokens: tokens as u32 }));
            yield Ok(LlmEvent::Finish(FinishReason::Stop));
        }))
    }

    async fn check(&self) -> Result<(), LlmError> {
        Ok(())
    }
}

/// A session manager over the scripted provider, and what a test looks at afterwards.
pub(crate) struct Harness {
    pub(crate) manager: ConnectionManager,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) write_stop: CancellationToken,
    pub(crate) write_tasks: TaskTracker,
    pub(crate) write_behind: WriteBehind,
    pub(crate) memory: Arc<dyn MemoryStore>,
    pub(crate) open: Arc<AtomicUsize>,
}

pub(crate) struct Setup {
    pub(crate) scripts: Vec<Script>,
    pub(crate) idle: Duration,
    pub(crate) queue_capacity: usize,
    pub(crate) max_attempts: u32,
    /// The store write-behind and prompt assembly use; in-process when `None`.
    pub(crate) context: Option<Arc<dyn ContextCache>>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            scripts: vec![Script::Reply {
                tokens: 3,
                gap: Duration::from_millis(10),
            }],
            idle: Duration::from_secs(600),
            queue_capacity: 64,
            max_attempts: 3,
            context: None,
        }
    }
}

pub(crate) fn harness(setup: Setup) -> Harness {
    let open = Arc::new(AtomicUsize::new(0));
    let provider = Scripted {
        scripts: Mutex::new(setup.scripts.into()),
        open: open.clone(),
    };
    let chat = TaskSpec {
        name: "chat".into(),
        description: "scripted".into(),
        primary: ModelRef {
            provider: ProviderKind::Openai,
            model: "scripted".into(),
            params: Params::default(),
        },
        fallbacks: Vec::new(),
        params: Params::default(),
    };
    let long = Duration::from_secs(3600);
    let llm = Llm::new(
        vec![Arc::new(provider)],
        vec![chat],
        ProviderKind::Openai,
        LlmTimeouts {
            connect: long,
            first_token: long,
            idle: long,
            total: long,
        },
        RetryPolicy {
            max_retries: 0,
            base: Duration::from_millis(10),
            max_wait: Duration::from_secs(1),
        },
    );
    let context = setup.context.unwrap_or_else(|| {
        Arc::new(InProcessContextCache::new(ContextLimits {
            session_ttl: long,
            user_session_ttl: long,
            max_messages: 100,
        }))
    });
    let memory: Arc<dyn MemoryStore> = Arc::new(InProcessMemoryStore::new(
        Arc::new(OfflineEmbedder::new(16)),
        MemoryLimits {
            max_text_bytes: 10_000,
            list_max: 100,
        },
        10_000,
    ));
    let (write_stop, write_tasks) = (CancellationToken::new(), TaskTracker::new());
    let write_behind = WriteBehind::start(
        WriteBehindConfig {
            workers: 1,
            // One record at a time, so that a test can fill the queue behind a record that retries.
            concurrency: 1,
            queue_capacity: setup.queue_capacity,
            max_attempts: setup.max_attempts,
            retry_base: Duration::from_millis(100),
            memory_max_bytes: 10_000,
        },
        context.clone(),
        memory.clone(),
        &write_tasks,
        write_stop.clone(),
    );
    let shutdown = CancellationToken::new();
    let deps = Deps {
        llm: Arc::new(llm),
        personas: Arc::new(Personas::new(Vec::new())),
        context,
        memory: memory.clone(),
        notes: Arc::new(InProcessNotesStore::new(100)),
        write_behind: write_behind.clone(),
        limits: Arc::new(SessionLimits {
            max_sessions: 10,
            idle_timeout: setup.idle,
            log_events: 1_000,
            client_queue: 1_000,
            max_queued_turns: 4,
            max_text_chars: 1_000,
            max_actions: 5,
            notes_max_turns: 20,
            ended_kept: 10,
            prompt: PromptLimits {
                context_messages: 10,
                memories: 3,
                min_similarity: 0.0,
                fetch_timeout: Duration::from_millis(50),
                query_max_bytes: 1_000,
            },
        }),
        stats: Arc::new(Stats::default()),
        shutdown: shutdown.clone(),
    };
    let tasks = TaskTracker::new();
    Harness {
        manager: ConnectionManager::new(deps, tasks.clone()),
        shutdown,
        tasks,
        write_stop,
        write_tasks,
        write_behind,
        memory,
        open,
    }
}

impl Harness {
    pub(crate) fn session(&self) -> (SessionHandle, Subscription) {
        let handle = self.manager.create("u", "c", TransportKind::Http).unwrap();
        let sub = handle.subscribe(Some(0));
        (handle, sub)
    }

    /// The ordered shutdown of startup.rs: sessions end, then write-behind drains.
    pub(crate) async fn stop(self) -> (WriteBehind, Arc<dyn MemoryStore>) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.write_stop.cancel();
        self.write_tasks.close();
        self.write_tasks.wait().await;
        (self.write_behind, self.memory)
    }
}

impl Harness {
    /// A live session whose first `session` event is logged: what the transports' tests attach to.
    pub(crate) async fn live(&self, transport: TransportKind) -> SessionHandle {
        let handle = self.manager.create("u", "c", transport).unwrap();
        while handle.log.bounds().0 == 0 {
            tokio::task::yield_now().await;
        }
        handle
    }
}
