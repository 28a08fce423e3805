//! The `.env` reader (`config::parse_dotenv`, dotenvy under the message coachd logs) and the
//! settings built from what it reads. Checks: no panic; a syntax error's message names at most a
//! variable (a key of the `.env` grammar), never a value or the rest of the file, since those
//! hold API keys; and `Settings::from_source` over the variables read never panics.
#![no_main]

use std::collections::HashMap;

use coachd::config::{Settings, parse_dotenv};
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "cannot read .env: syntax error in the line of ";
const SUFFIX: &str = " (check its quoting)";

fn is_key(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

fuzz_target!(|data: &[u8]| {
    match parse_dotenv(data) {
        Ok(pairs) => {
            // As `load_dotenv` applies them: the first of a name wins.
            let mut vars: HashMap<String, String> = HashMap::new();
            for (k, v) in pairs {
                vars.entry(k).or_insert(v);
            }
            let _ = Settings::from_source(&vars);
        }
        Err(message) => {
            if let Some(rest) = message.strip_prefix(PREFIX) {
                let name = rest.strip_suffix(SUFFIX).expect("the message's fixed end");
                assert!(is_key(name), "the message quotes more than a name: {message:?}");
            } else {
                // An I/O error: a reader over memory has none but bad UTF-8.
                assert!(message.starts_with("cannot read .env: "), "{message}");
            }
        }
    }
});
