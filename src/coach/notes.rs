//! Session notes (summary, key points, action items): generated through `generate_json` on task
//! `session_summary` with a JSON schema, and kept in PostgreSQL (or in process without a
//! database) so they can be read again.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::StoreError;
use crate::llm::{Llm, LlmError};

/// One action item of session notes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionItem {
    /// What to do.
    pub task: String,
    /// Who does it (usually the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// When, as the model phrased it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<String>,
    /// `high`, `medium` or `low`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
}

/// Notes of a session or transcript: what the `notes` event and the notes routes carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notes {
    /// A few sentences.
    pub summary: String,
    /// The main points discussed.
    pub key_points: Vec<String>,
    /// What the client committed to.
    pub action_items: Vec<ActionItem>,
}

/// The JSON schema the model's notes must match.
pub fn schema() -> Value {
    json!({
        "type": "object",
        "required": ["summary", "key_points", "action_items"],
        "properties": {
            "summary": {"type": "string", "minLength": 1},
            "key_points": {"type": "array", "items": {"type": "string"}},
            "action_items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["task"],
                    "properties": {
                        "task": {"type": "string", "minLength": 1},
                        "owner": {"type": ["string", "null"]},
                        "due": {"type": ["string", "null"]},
                        "priority": {"type": ["string", "null"], "enum": ["high", "medium", "low", null]}
                    }
                }
            }
        }
    })
}

/// Asks the `session_summary` task for notes on a transcript.
pub async fn generate(llm: &Llm, coach_name: &str, transcript: &str) -> Result<Notes, LlmError> {
    let system = format!(
        "You write concise coaching session notes for the coach {coach_name}. Summarise in 2-4 sentences, \
         list the key points discussed, and list every action item the client committed to or was advised \
         to take, with an owner, a due date and a priority where the conversation gives them."
    );
    let prompt = format!("Write the notes for this coaching conversation.\n\nTranscript:\n{transcript}");
    let value = llm
        .generate_json("session_summary", &prompt, Some(&system), Some(&schema()))
        .await?;
    serde_json::from_value(value).map_err(|e| LlmError::InvalidJson {
        message: e.to_string(),
    })
}

/// Notes as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredNotes {
    /// Notes id.
    pub id: Uuid,
    /// The session they summarise, if any.
    pub session_id: Option<String>,
    /// User.
    pub user_id: String,
    /// Coach.
    pub coach_id: String,
    /// The notes.
    #[serde(flatten)]
    pub notes: Notes,
    /// When they were made.
    pub created_at: DateTime<Utc>,
}

/// Where notes are kept.
#[async_trait::async_trait]
pub trait NotesStore: Send + Sync + std::fmt::Debug {
    /// Saves notes and returns them as stored.
    async fn save(
        &self,
        session_id: Option<&str>,
        user_id: &str,
        coach_id: &str,
        notes: Notes,
    ) -> Result<StoredNotes, StoreError>;

    /// The latest notes of a user, newest first.
    async fn for_user(&self, user_id: &str, limit: usize) -> Result<Vec<StoredNotes>, StoreError>;
}

/// Notes in PostgreSQL (`session_notes`).
#[derive(Debug, Clone)]
pub struct PgNotesStore {
    pool: PgPool,
}

impl PgNotesStore {
    /// A store on the pool.
    pub fn new(pool: PgPool) -> Self {
        PgNotesStore { pool }
    }
}

fn db_error(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable {
        backend: "postgresql",
        reason: e.to_string(),
    }
}

#[async_trait::async_trait]
impl NotesStore for PgNotesStore {
    async fn save(
        &self,
        session_id: Option<&str>,
        user_id: &str,
        coach_id: &str,
        notes: Notes,
    ) -> Result<StoredNotes, StoreError> {
        let id = Uuid::now_v7();
        let created_at: DateTime<Utc> = sqlx::query_scalar(
            "insert into session_notes (id, session_id, user_id, coach_id, summary, key_points, action_items) \
             values ($1, $2, $3, $4, $5, $6, $7) returning created_at",
        )
        .bind(id)
        .bind(session_id)
        .bind(user_id)
        .bind(coach_id)
        .bind(&notes.summary)
        .bind(sqlx::types::Json(&notes.key_points))
        .bind(sqlx::types::Json(&notes.action_items))
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(StoredNotes {
            id,
            session_id: session_id.map(str::to_owned),
            user_id: user_id.to_owned(),
            coach_id: coach_id.to_owned(),
            notes,
            created_at,
        })
    }

    async fn for_user(&self, user_id: &str, limit: usize) -> Result<Vec<StoredNotes>, StoreError> {
        type Row = (
            Uuid,
            Option<String>,
            String,
            String,
            String,
            sqlx::types::Json<Vec<String>>,
            sqlx::types::Json<Vec<ActionItem>>,
            DateTime<Utc>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "select id, session_id, user_id, coach_id, summary, key_points, action_items, created_at \
             from session_notes where user_id = $1 order by created_at desc limit $2",
        )
        .bind(user_id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(
                |(id, session_id, user_id, coach_id, summary, key_points, action_items, created_at)| {
                    StoredNotes {
                        id,
                        session_id,
                        user_id,
                        coach_id,
                        notes: Notes {
                            summary,
                            key_points: key_points.0,
                            action_items: action_items.0,
                        },
                        created_at,
                    }
                },
            )
            .collect())
    }
}

/// Notes in process memory (no database configured), newest last, capped.
#[derive(Debug)]
pub struct InProcessNotesStore {
    notes: Mutex<Vec<StoredNotes>>,
    cap: usize,
}

impl InProcessNotesStore {
    /// A store keeping at most `cap` notes (the oldest go first).
    pub fn new(cap: usize) -> Self {
        InProcessNotesStore {
            notes: Mutex::new(Vec::new()),
            cap: cap.max(1),
        }
    }
}

#[async_trait::async_trait]
impl NotesStore for InProcessNotesStore {
    async fn save(
        &self,
        session_id: Option<&str>,
        user_id: &str,
        coach_id: &str,
        notes: Notes,
    ) -> Result<StoredNotes, StoreError> {
        let stored = StoredNotes {
            id: Uuid::now_v7(),
            session_id: session_id.map(str::to_owned),
            user_id: user_id.to_owned(),
            coach_id: coach_id.to_owned(),
            notes,
            created_at: Utc::now(),
        };
        let mut all = self
            .notes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if all.len() == self.cap {
            all.remove(0);
        }
        all.push(stored.clone());
        Ok(stored)
    }

    async fn for_user(&self, user_id: &str, limit: usize) -> Result<Vec<StoredNotes>, StoreError> {
        let all = self
            .notes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(all
            .iter()
            .rev()
            .filter(|n| n.user_id == user_id)
            .take(limit)
            .cloned()
            .collect())
    }
}
