//! Tracing set-up: logs on stderr, human-readable or, with `CALLAPI_LOG_FORMAT=json`, one JSON
//! object per line (for a log collector), filtered by `RUST_LOG` (default `info`); and traces,
//! exported by OTLP over HTTP when the standard `OTEL_*` variables ask for them
//! ([`traces_wanted`]), their context carried from service to service in NATS message headers
//! (W3C `traceparent`: [`inject_current`], [`follow`], [`link`]).
//!
//! Some libraries print credentials below INFO: async-nats its server URLs (with any user
//! information) at DEBUG and its `CONNECT` message (with the password or token) at TRACE;
//! hyper-util its connection-pool key, the MI URL's authority with its `user:password@`, at
//! DEBUG. So when `RUST_LOG` turns on DEBUG or TRACE for everything, these ([`QUIET_TARGETS`])
//! stay at INFO, unless `RUST_LOG` names them itself.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

/// The filter used when `RUST_LOG` is unset, empty or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// Log targets kept at INFO when `RUST_LOG` asks for more on everything: they log credentials.
pub const QUIET_TARGETS: &[&str] = &["async_nats", "hyper_util", "hyper"];

/// Whether spans are exported (set once by [`init`]); trace context is carried only then.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// What [`init`] set up. Dropping it sends the spans not exported yet and stops the exporter:
/// drop it outside the async runtime (the exporter's HTTP client blocks).
#[must_use = "dropping it stops the trace exporter"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Bounded: a collector that is down must not hold the process past its grace.
            let _ = provider.shutdown_with_timeout(std::time::Duration::from_secs(3));
        }
    }
}

/// Installs the global tracing subscriber (logs, and traces when [`traces_wanted`]); later
/// calls install nothing. Call it outside the async runtime.
pub fn init(service: &str) -> Telemetry {
    let asked = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(filter_directives(asked.as_deref()))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = std::env::var("CALLAPI_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let (provider, trace_error) = if traces_wanted(|name| std::env::var(name).ok()) {
        match tracer_provider(service) {
            Ok(provider) => (Some(provider), None),
            Err(err) => (None, Some(err)),
        }
    } else {
        (None, None)
    };
    // Spans are exported at INFO whatever RUST_LOG keeps of the logs.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("callapi"))
            .with_tracked_inactivity(false)
            .with_filter(LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    tracing::info!(
        service,
        version = env!("CARGO_PKG_VERSION"),
        traces = if provider.is_some() { "otlp" } else { "off" },
        "starting"
    );
    if let Some(err) = trace_error {
        tracing::error!(%err, "traces are not exported: the OTLP exporter could not be made");
    }
    Telemetry { provider }
}

/// Whether the `OTEL_*` variables (read through `var`) ask for traces: not when
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`; yes when `OTEL_TRACES_EXPORTER=otlp`
/// or an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
/// set.
pub fn traces_wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| {
        var(name)
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
    };
    if set("OTEL_SDK_DISABLED").as_deref() == Some("true") {
        return false;
    }
    match set("OTEL_TRACES_EXPORTER").as_deref() {
        Some("none") => false,
        Some("otlp") => true,
        _ => {
            set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        }
    }
}

/// The OTLP/HTTP exporter and its provider: endpoint, headers, timeout from the `OTEL_*`
/// variables (the exporter reads them), the protocol `http/protobuf` unless
/// `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` is `http/json`; the service name from
/// `OTEL_SERVICE_NAME`, else `service`; batching (`OTEL_BSP_*`) and sampling
/// (`OTEL_TRACES_SAMPLER`) as the SDK reads them.
fn tracer_provider(service: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    let protocol = match protocol.trim() {
        "http/json" => Protocol::HttpJson,
        "" | "http/protobuf" => Protocol::HttpBinary,
        other => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not supported: use http/protobuf (port 4318) or http/json"
            ));
        }
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |name| name.trim().is_empty()) {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Turns on carrying trace context for a subscriber the caller installed itself with a
/// tracing-opentelemetry layer (tests with an in-memory exporter); [`init`] does it for the
/// services.
pub fn start_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether spans are exported by this process.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Adds the current span's trace context (`traceparent`, `tracestate`) to `headers`; nothing
/// when spans are not exported. Returns whether it added it.
pub fn inject_current(headers: &mut async_nats::HeaderMap) -> bool {
    if !exporting() {
        return false;
    }
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    true
}

/// The current span's trace context as NATS headers, or `None` (spans not exported, or no span).
pub fn current_headers() -> Option<async_nats::HeaderMap> {
    let mut headers = async_nats::HeaderMap::new();
    inject_current(&mut headers).then_some(headers)
}

fn extract(headers: &async_nats::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Makes `span` a child of the trace context in `headers` (a message from another service),
/// if they carry one, and records its trace id in the span's `trace_id` field (so the logs in
/// it name the trace).
pub fn follow(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if !exporting() {
        return;
    }
    if let Some(headers) = headers {
        let parent = extract(headers);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records the trace id of `span` in its `trace_id` field (declared `tracing::field::Empty`).
pub fn record_trace_id(span: &tracing::Span) {
    if !exporting() {
        return;
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Links `span` to the trace context in `headers` (e.g. the OpenSIPS event that drove a
/// command's step, published by event-ingest in a trace of its own).
pub fn link(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if !exporting() {
        return;
    }
    if let Some(headers) = headers {
        let linked = extract(headers);
        let linked = linked.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
}

/// The filter directives for `RUST_LOG` = `asked`: `asked` itself (or [`DEFAULT_FILTER`]),
/// plus `TARGET=info` for each of [`QUIET_TARGETS`] it does not name, when its default level
/// is DEBUG or TRACE.
pub fn filter_directives(asked: Option<&str>) -> String {
    let asked = asked
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_FILTER);
    let directives: Vec<&str> = asked.split(',').map(str::trim).collect();
    let default_level = directives
        .iter()
        .filter_map(|directive| directive.parse::<LevelFilter>().ok())
        .max()
        .unwrap_or(LevelFilter::OFF);
    if default_level <= LevelFilter::INFO {
        return asked.to_owned();
    }
    let mut out = asked.to_owned();
    for quiet in QUIET_TARGETS {
        let named = directives.iter().any(|directive| {
            let target = directive
                .split(['=', '['])
                .next()
                .unwrap_or_default()
                .trim();
            target == *quiet
                || target
                    .strip_prefix(quiet)
                    .is_some_and(|rest| rest.starts_with("::"))
        });
        if !named {
            out.push_str(&format!(",{quiet}=info"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[test]
    fn libraries_that_log_credentials_stay_at_info_unless_named() {
        const QUIET: &str = "async_nats=info,hyper_util=info,hyper=info";
        assert_eq!(filter_directives(None), "info");
        assert_eq!(filter_directives(Some("  ")), "info");
        assert_eq!(filter_directives(Some("debug")), format!("debug,{QUIET}"));
        assert_eq!(filter_directives(Some("TRACE")), format!("TRACE,{QUIET}"));
        assert_eq!(
            filter_directives(Some("gateway=trace,debug")),
            format!("gateway=trace,debug,{QUIET}")
        );
        assert_eq!(filter_directives(Some("warn")), "warn");
        assert_eq!(filter_directives(Some("gateway=debug")), "gateway=debug");
        assert_eq!(
            filter_directives(Some("debug,async_nats=debug")),
            "debug,async_nats=debug,hyper_util=info,hyper=info"
        );
        assert_eq!(
            filter_directives(Some("debug,hyper_util::client=trace")),
            "debug,hyper_util::client=trace,async_nats=info,hyper=info"
        );
        assert_eq!(
            filter_directives(Some("debug,hyper=debug,async_nats[conn]=trace")),
            "debug,hyper=debug,async_nats[conn]=trace,hyper_util=info"
        );
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn debug_for_everything_still_hides_credential_logging_libraries() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter_directives(Some("debug"))))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "async_nats::connector", "password: Some(\"s3cretpw\")");
            tracing::debug!(target: "hyper_util::client::legacy::pool", "admin:hunter2@h");
            tracing::info!(target: "async_nats", "event: connected");
            tracing::debug!(target: "gateway", "ours at debug");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("s3cretpw"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("event: connected"), "{text}");
        assert!(text.contains("ours at debug"), "{text}");
    }
}
