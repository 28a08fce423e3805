//! Commands for a session owned by another node: sent as a JSON request on the owner's node
//! channel, answered on the sender's. A request nobody receives (the owner is gone) or that goes
//! unanswered within the forward timeout fails as `unavailable`; the caller then looks at the
//! lease again (and may take the session over).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fred::interfaces::PubsubInterface;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use super::{Cluster, lock};
use crate::error::Error;
use crate::session::TurnMode;
use crate::session::event::JobUpdate;
use crate::session::manager::SessionHandle;

/// A command as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WireCommand {
    /// A user turn; answered with its number.
    UserMessage {
        /// The text.
        text: String,
        /// Queue or interrupt.
        mode: TurnMode,
        /// The client's id of the message.
        client_id: Option<String>,
    },
    /// Cancel the current reply; answered with whether one ran.
    Cancel,
    /// End the session; answered with the outcome.
    End {
        /// Generate notes first.
        generate_notes: bool,
    },
    /// End once idle.
    EndWhenIdle,
    /// The session's state.
    Info,
    /// A job's progress, for the session's log.
    Job {
        /// What the job did.
        update: JobUpdate,
    },
}

/// An error as it travels: enough to rebuild the typed error on the other side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    /// The error's code.
    pub code: String,
    /// Its message.
    pub message: String,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        WireError {
            code: e.code().to_owned(),
            message: e.to_string(),
        }
    }
}

impl WireError {
    /// The typed error (codes this layer produces map back to their variant).
    pub fn into_error(self, max_queued_turns: usize) -> Error {
        match self.code.as_str() {
            "not_found" => Error::NotFound("session".to_owned()),
            "session_ended" => Error::SessionEnded,
            "turn_queue_full" => Error::QueueFull {
                max: max_queued_turns,
            },
            "empty_text" => Error::bad_request("empty_text", self.message),
            "text_too_long" => Error::bad_request("text_too_long", self.message),
            _ => Error::Unavailable(self.message),
        }
    }
}

/// A reply's payload.
pub type WireResult = Result<Value, WireError>;

/// What travels on a node channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeMessage {
    /// A command for a session this node owns.
    Request {
        /// Request id (the sender's).
        id: u64,
        /// The sender's node id.
        from: String,
        /// The session.
        session_id: String,
        /// The command.
        command: WireCommand,
    },
    /// The answer to a request this node sent.
    Reply {
        /// The request's id.
        id: u64,
        /// The answer.
        result: WireResult,
    },
}

fn unavailable(why: &str) -> Error {
    Error::Unavailable(format!("the session's node {why}; try again"))
}

impl Cluster {
    /// Sends `command` to `owner` and waits for its answer.
    pub(crate) async fn forward(
        &self,
        owner: &str,
        session_id: &str,
        command: WireCommand,
    ) -> Result<Value, Error> {
        self.stats.forwarded.inc();
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let message = NodeMessage::Request {
            id,
            from: self.node_id().to_owned(),
            session_id: session_id.to_owned(),
            command,
        };
        // Ending with notes waits for an LLM call on the owner: give it the time a provider may take.
        let wait = match &message {
            NodeMessage::Request {
                command: WireCommand::End { generate_notes: true },
                ..
            } => self.settings.end_timeout.max(self.settings.forward_timeout),
            _ => self.settings.forward_timeout,
        };
        let result = self.send_and_wait(owner, &message, rx, wait).await;
        lock(&self.pending).remove(&id);
        if result.is_err() {
            self.stats.forward_failures.inc();
        }
        result
    }

    async fn send_and_wait(
        &self,
        owner: &str,
        message: &NodeMessage,
        rx: oneshot::Receiver<WireResult>,
        wait: std::time::Duration,
    ) -> Result<Value, Error> {
        let payload = serde_json::to_string(message).map_err(|e| Error::Internal(e.into()))?;
        let receivers: i64 = self
            .store
            .pool()
            .next()
            .publish(self.node_channel(owner), payload)
            .await
            .map_err(|_| unavailable("cannot be reached through Redis"))?;
        if receivers == 0 {
            return Err(unavailable("does not answer"));
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err(e.into_error(0)),
            Ok(Err(_)) | Err(_) => Err(unavailable("did not answer in time")),
        }
    }

    /// Hands a reply to the request waiting for it.
    pub(crate) fn on_reply(&self, id: u64, result: WireResult) {
        if let Some(tx) = lock(&self.pending).remove(&id) {
            let _ = tx.send(result);
        }
    }

    /// Answers a request on `from`'s channel.
    pub(crate) async fn reply(&self, from: &str, id: u64, result: WireResult) {
        let message = NodeMessage::Reply { id, result };
        let Ok(payload) = serde_json::to_string(&message) else {
            return;
        };
        if let Err(e) = self
            .store
            .pool()
            .next()
            .publish::<i64, _, _>(self.node_channel(from), payload)
            .await
        {
            tracing::warn!(to = from, error = %e, "cannot send a forwarded command's reply");
        }
    }
}

/// Runs a forwarded command on a session this node owns.
pub(crate) async fn serve(
    cluster: &Arc<Cluster>,
    session: Option<SessionHandle>,
    command: WireCommand,
) -> WireResult {
    cluster.stats.served.inc();
    let Some(session) = session else {
        return Err(WireError::from(&Error::Unavailable(
            "the session moved to another node".to_owned(),
        )));
    };
    let result = match command {
        WireCommand::UserMessage {
            text,
            mode,
            client_id,
        } => session
            .user_message(text, mode, client_id)
            .await
            .map(|n| json(&n)),
        WireCommand::Cancel => session.cancel().await.map(|c| json(&c)),
        WireCommand::End { generate_notes } => session.end(generate_notes).await.map(|o| json(&o)),
        WireCommand::EndWhenIdle => session.end_when_idle().await.map(|()| Value::Null),
        WireCommand::Info => session.info().await.map(|i| json(&i)),
        WireCommand::Job { update } => session.job_update(update).await.map(|()| Value::Null),
    };
    result.map_err(|e| WireError::from(&e))
}

fn json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}
