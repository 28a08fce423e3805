//! The traces section: OpenTelemetry over OTLP/HTTP, read from the standard `OTEL_*` variables
//! so any collector set-up works unchanged. Off unless an OTLP endpoint is set.

use url::Url;

use super::ConfigError;
use super::source::{Reader, Source, invalid};

/// Where and as whom traces are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracesSettings {
    /// The full URL spans are posted to (`…/v1/traces`); `None` keeps tracing off, with no
    /// exporter and no span processor.
    pub endpoint: Option<String>,
    /// `OTEL_SERVICE_NAME`, `coachd` by default.
    pub service_name: String,
}

/// The only protocol compiled in: OTLP/HTTP with protobuf bodies (no gRPC stack).
const PROTOCOL: &str = "http/protobuf";

/// Reads the section. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is used as it is; otherwise
/// `OTEL_EXPORTER_OTLP_ENDPOINT` gets `/v1/traces` appended, as the OTLP specification says.
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn tracing off whatever is set.
pub(super) fn read<S: Source>(r: &Reader<'_, S>) -> Result<TracesSettings, ConfigError> {
    let service_name = r.string("OTEL_SERVICE_NAME", "coachd");
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = r.raw(var)
            && p != PROTOCOL
        {
            return Err(invalid(
                var,
                "http/protobuf (coachd exports over OTLP/HTTP; gRPC and JSON are not built in)",
                Some(p),
            ));
        }
    }
    let disabled = r.boolean("OTEL_SDK_DISABLED", false)?;
    let exporter = r.string("OTEL_TRACES_EXPORTER", "otlp").to_ascii_lowercase();
    if exporter != "otlp" && exporter != "none" {
        return Err(invalid("OTEL_TRACES_EXPORTER", "otlp or none", Some(exporter)));
    }
    let endpoint = match (
        r.raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        r.raw("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(url), _) => Some(checked("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)?),
        (None, Some(base)) => {
            let base = checked("OTEL_EXPORTER_OTLP_ENDPOINT", base)?;
            Some(format!("{}/v1/traces", base.trim_end_matches('/')))
        }
        (None, None) => None,
    };
    Ok(TracesSettings {
        endpoint: endpoint.filter(|_| !disabled && exporter == "otlp"),
        service_name,
    })
}

/// An http(s) URL with a host. Never echoed: collector URLs may carry credentials.
fn checked(var: &str, raw: String) -> Result<String, ConfigError> {
    let expected = "an http or https URL such as http://localhost:4318";
    let url = Url::parse(&raw).map_err(|_| invalid(var, expected, None))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(var, expected, None));
    }
    Ok(raw)
}
