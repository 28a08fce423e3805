//! Tracing subscriber set-up: human-readable lines by default, JSON lines with
//! `COACHD_LOG_FORMAT=json`, filtered by `COACHD_LOG` (or `DEBUG`); and, when an OTLP endpoint is
//! set (`OTEL_EXPORTER_OTLP_ENDPOINT`), OpenTelemetry traces of coachd's own spans, exported in
//! batches over OTLP/HTTP protobuf and flushed by [`shutdown`]. JSON lines written inside a traced
//! span carry its `trace_id` and `span_id`, so a log line leads to its trace.
//!
//! The span tree of a turn (names are the README's contract):
//! `turn` → `prompt.assemble` → `memory.search`; `turn` → `llm.call` (event `first_token`);
//! `write_behind`, written later by another task, is parented under the turn through its span
//! context (not a tracing parent, which would keep the turn open until the write ends).

use std::sync::Mutex;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Event, Level, Subscriber};
use tracing_opentelemetry::OtelData;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, fmt, prelude::*};

use crate::config::{LogFormat, Settings, TracesSettings};

/// The tracer provider while traces are on; taken by [`shutdown`], which flushes it once.
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// The traces exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP traces exporter: {0}")]
pub struct TelemetryError(String);

/// Installs the global subscriber, and the OTLP exporter when the settings name an endpoint. A
/// second call (tests build many apps) installs nothing.
///
/// Call it outside the async runtime: the exporter's blocking HTTP client must not be made (or
/// dropped) on a runtime thread.
pub fn init(settings: &Settings) -> Result<(), TelemetryError> {
    // The filter was validated when the settings were read; fall back to `info` regardless.
    let filter = EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = settings
        .traces
        .endpoint
        .as_deref()
        .map(|url| provider(url, &settings.traces))
        .transpose()?;
    // coachd's own spans only, whatever COACHD_LOG says: the log filter is for log lines, and
    // `COACHD_LOG=warn` must not empty the traces. Each layer has its own filter for that.
    // Context activation and busy/idle timings are off: both do work on every enter of a span,
    // and the request span of a streaming response is entered once per event sent.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("coachd"))
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_threads(false)
            .with_filter(Targets::new().with_target("coachd", Level::INFO))
    });
    let registry = tracing_subscriber::registry().with(otel);
    let result = match settings.log_format {
        LogFormat::Json => {
            let format = fmt::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false);
            registry
                .with(
                    fmt::layer()
                        .fmt_fields(JsonFields::new())
                        .event_format(WithTraceId(format))
                        .with_filter(filter),
                )
                .try_init()
        }
        LogFormat::Text => registry
            .with(fmt::layer().with_target(true).with_filter(filter))
            .try_init(),
    };
    // Err only means a subscriber is already installed; an unused provider just drops.
    if let (Ok(()), Some(p)) = (result, provider) {
        tracing::info!(
            service_name = %settings.traces.service_name,
            "traces: exporting over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT)"
        );
        if let Ok(mut slot) = PROVIDER.lock() {
            *slot = Some(p);
        }
    }
    Ok(())
}

fn provider(url: &str, traces: &TracesSettings) -> Result<SdkTracerProvider, TelemetryError> {
    // Headers, timeout and compression come from the standard OTEL_EXPORTER_OTLP_* variables,
    // which the exporter reads itself.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(traces.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Exports the spans still buffered and stops the exporter; a no-op when traces are off or
/// already shut down. It blocks (up to the SDK's export timeout): call it off the runtime's
/// worker threads, as the end of the application's run does (start-up calls it last).
pub fn shutdown() {
    let provider = PROVIDER.lock().ok().and_then(|mut slot| slot.take());
    if let Some(p) = provider
        && let Err(e) = p.shutdown()
    {
        tracing::warn!(error = %e, "traces: the last spans could not be exported");
    }
}

/// The JSON line of the stock formatter, with `trace_id` and `span_id` first when the event lies
/// in a traced span: those of the innermost span whose trace context is built (a span's is
/// built once it has a child or its context is asked for; a turn's always is).
struct WithTraceId(Format<Json>);

impl<S, N> FormatEvent<S, N> for WithTraceId
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let ids = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| {
                let ext = span.extensions();
                let data = ext.get::<OtelData>()?;
                Some((data.trace_id()?, data.span_id()?))
            })
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}
