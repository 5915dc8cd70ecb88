//! Traces: an OpenTelemetry span for each message each plugin handles.
//!
//! A message's trace context is the W3C `traceparent` (and `tracestate`) in
//! its properties, which a producer sets from Go with
//! `msg.WithProperty("traceparent", ...)` or OpenTelemetry's propagator. The
//! plugin's span is that context's child, and the context goes on from it:
//! into the plugin's outbound HTTP requests as headers (a client span each)
//! and into its follow-up messages' properties (a send span each). One trace
//! then runs producer -> mqplug -> the rewards service -> the next consumer.
//!
//! Spans are exported over OTLP/HTTP only when `[traces]` is configured
//! ([`Traces::start`]). Without it nothing is recorded, and a message's
//! context passes through unchanged, so a trace the platform started still
//! reaches the services the plugin calls.
//!
//! The context a message carries is untrusted: only a well-formed
//! `traceparent` is read (W3C's own parser), and what goes on into headers
//! and properties is written from the parsed context, never copied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};

use crate::delivery::Delivery;
use crate::outcome::DeliveryOutcome;
use crate::text::inert;

/// The message property (and HTTP header) with the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The message property (and HTTP header) with the W3C trace state.
pub const TRACESTATE: &str = "tracestate";

/// A `traceparent` is 55 characters; anything much longer is not read.
const MAX_TRACEPARENT_BYTES: usize = 128;
/// W3C asks carriers to keep at least 512 characters of `tracestate`.
const MAX_TRACESTATE_BYTES: usize = 512;
/// Ids, topics and URLs on a span are cut like in a log line.
const MAX_ATTRIBUTE_BYTES: usize = 512;
/// A failure's cause on a span's status.
const MAX_STATUS_BYTES: usize = 1024;

/// The name the host's spans are recorded under.
const TRACER: &str = "mqplug";

/// Whether a [`Traces`] exporter is installed: without one no span is built
/// (its attributes cost a message something), the context only passes on.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Which [`Traces`] installed the exporter: one that stops after another
/// started leaves the newer one in place.
static INSTALLED: AtomicU64 = AtomicU64::new(0);

/// A W3C trace context as a message's properties or a request's headers
/// carry it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub parent: Option<String>,
    pub state: Option<String>,
}

impl TraceContext {
    /// The context a message's properties carry: `traceparent` and
    /// `tracestate`, each dropped when longer than W3C allows.
    pub fn from_properties<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        let bounded = |name: &str, max: usize| {
            get(name)
                .filter(|value| value.len() <= max)
                .map(str::to_string)
        };
        TraceContext {
            parent: bounded(TRACEPARENT, MAX_TRACEPARENT_BYTES),
            state: bounded(TRACESTATE, MAX_TRACESTATE_BYTES),
        }
    }

    /// The parsed context, or the empty one when `traceparent` is missing
    /// or malformed.
    fn extract(&self) -> Context {
        if self.parent.is_none() {
            return Context::new();
        }
        let mut carrier = HashMap::with_capacity(2);
        for (name, value) in [(TRACEPARENT, &self.parent), (TRACESTATE, &self.state)] {
            if let Some(value) = value {
                carrier.insert(name.to_string(), value.clone());
            }
        }
        TraceContextPropagator::new().extract(&carrier)
    }

    /// What to carry on for `cx`: nothing when it has no valid span.
    fn inject(cx: &Context) -> Self {
        // Allocates only when there is a context to write.
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
        TraceContext {
            parent: carrier.remove(TRACEPARENT),
            // The parser lets control characters through in a member's
            // value; W3C allows only printable ASCII.
            state: carrier.remove(TRACESTATE).filter(|state| {
                !state.is_empty() && state.bytes().all(|b| (0x20..=0x7e).contains(&b))
            }),
        }
    }

    /// The headers or properties to set, as (name, value) pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [(TRACEPARENT, &self.parent), (TRACESTATE, &self.state)]
            .into_iter()
            .filter_map(|(name, value)| value.as_deref().map(|value| (name, value)))
    }
}

/// The exporter, while `[traces]` is configured: installed as the process's
/// tracer provider until [`Traces::shutdown`].
pub struct Traces {
    provider: Option<SdkTracerProvider>,
    generation: u64,
}

/// Why traces could not be exported.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {reason}")]
pub struct TracesError {
    endpoint: String,
    reason: String,
}

impl Traces {
    /// Exports every span from now on to the OTLP/HTTP `endpoint` (a
    /// collector's base URL, such as `http://127.0.0.1:4318`, to which
    /// `/v1/traces` is added; or the full URL), as `service_name`.
    pub fn start(endpoint: &str, service_name: &str) -> Result<Traces, TracesError> {
        let url = traces_url(endpoint);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url.clone())
            .with_timeout(Duration::from_secs(10))
            .with_headers(HashMap::new())
            .build()
            .map_err(|err| TracesError {
                endpoint: url,
                reason: err.to_string(),
            })?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_string())
                    .build(),
            )
            .build();
        global::set_tracer_provider(provider.clone());
        let generation = INSTALLED.fetch_add(1, Ordering::AcqRel) + 1;
        EXPORTING.store(true, Ordering::Release);
        Ok(Traces {
            provider: Some(provider),
            generation,
        })
    }

    /// Sends what is recorded and stops exporting.
    pub fn shutdown(mut self) {
        self.uninstall();
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!("traces: the last spans may not have been exported: {err}");
        }
    }

    /// No longer the process's exporter, unless another started since.
    fn uninstall(&self) {
        if INSTALLED
            .compare_exchange(self.generation, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            EXPORTING.store(false, Ordering::Release);
            global::set_tracer_provider(opentelemetry::trace::noop::NoopTracerProvider::new());
        }
    }
}

impl Drop for Traces {
    /// Dropped without [`Traces::shutdown`] (a host that failed to start):
    /// uninstalled, and the provider's own stop (which waits for its last
    /// export) runs on a thread of its own, not the dropping one.
    fn drop(&mut self) {
        self.uninstall();
        if let Some(provider) = self.provider.take() {
            let _ = std::thread::Builder::new()
                .name("mqplug-traces-stop".into())
                .spawn(move || drop(provider));
        }
    }
}

/// `endpoint` with the OTLP/HTTP traces path, unless it has a path already.
fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest);
    if after_scheme.contains('/') {
        trimmed.to_string()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

fn bounded(text: &str) -> String {
    inert(text, MAX_ATTRIBUTE_BYTES).into_owned()
}

/// A span in progress and its context.
struct Open {
    cx: Context,
}

impl Open {
    /// A span named `name()` under `parent`, when spans are exported; else
    /// the parent itself, carried on unchanged.
    fn start(
        parent: Context,
        name: impl FnOnce() -> String,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        if !EXPORTING.load(Ordering::Acquire) {
            return Open { cx: parent };
        }
        let tracer = global::tracer_provider().tracer(TRACER);
        let span = tracer
            .span_builder(name())
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(&tracer, &parent);
        Open {
            cx: parent.with_span(span),
        }
    }

    /// The context to carry on: this span's when it is recorded; else the
    /// parent's, unchanged (no tracer configured, or not sampled).
    fn carried(&self) -> TraceContext {
        TraceContext::inject(&self.cx)
    }

    /// Ends the span with `attributes` and, if `error`, an error status;
    /// nothing for a context carried on unchanged.
    fn end(&self, attributes: impl FnOnce() -> Vec<KeyValue>, error: Option<&str>) {
        let span = self.cx.span();
        if !span.is_recording() {
            return;
        }
        span.set_attributes(attributes());
        if let Some(error) = error {
            span.set_status(Status::error(inert(error, MAX_STATUS_BYTES).into_owned()));
        }
        span.end();
    }
}

impl Drop for Open {
    /// A span not ended by then was cut short (a follow-up not sent within
    /// its budget, a request dropped at the deadline): it ends as an error,
    /// not as a success.
    fn drop(&mut self) {
        let span = self.cx.span();
        if span.is_recording() {
            span.set_status(Status::error("cancelled: it did not finish"));
            span.end();
        }
    }
}

/// The span of one message handled by one plugin (`process <topic>`).
pub struct ProcessSpan {
    open: Open,
    /// The delivery the handler sees: the message's own, with the context
    /// set to this span's.
    delivery: Option<Delivery>,
}

impl ProcessSpan {
    /// Starts the span of `plugin` (consuming in `group`) handling
    /// `delivery`, whose body is `body_bytes` long.
    pub fn start(
        plugin: &str,
        group: Option<&str>,
        delivery: &Delivery,
        body_bytes: usize,
    ) -> Self {
        let parent = delivery.trace.extract();
        let attributes = || {
            let mut attributes = vec![
                KeyValue::new("messaging.system", "rocketmq"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.operation.name", "process"),
                KeyValue::new("messaging.destination.name", bounded(&delivery.topic)),
                KeyValue::new("messaging.message.id", bounded(&delivery.message_id)),
                KeyValue::new(
                    "messaging.destination.partition.id",
                    delivery.queue_id.to_string(),
                ),
                KeyValue::new("messaging.message.body.size", body_bytes as i64),
                KeyValue::new("messaging.rocketmq.consumption_model", "clustering"),
                KeyValue::new("mqplug.plugin.name", plugin.to_string()),
                KeyValue::new(
                    "mqplug.delivery.reconsume_times",
                    i64::from(delivery.reconsume_times),
                ),
            ];
            if let Some(group) = group {
                attributes.push(KeyValue::new(
                    "messaging.consumer.group.name",
                    group.to_string(),
                ));
            }
            if let Some(tags) = &delivery.tags {
                attributes.push(KeyValue::new(
                    "messaging.rocketmq.message.tag",
                    bounded(tags),
                ));
            }
            if !delivery.keys.is_empty() {
                let keys: Vec<opentelemetry::StringValue> = delivery
                    .keys
                    .iter()
                    .take(16)
                    .map(|key| bounded(key).into())
                    .collect();
                attributes.push(KeyValue::new(
                    "messaging.rocketmq.message.keys",
                    opentelemetry::Value::Array(keys.into()),
                ));
            }
            attributes
        };
        let name = || format!("process {}", bounded(&delivery.topic));
        let open = Open::start(parent, name, SpanKind::Consumer, attributes);
        let carried = open.carried();
        let delivery = (carried != delivery.trace).then(|| Delivery {
            trace: carried,
            ..delivery.clone()
        });
        ProcessSpan { open, delivery }
    }

    /// The delivery to hand to the handler and to the follow-ups' sender:
    /// `original`, with this span's context when it is recorded.
    pub fn delivery<'a>(&'a self, original: &'a Delivery) -> &'a Delivery {
        self.delivery.as_ref().unwrap_or(original)
    }

    /// Ends the span with the build that handled the message and the
    /// outcome (an error status with `cause` unless it succeeded).
    pub fn end(&self, version: Option<&str>, outcome: DeliveryOutcome, cause: Option<&str>) {
        let attributes = || {
            let mut attributes = vec![KeyValue::new("mqplug.outcome", outcome.as_str())];
            if let Some(version) = version {
                attributes.push(KeyValue::new("mqplug.plugin.version", version.to_string()));
            }
            attributes
        };
        let error =
            (outcome != DeliveryOutcome::ConsumeSuccess).then(|| cause.unwrap_or(outcome.as_str()));
        self.open.end(attributes, error);
    }
}

/// The client span of one outbound HTTP request a plugin makes.
pub struct HttpSpan {
    open: Open,
}

impl HttpSpan {
    /// Starts the span of a `method` request to `url` (already stripped of
    /// what must not be shown) at `host`:`port`, under `parent`, the
    /// handled message's context.
    pub fn start(
        parent: &TraceContext,
        plugin: &str,
        method: &str,
        url: &str,
        host: &str,
        port: u16,
    ) -> Self {
        let attributes = || {
            vec![
                KeyValue::new("http.request.method", bounded(method)),
                KeyValue::new("url.full", bounded(url)),
                KeyValue::new("server.address", bounded(host)),
                KeyValue::new("server.port", i64::from(port)),
                KeyValue::new("mqplug.plugin.name", plugin.to_string()),
            ]
        };
        HttpSpan {
            open: Open::start(
                parent.extract(),
                || bounded(method),
                SpanKind::Client,
                attributes,
            ),
        }
    }

    /// The `traceparent` and `tracestate` headers to send.
    pub fn headers(&self) -> TraceContext {
        self.open.carried()
    }

    /// Ends the span with the response's status, or why there was none.
    pub fn end(self, result: Result<u16, &str>) {
        match result {
            Ok(status) => self.open.end(
                || {
                    vec![KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    )]
                },
                (status >= 500).then_some("server error"),
            ),
            Err(error) => self.open.end(
                || vec![KeyValue::new("error.type", "request failed")],
                Some(error),
            ),
        }
    }
}

/// The producer span of one follow-up message a plugin published.
pub struct SendSpan {
    open: Open,
}

impl SendSpan {
    /// Starts the span of sending the follow-up `message_id` to `topic`
    /// under `parent`, the handled message's context.
    pub fn start(parent: &TraceContext, plugin: &str, topic: &str, message_id: &str) -> Self {
        let attributes = || {
            vec![
                KeyValue::new("messaging.system", "rocketmq"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "send"),
                KeyValue::new("messaging.destination.name", bounded(topic)),
                KeyValue::new("messaging.message.id", bounded(message_id)),
                KeyValue::new("mqplug.plugin.name", plugin.to_string()),
            ]
        };
        SendSpan {
            open: Open::start(
                parent.extract(),
                || format!("send {}", bounded(topic)),
                SpanKind::Producer,
                attributes,
            ),
        }
    }

    /// The `traceparent` and `tracestate` properties the message carries.
    pub fn properties(&self) -> TraceContext {
        self.open.carried()
    }

    pub fn end(self, error: Option<&str>) {
        self.open.end(Vec::new, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn context(parent: &str) -> TraceContext {
        TraceContext {
            parent: Some(parent.to_string()),
            state: Some("rojo=00f067aa0ba902b7".to_string()),
        }
    }

    #[test]
    fn without_a_tracer_a_message_context_passes_through_unchanged() {
        let delivery = Delivery {
            trace: context(PARENT),
            ..Delivery::default()
        };
        let span = ProcessSpan::start("p", Some("g"), &delivery, 10);
        assert_eq!(span.delivery(&delivery).trace, delivery.trace);
        let http = HttpSpan::start(&delivery.trace, "p", "POST", "http://a/", "a", 80);
        assert_eq!(http.headers(), delivery.trace);
        http.end(Ok(200));
        span.end(None, DeliveryOutcome::ConsumeSuccess, None);
    }

    #[test]
    fn a_malformed_or_oversized_context_is_not_carried_on() {
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nX-Evil: 1",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let http = HttpSpan::start(&context(bad), "p", "GET", "http://a/", "a", 80);
            assert_eq!(http.headers(), TraceContext::default(), "{bad:?}");
        }
        // A trace state with a control character in a member's value (which
        // the parser lets through) is not carried on; the parent still is.
        let mut escaped = context(PARENT);
        escaped.state = Some("rojo=00f0\u{1b}[31m,x=\r\nEvil".to_string());
        let http = HttpSpan::start(&escaped, "p", "GET", "http://a/", "a", 80);
        assert_eq!(http.headers().parent.as_deref(), Some(PARENT));
        assert_eq!(http.headers().state, None);
        let long = format!("{PARENT}{}", "0".repeat(200));
        let read = TraceContext::from_properties(|name| (name == TRACEPARENT).then_some(&*long));
        assert_eq!(read, TraceContext::default());
        let read = TraceContext::from_properties(|name| (name == TRACEPARENT).then_some(PARENT));
        let http = HttpSpan::start(&read, "p", "GET", "http://a/", "a", 80);
        assert_eq!(http.headers().parent.as_deref(), Some(PARENT));
    }

    #[test]
    fn an_endpoint_without_a_path_gets_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.internal/custom/traces"),
            "https://otel.internal/custom/traces"
        );
    }
}
