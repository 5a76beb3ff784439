//! Logs, traces and metrics. Logs are `tracing` events with structured fields (text or JSON);
//! traces go to an OTLP/HTTP collector when one is configured; metrics are recorded through the
//! `metrics` facade and rendered by `/metrics` in Prometheus format.
//!
//! Metric names follow `stone_<noun>_<unit>[_total]` with low-cardinality labels.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

/// Latency buckets in seconds, from 50 µs to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
];

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus handle, installing the recorder on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    METRICS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests embedding several services); the
        // handle still renders what this recorder saw, and the first install wins.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// The value of an unlabelled sample (a counter, a gauge, or a summary's `_count`/`_sum`) as
/// this process's recorder renders it now; `None` when nothing was recorded under that name.
/// For benchmarks and tests that run a service in-process and want to read what it counted.
pub fn sample(name: &str) -> Option<f64> {
    metrics_handle().render().lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Keeps the trace exporter alive; flushes it on drop.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. Call once per process, from `main`, before anything logs.
pub fn init(config: &TelemetryConfig, service_name: &'static str) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_new(&config.log)?;
    let format_layer = match config.log_format {
        // Logs go to stderr so that commands whose output is data (`stone tail`) keep stdout clean.
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(true).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };

    let mut guard = TelemetryGuard::default();
    let otel_layer = if config.otlp_endpoint.is_empty() {
        None
    } else {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(config.otlp_endpoint.clone())
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.trace_sample_ratio))))
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service_name).build())
            .build();
        let tracer = provider.tracer(service_name);
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        guard.tracer_provider = Some(provider);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    };

    tracing_subscriber::registry().with(filter).with(format_layer).with(otel_layer).try_init()?;
    metrics_handle();
    Ok(guard)
}
