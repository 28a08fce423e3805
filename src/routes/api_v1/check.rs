//! The input checks every LLM route shares (`/api/v1/*` and `/v1/chat/completions`): text
//! fields, sampling parameters and conversations, against the configured limits.

use crate::config::Settings;
use crate::error::Error;
use crate::llm::{Message, Params};

/// Stop sequences per request: the most OpenAI accepts, so every provider takes the request.
const MAX_STOP_SEQUENCES: usize = 4;

fn too_long(field: &str, max: usize) -> Error {
    Error::bad_request(
        "text_too_long",
        format!("{field} is longer than {max} characters"),
    )
}

/// Checks a text field: not blank, within the configured length.
pub(crate) fn check_text(field: &str, text: &str, s: &Settings) -> Result<(), Error> {
    if text.trim().is_empty() {
        return Err(Error::bad_request(
            "invalid_field",
            format!("{field} must not be empty"),
        ));
    }
    if text.chars().count() > s.api_max_text_chars {
        return Err(too_long(field, s.api_max_text_chars));
    }
    Ok(())
}

/// Checks request parameters against the ranges every provider accepts and the configured cap.
pub(crate) fn check_params(params: &Params, s: &Settings) -> Result<(), Error> {
    let bad = |message: String| Err(Error::bad_request("invalid_field", message));
    if params.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return bad("temperature must be between 0 and 2".to_owned());
    }
    if params.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return bad("top_p must be between 0 and 1".to_owned());
    }
    if params
        .max_tokens
        .is_some_and(|m| m == 0 || m > s.api_max_output_tokens)
    {
        return bad(format!(
            "max_tokens must be between 1 and {}",
            s.api_max_output_tokens
        ));
    }
    if params.stop.len() > MAX_STOP_SEQUENCES || params.stop.iter().any(String::is_empty) {
        return bad(format!(
            "stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences"
        ));
    }
    Ok(())
}

/// Checks a conversation: not too many messages, each within the text limit.
pub(crate) fn check_messages(messages: &[Message], s: &Settings) -> Result<(), Error> {
    if messages.len() > s.api_max_messages {
        return Err(Error::bad_request(
            "too_many_messages",
            format!("at most {} messages are accepted", s.api_max_messages),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        check_text(&format!("messages[{i}].content"), &m.content, s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_checked() {
        let s = Settings::for_tests(&[]).unwrap();
        let p = |t: f64| Params {
            temperature: Some(t),
            ..Params::default()
        };
        assert!(check_params(&p(0.7), &s).is_ok());
        assert!(check_params(&p(3.0), &s).is_err());
        let big = Params {
            max_tokens: Some(s.api_max_output_tokens + 1),
            ..Params::default()
        };
        assert!(check_params(&big, &s).is_err());
    }
}
