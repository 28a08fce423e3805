//! The `analyze` job kind: a transcript or a document's text → notes (summary, key points, action
//! items, through task `session_summary` and `coach::notes`) and insights (task
//! `insight_generation`); optionally stored as notes, and as coach memories of (user, coach):
//! the text in chunks (memory type `transcript` or `document`) and each insight (`insight`), so
//! the coach recalls them in later turns.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::runner::Progress;
use super::{Job, JobError, JobInput, JobsSettings};
use crate::coach::Personas;
use crate::coach::notes::{self, NotesStore};
use crate::llm::{Llm, LlmError};
use crate::memory::{MemoryStore, NewMemory};

/// What `analyze` needs.
#[derive(Debug, Clone)]
pub struct AnalyzeDeps {
    /// The LLM gateway (tasks `session_summary`, `insight_generation`).
    pub llm: Arc<Llm>,
    /// Coach memory.
    pub memory: Arc<dyn MemoryStore>,
    /// Notes.
    pub notes: Arc<dyn NotesStore>,
    /// Personas (the coach's name in the notes prompt).
    pub personas: Arc<Personas>,
    /// Longest text sent to the model (`COACHD_MAX_TRANSCRIPT_CHARS`); longer texts are cut.
    pub max_transcript_chars: usize,
    /// Longest memory text (`COACHD_MEMORY_MAX_TEXT_BYTES`).
    pub memory_max_bytes: usize,
}

/// The options of an `analyze` job. Other names are the other steps' of its chain (the job API
/// refuses names no step reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnalyzeOptions {
    /// Store the notes (`GET /ai/coach/notes`-style records); default true.
    #[serde(default = "yes")]
    pub store_notes: bool,
    /// Store the text and the insights as coach memories; default true.
    #[serde(default = "yes")]
    pub store_memories: bool,
    /// Generate insights; default true.
    #[serde(default = "yes")]
    pub insights: bool,
    /// `transcript` or `document`: what the text is (the memory type of its chunks). Chain steps
    /// set it from the step before; default `transcript`.
    #[serde(default)]
    pub source: Option<String>,
}

fn yes() -> bool {
    true
}

impl AnalyzeOptions {
    /// Options from a job's JSON (`{}` for the defaults); the message says what is wrong.
    pub fn parse(options: &Value) -> Result<Self, String> {
        let v = if options.is_null() {
            json!({})
        } else {
            options.clone()
        };
        let o: AnalyzeOptions = serde_json::from_value(v).map_err(|e| e.to_string())?;
        if let Some(s) = &o.source
            && !matches!(s.as_str(), "transcript" | "document")
        {
            return Err(format!("source must be transcript or document, not {s:?}"));
        }
        Ok(o)
    }
}

/// An insight about the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Insight {
    /// The insight itself, one or two sentences.
    pub text: String,
    /// `goal`, `challenge`, `strength`, `pattern`, `preference` or `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

fn insights_schema() -> Value {
    json!({
        "type": "object",
        "required": ["insights"],
        "properties": {
            "insights": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {
                        "text": {"type": "string", "minLength": 1},
                        "category": {"type": ["string", "null"]}
                    }
                }
            }
        }
    })
}

async fn insights(llm: &Llm, coach_name: &str, source: &str, text: &str) -> Result<Vec<Insight>, LlmError> {
    let system = format!(
        "You are {coach_name}, a coach. From a {source} of your client, derive the insights worth remembering \
         for later sessions: goals, challenges, strengths, patterns, preferences. Each insight is one or two \
         sentences about the client, specific and grounded in the text."
    );
    let prompt = format!("Derive the insights from this {source}.\n\n{text}");
    let value = llm
        .generate_json(
            "insight_generation",
            &prompt,
            Some(&system),
            Some(&insights_schema()),
        )
        .await?;
    #[derive(Deserialize)]
    struct Reply {
        insights: Vec<Insight>,
    }
    serde_json::from_value::<Reply>(value)
        .map(|r| r.insights)
        .map_err(|e| LlmError::InvalidJson {
            message: e.to_string(),
        })
}

/// Splits `text` into chunks of at most `max_chars` characters, at paragraph, line or sentence
/// ends where it can, never inside a character.
pub fn chunk(text: &str, max_chars: usize) -> Vec<String> {
    let max_chars = max_chars.max(1);
    let mut chunks = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.chars().count() <= max_chars {
            chunks.push(rest.to_owned());
            break;
        }
        let limit = rest.char_indices().nth(max_chars).map_or(rest.len(), |(i, _)| i);
        let window = &rest[..limit];
        let cut = ["\n\n", "\n", ". ", "? ", "! ", " "]
            .iter()
            .filter_map(|sep| window.rfind(sep).map(|i| i + sep.len()))
            .find(|&i| i > limit / 2)
            .unwrap_or(limit);
        let piece = rest[..cut].trim();
        if !piece.is_empty() {
            chunks.push(piece.to_owned());
        }
        rest = rest[cut..].trim_start();
    }
    chunks
}

/// Cuts `text` to at most `max` characters.
fn truncate(text: &str, max: usize) -> &str {
    text.char_indices().nth(max).map_or(text, |(i, _)| &text[..i])
}

/// Runs an analysis of `text` for `job`; the result is the notes, the insights and what was stored.
pub async fn run(
    deps: &AnalyzeDeps,
    settings: &JobsSettings,
    job: &Job,
    input: &JobInput,
    text: &str,
    progress: &Progress,
) -> Result<Value, JobError> {
    let options =
        AnalyzeOptions::parse(&job.options).map_err(|m| JobError::permanent("invalid_options", m))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(JobError::permanent("empty_text", "there is no text to analyze"));
    }
    let source = options
        .source
        .clone()
        .or_else(|| input.source.clone())
        .unwrap_or_else(|| "transcript".to_owned());
    let coach_name = deps.personas.resolve(&job.coach_id).name.clone();
    let for_model = truncate(text, deps.max_transcript_chars);

    progress.report(0.05, "notes").await;
    let notes = notes::generate(&deps.llm, &coach_name, for_model).await?;

    let insights = if options.insights {
        progress.report(0.4, "insights").await;
        insights(&deps.llm, &coach_name, &source, for_model).await?
    } else {
        Vec::new()
    };

    progress.report(0.7, "storing").await;
    let mut notes_id = None;
    let mut stored = 0u64;
    let mut chunk_count = 0usize;
    if options.store_memories {
        // Chunks fit the memory store's byte limit: 4 bytes per character at worst.
        let max_chars = settings.memory_chunk_chars.min(deps.memory_max_bytes / 4).max(1);
        let chunks = chunk(text, max_chars);
        chunk_count = chunks.len().min(settings.max_memory_chunks);
        let mut memories: Vec<NewMemory> = chunks
            .into_iter()
            .take(settings.max_memory_chunks)
            .enumerate()
            .map(|(i, c)| NewMemory {
                dedup_key: None,
                text: c,
                user_id: job.user_id.clone(),
                coach_id: job.coach_id.clone(),
                memory_type: source.clone(),
                metadata: json!({"job_id": job.id, "chunk": i, "chunks": chunk_count}),
            })
            .collect();
        memories.extend(insights.iter().map(|i| NewMemory {
            dedup_key: None,
            text: truncate(&i.text, max_chars).to_owned(),
            user_id: job.user_id.clone(),
            coach_id: job.coach_id.clone(),
            memory_type: "insight".to_owned(),
            metadata: json!({"job_id": job.id, "category": i.category}),
        }));
        let total = memories.len().max(1);
        let mut done = 0usize;
        for batch in memories.chunks(64) {
            let outcomes = deps.memory.store_batch(batch.to_vec()).await?;
            stored += outcomes.iter().filter(|o| o.created).count() as u64;
            done += batch.len();
            progress
                .report(0.7 + 0.25 * (done as f32 / total as f32), "memories")
                .await;
        }
    }
    if options.store_notes {
        let saved = deps
            .notes
            .save(
                job.session_id.as_deref(),
                &job.user_id,
                &job.coach_id,
                notes.clone(),
            )
            .await?;
        notes_id = Some(saved.id);
    }
    Ok(json!({
        "notes": notes,
        "insights": insights,
        "notes_id": notes_id,
        "source": source,
        "chars": text.chars().count(),
        "memories": {"stored": stored, "chunks": chunk_count, "memory_type": source},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cut_at_paragraphs_and_respect_the_size() {
        let text = "First paragraph here.\n\nSecond paragraph is a little longer.\n\nThird.";
        let chunks = chunk(text, 40);
        assert_eq!(chunks[0], "First paragraph here.");
        assert!(chunks.iter().all(|c| c.chars().count() <= 40), "{chunks:?}");
        assert_eq!(
            chunks.join(" ").split_whitespace().count(),
            text.split_whitespace().count()
        );
    }

    #[test]
    fn chunks_never_split_a_character_and_handle_unbroken_text() {
        let text = "é".repeat(25);
        let chunks = chunk(&text, 10);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), text);
        assert!(chunk("  ", 10).is_empty());
    }

    #[test]
    fn options_default_and_reject_wrong_values() {
        let o = AnalyzeOptions::parse(&Value::Null).unwrap();
        assert!(o.store_notes && o.store_memories && o.insights);
        assert!(AnalyzeOptions::parse(&json!({"store_memories": "yes"})).is_err());
        assert!(AnalyzeOptions::parse(&json!({"source": "video"})).is_err());
        assert_eq!(
            AnalyzeOptions::parse(&json!({"source": "document", "insights": false}))
                .unwrap()
                .source
                .as_deref(),
            Some("document")
        );
    }
}
