//! The routing function: one call's retries, fallbacks and wait for the first token, all under
//! the call's total deadline, in an `async fn` that returns the model that serves and its stream
//! (already read up to its first text), or the typed error of the whole call.

use std::time::Duration;

use futures::StreamExt;
use rand::Rng;

use super::metered::Metered;
use super::{Llm, ModelRef};
use crate::llm::ProviderKind;
use crate::llm::error::{Attempt, TimeoutPhase};
use crate::llm::timeout::with_timeouts;
use crate::llm::{ChatRequest, EventStream, LlmError, LlmEvent, Message, Params, ResponseFormat};
use crate::metric::{FALLBACKS, RETRIES};

/// Retry and back-off policy of routed calls.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries of one model before falling back.
    pub max_retries: u32,
    /// First back-off delay; doubled on each retry, with ±25 % jitter.
    pub base: Duration,
    /// A provider asking to wait longer than this (retry-after) is skipped for the fallback.
    pub max_wait: Duration,
}

/// What routing chose: the model that serves and its stream, which has already read its first
/// text (or ended without any). Failures from here on end the stream; they are not retried.
pub struct Routed {
    /// Provider that serves.
    pub provider: ProviderKind,
    /// Model that serves.
    pub model: String,
    /// Its events, from the first one the provider sent.
    pub stream: EventStream,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed")
            .field("provider", &self.provider)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The parts of a routed call every attempt shares.
struct Call<'a> {
    task: &'a str,
    task_params: &'a Params,
    system: Option<String>,
    messages: Vec<Message>,
    response_format: Option<ResponseFormat>,
}

impl Llm {
    /// Routes a task's call through its models: retries and fallbacks until one model's stream
    /// yields its first text (or ends cleanly without any), all under the total deadline. Returns
    /// the model that serves and its stream, or the typed error of the whole call. `overrides`
    /// (an API request's `temperature`, `max_tokens`, ...) win over the task's and each model's
    /// own parameters. Dropping the stream aborts the upstream request.
    pub async fn route_task(
        &self,
        task: &str,
        overrides: &Params,
        system: Option<String>,
        messages: Vec<Message>,
        response_format: Option<ResponseFormat>,
    ) -> Result<Routed, LlmError> {
        let Some(spec) = self.tasks.get(task) else {
            return Err(LlmError::UnknownTask(task.to_owned()));
        };
        let chain: Vec<ModelRef> = std::iter::once(&spec.primary)
            .chain(&spec.fallbacks)
            .map(|m| ModelRef {
                params: overrides.or(&m.params),
                ..m.clone()
            })
            .collect();
        let call = Call {
            task: &spec.name,
            task_params: &spec.params,
            system,
            messages,
            response_format,
        };
        self.route_chain(chain, call).await
    }

    /// Routes a call to one model (retries, no fallback), e.g. a provider model named directly.
    pub async fn route_model(
        &self,
        model: ModelRef,
        system: Option<String>,
        messages: Vec<Message>,
        response_format: Option<ResponseFormat>,
    ) -> Result<Routed, LlmError> {
        let label = format!("{}/{}", model.provider, model.model);
        let params = Params::default();
        let call = Call {
            task: &label,
            task_params: &params,
            system,
            messages,
            response_format,
        };
        self.route_chain(vec![model], call).await
    }

    async fn route_chain(&self, chain: Vec<ModelRef>, call: Call<'_>) -> Result<Routed, LlmError> {
        let timeouts = self.timeouts;
        // The total timeout bounds the whole call, retries and fallbacks included.
        let deadline = tokio::time::Instant::now() + timeouts.total;
        let mut attempts: Vec<Attempt> = Vec::new();
        let models = chain.len();
        'models: for (index, model) in chain.into_iter().enumerate() {
            // Labels are built once per model of the call, never per token.
            let label = self.model_label(model.provider, &model.model);
            let fallback = || {
                if index + 1 < models {
                    metrics::counter!(FALLBACKS, "provider" => model.provider.as_str(), "model" => label.clone())
                        .increment(1);
                }
            };
            let Some(provider) = self.providers.get(&model.provider).cloned() else {
                attempts.push(Attempt {
                    provider: model.provider,
                    model: model.model.clone(),
                    error: LlmError::NotConfigured {
                        provider: model.provider,
                    },
                });
                fallback();
                continue;
            };
            let mut tries = 0u32;
            loop {
                if tokio::time::Instant::now() >= deadline {
                    attempts.push(Attempt {
                        provider: model.provider,
                        model: model.model.clone(),
                        error: LlmError::Timeout {
                            provider: model.provider,
                            phase: TimeoutPhase::Total,
                            after: timeouts.total,
                        },
                    });
                    break 'models;
                }
                let request = ChatRequest {
                    model: model.model.clone(),
                    system: call.system.clone(),
                    messages: call.messages.clone(),
                    params: model.params.or(call.task_params),
                    response_format: call.response_format.clone(),
                };
                let p = provider.clone();
                let timed = with_timeouts(model.provider, timeouts, deadline, async move {
                    p.stream(request).await
                });
                let mut stream: EventStream = Box::pin(Metered::new(timed, model.provider, label.clone()));
                // Read up to the first text delta: until then a failure can still be retried or
                // fallen back without the client having seen anything.
                let mut head = Vec::new();
                let failed = loop {
                    match stream.next().await {
                        Some(Ok(LlmEvent::Delta(text))) => {
                            head.push(LlmEvent::Delta(text));
                            break None;
                        }
                        Some(Ok(event)) => head.push(event),
                        Some(Err(e)) => break Some(e),
                        None => break None,
                    }
                };
                let Some(e) = failed else {
                    return Ok(Routed {
                        provider: model.provider,
                        model: model.model,
                        stream: Box::pin(futures::stream::iter(head.into_iter().map(Ok)).chain(stream)),
                    });
                };
                tries += 1;
                tracing::warn!(
                    task = %call.task, provider = %model.provider, model = %model.model,
                    attempt = tries, error = %e, "LLM attempt failed before the first token"
                );
                let wait = backoff(&self.retry, tries, &e);
                let budget_spent = matches!(
                    e,
                    LlmError::Timeout {
                        phase: TimeoutPhase::Total,
                        ..
                    }
                );
                let retry = e.retryable() && tries <= self.retry.max_retries;
                attempts.push(Attempt {
                    provider: model.provider,
                    model: model.model.clone(),
                    error: e,
                });
                if budget_spent {
                    break 'models;
                }
                match wait {
                    Some(wait) if retry => {
                        metrics::counter!(RETRIES, "provider" => model.provider.as_str(), "model" => label.clone())
                            .increment(1);
                        tokio::time::sleep_until((tokio::time::Instant::now() + wait).min(deadline)).await;
                    }
                    _ => break,
                }
            }
            fallback();
        }
        Err(LlmError::AllFailed {
            task: call.task.to_owned(),
            attempts,
        })
    }
}

/// How long to wait before retry number `tries` (1-based), or `None` when the provider asks for
/// longer than the policy allows.
fn backoff(policy: &RetryPolicy, tries: u32, error: &LlmError) -> Option<Duration> {
    let exp = policy
        .base
        .saturating_mul(1u32 << tries.saturating_sub(1).min(16));
    let jitter = rand::thread_rng().gen_range(0.75..1.25);
    let mut wait = exp.mul_f64(jitter);
    if let LlmError::RateLimited {
        retry_after: Some(after),
        ..
    } = error
    {
        if *after > policy.max_wait {
            return None;
        }
        wait = wait.max(*after);
    }
    Some(wait.min(policy.max_wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_honours_retry_after_up_to_the_cap() {
        let policy = RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(100),
            max_wait: Duration::from_secs(2),
        };
        let e = LlmError::Unavailable {
            provider: ProviderKind::Openai,
            status: Some(503),
            message: String::new(),
        };
        let w1 = backoff(&policy, 1, &e).unwrap();
        let w3 = backoff(&policy, 3, &e).unwrap();
        assert!(
            w1 >= Duration::from_millis(75) && w1 <= Duration::from_millis(125),
            "{w1:?}"
        );
        assert!(
            w3 >= Duration::from_millis(300) && w3 <= Duration::from_millis(500),
            "{w3:?}"
        );
        let limited = |secs| LlmError::RateLimited {
            provider: ProviderKind::Openai,
            retry_after: Some(Duration::from_secs(secs)),
            message: String::new(),
        };
        assert_eq!(backoff(&policy, 1, &limited(1)), Some(Duration::from_secs(1)));
        assert_eq!(
            backoff(&policy, 1, &limited(30)),
            None,
            "too long a wait goes to the fallback"
        );
    }
}
