//! Prompt assembly for one turn: the coach persona, the top-k memories of this user with this
//! coach, and the recent context. Within a session the session task's own turns are the context
//! (never a read of what write-behind may not have stored yet); a session without turns starts
//! from the user–coach context in the ContextCache, so it picks up where the last one left off.
//! Storage failures degrade the prompt (logged) instead of failing the turn: a reply without
//! memories beats no reply.

use std::time::Duration;

use tracing::Instrument as _;

use crate::context::{ContextCache, ContextMessage};
use crate::llm::{Message, Role};
use crate::memory::MemoryStore;

use super::Persona;

/// How much context and memory a prompt takes.
#[derive(Debug, Clone, Copy)]
pub struct PromptLimits {
    /// Recent messages.
    pub context_messages: usize,
    /// Memories.
    pub memories: usize,
    /// Least similarity of a memory worth mentioning.
    pub min_similarity: f32,
    /// Longest wait for context and memories before going on without them.
    pub fetch_timeout: Duration,
    /// Longest memory search query the store takes (`COACHD_MEMORY_MAX_TEXT_BYTES`).
    pub query_max_bytes: usize,
}

/// A prompt ready for the provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The system prompt (persona + memories).
    pub system: String,
    /// Recent context plus the user's message.
    pub messages: Vec<Message>,
    /// How many memories were included.
    pub memories_used: usize,
}

/// Who and where the turn is.
#[derive(Debug, Clone, Copy)]
pub struct TurnScope<'a> {
    /// Session.
    pub session_id: &'a str,
    /// User.
    pub user_id: &'a str,
    /// Coach.
    pub coach_id: &'a str,
}

/// Builds the prompt of a turn. `history` is the session's own recent turns, oldest first.
pub async fn assemble(
    context: &dyn ContextCache,
    memory: &dyn MemoryStore,
    persona: &Persona,
    scope: TurnScope<'_>,
    history: Vec<Message>,
    user_text: &str,
    limits: PromptLimits,
) -> Prompt {
    let have_history = !history.is_empty();
    let recent = async {
        if have_history || limits.context_messages == 0 {
            return Ok(Vec::new());
        }
        let session = context
            .recent_messages(scope.session_id, limits.context_messages)
            .await?;
        if !session.is_empty() {
            return Ok(session);
        }
        context
            .user_coach_context(scope.user_id, scope.coach_id, limits.context_messages)
            .await
    };
    let query = crate::persist::clip(user_text, limits.query_max_bytes);
    // A child of the caller's span (a turn's `prompt.assemble`), for the trace.
    let memories = memory
        .search_similar(
            scope.user_id,
            scope.coach_id,
            query,
            limits.memories + 4,
            limits.min_similarity,
        )
        .instrument(tracing::info_span!(
            "memory.search",
            k = (limits.memories + 4) as i64
        ));
    let (recent, memories) = tokio::join!(
        tokio::time::timeout(limits.fetch_timeout, recent),
        tokio::time::timeout(limits.fetch_timeout, memories),
    );
    let recent: Vec<ContextMessage> = match recent {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, session_id = scope.session_id, "context unavailable; prompting without it");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(
                session_id = scope.session_id,
                "context fetch timed out; prompting without it"
            );
            Vec::new()
        }
    };
    let memories = match memories {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, session_id = scope.session_id, "memory unavailable; prompting without it");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(
                session_id = scope.session_id,
                "memory search timed out; prompting without it"
            );
            Vec::new()
        }
    };
    // Turns of this session are already in the recent context; memories should add older ones.
    let memories: Vec<_> = memories
        .into_iter()
        .filter(|m| m.memory.metadata["session_id"].as_str() != Some(scope.session_id))
        .take(limits.memories)
        .collect();

    let mut system = persona.system_prompt.clone();
    if !memories.is_empty() {
        system.push_str(
            "\n\nWhat you remember from earlier conversations with this client (most relevant first):",
        );
        for m in &memories {
            system.push_str("\n- ");
            system.push_str(&m.memory.text.replace('\n', " / "));
        }
    }
    let from_cache = recent.into_iter().filter(|m| !m.content.is_empty()).map(|m| {
        let role = match m.role.as_str() {
            "assistant" => Role::Assistant,
            "system" => Role::System,
            _ => Role::User,
        };
        Message::new(role, m.content)
    });
    let mut messages: Vec<Message> = if have_history {
        history
    } else {
        from_cache.collect()
    };
    let keep = limits.context_messages;
    if messages.len() > keep {
        messages.drain(..messages.len() - keep);
    }
    messages.push(Message::user(user_text));
    Prompt {
        system,
        messages,
        memories_used: memories.len(),
    }
}
