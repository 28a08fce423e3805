//! Tracing subscriber set-up: human-readable lines by default, JSON lines with
//! `COACHD_LOG_FORMAT=json`, filtered by `COACHD_LOG` (or `DEBUG`).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, Settings};

/// Installs the global subscriber. A second call (tests build many apps) is a harmless no-op.
pub fn init(settings: &Settings) {
    // The filter was validated when the settings were read; fall back to `info` regardless.
    let filter = EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match settings.log_format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer().with_target(true)).try_init(),
    };
    // Err only means a subscriber is already installed.
    let _ = result;
}
