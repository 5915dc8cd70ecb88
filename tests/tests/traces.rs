//! A message's path as traces show it, through a real OpenTelemetry
//! Collector: the platform's Go producer starts a trace and carries it in the
//! message's `traceparent` property; mqplug's span for the reward granter is
//! its child, and the context goes on into the granter's request to the
//! rewards service (header) and its follow-up message (property), which the
//! platform's Go consumer continues. Without `[traces]` the context passes
//! through unchanged.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mqplug::Host;
use mqplug::config::{PluginConfig, TracesConfig};
use mqplug::topic::TopicName;
use mqplug_tests::broker::BrokerKind;
use mqplug_tests::collector::{CollectedSpan, Collector};
use mqplug_tests::peers::{GoConsumer, GoSent, go_produce};
use mqplug_tests::rewards::RewardsService;
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event_with};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);
const GRANTED: &str = "marketing.reward.granted";
const GO_GROUP: &str = "reward-announcer";
/// Events the Go producer sends.
const N: usize = 3;

/// The tracer provider is the process's: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// OTLP's span kinds.
const CLIENT: i64 = 3;
const PRODUCER: i64 = 4;
const CONSUMER: i64 = 5;
/// OTLP's error status.
const ERROR: i64 = 2;

/// The parts of a W3C `traceparent`: trace id and parent span id.
fn parts(traceparent: &str) -> (String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "a traceparent: {traceparent:?}");
    (fields[1].to_string(), fields[2].to_string())
}

/// The broker, the rewards service and the Go consumer of the follow-ups,
/// with the reward granter in a host whose `[traces]` is `traces`.
struct Stage {
    broker: LocalBroker,
    rewards: RewardsService,
    recorder: Recorder,
    host: Host,
    announcer: GoConsumer,
    _secrets: tempfile::TempDir,
}

impl Stage {
    async fn start(traces: Option<TracesConfig>, collector: &Collector) -> Result<Stage> {
        // The platform's clients on the platform's broker.
        let broker = LocalBroker::start_kind(BrokerKind::Java)?;
        let rewards = RewardsService::start("s3cret-token")?;
        let secrets = tempfile::tempdir()?;
        let granter = rewards.granter_config(
            plugin_path("reward-granter")?,
            "s3cret-token",
            secrets.path(),
            GRANTED,
        )?;
        let mut config = host_config(&broker, "marketing.task.completed", vec![granter]);
        config.traces = traces;
        // The follow-up topic exists before the Go consumer looks it up.
        let wire = TopicName::new(GRANTED)?.wire().to_string();
        let broker_addr = broker.broker_addr.clone();
        broker.mqadmin("updateTopic", &["-b", &broker_addr, "-t", &wire])?;
        let recorder = Recorder::new();
        let host = Host::start(&config, recorder.observers()).await?;
        let (name_server, otlp) = (broker.name_server.clone(), collector.address());
        let announcer = tokio::task::spawn_blocking(move || {
            GoConsumer::start_with(&name_server, &wire, GO_GROUP, &["-raw", "-otlp", &otlp])
        })
        .await??;
        Ok(Stage {
            broker,
            rewards,
            recorder,
            host,
            announcer,
            _secrets: secrets,
        })
    }

    /// Sends `N` events from the Go producer, which traces each send, and
    /// waits until the Go consumer got each one's follow-up.
    async fn go_events_announced(&self, collector: &Collector) -> Result<Vec<GoSent>> {
        let (name_server, otlp) = (self.broker.name_server.clone(), collector.address());
        let sent = tokio::task::spawn_blocking(move || {
            go_produce(
                &name_server,
                &["-batch", "plain", "-count", &N.to_string(), "-otlp", &otlp],
            )
        })
        .await??;
        ensure!(sent.len() == N, "the Go producer sent {}", sent.len());
        let all = self.announcer.wait_until(WAIT, |lines| {
            lines
                .iter()
                .filter(|line| line.get("msg_id").is_some())
                .count()
                >= N
        });
        ensure!(
            all,
            "the Go consumer got {} follow-ups of {N}:\n{}",
            self.announcer.deliveries().len(),
            self.broker.logs()
        );
        Ok(sent)
    }

    async fn stop(mut self) -> Result<()> {
        self.host.shutdown().await;
        tokio::task::spawn_blocking(move || self.announcer.stop()).await?
    }
}

fn one<'a>(
    spans: &'a [CollectedSpan],
    what: &str,
    test: impl Fn(&CollectedSpan) -> bool,
) -> Result<&'a CollectedSpan> {
    let found: Vec<&CollectedSpan> = spans.iter().filter(|span| test(span)).collect();
    ensure!(
        found.len() == 1,
        "{} spans for {what} (1 expected) among:\n{spans:#?}",
        found.len()
    );
    Ok(found[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_go_producer_through_the_plugin_its_request_and_its_follow_up_to_the_go_consumer()
-> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let collector = Collector::start()?;
    let traces = TracesConfig {
        endpoint: collector.endpoint(),
        service_name: "mqplug".into(),
    };
    let stage = Stage::start(Some(traces), &collector).await?;
    let sent = stage.go_events_announced(&collector).await?;
    // And one event from mqplug's own producer, with no context, that the
    // granter dead-letters.
    let publisher = stage.host.publisher().context("the producer is enabled")?;
    let poison = publisher
        .publish(&mqplug_tests::rewards::bad_count_event())
        .await?
        .message_id;
    let poisoned = stage
        .recorder
        .wait_until(WAIT, |r| r.handled().iter().any(|h| h.message_id == poison));
    let grants = stage.rewards.grants();
    let announced = stage.announcer.deliveries();
    // Shutting down exports what the host still holds.
    stage.stop().await?;
    ensure!(poisoned, "the poison event was not handled");

    let trace_ids: Vec<String> = sent
        .iter()
        .map(|go| parts(go.traceparent.as_deref().expect("the producer traced")).0)
        .collect();
    // Each trace: the Go send, mqplug's process, its POST, its send, and the
    // Go consumer's process.
    let spans = collector.wait_for(WAIT, |spans| {
        trace_ids
            .iter()
            .all(|id| spans.iter().filter(|span| &span.trace_id == id).count() >= 5)
            && spans
                .iter()
                .any(|span| span.attribute("messaging.message.id") == Some(&poison))
    })?;

    for (go, trace_id) in sent.iter().zip(&trace_ids) {
        let trace: Vec<CollectedSpan> = spans
            .iter()
            .filter(|span| &span.trace_id == trace_id)
            .cloned()
            .collect();
        let send = one(&trace, "the Go producer's send", |span| {
            span.service == "task-producer" && span.parent_span_id.is_empty()
        })?;
        assert_eq!(send.kind, PRODUCER);

        let process = one(&trace, "mqplug's process", |span| {
            span.service == "mqplug" && span.kind == CONSUMER
        })?;
        assert_eq!(process.parent_span_id, send.span_id, "a child of the send");
        assert_eq!(process.name, "process marketing_task_completed");
        for (key, value) in [
            ("messaging.system", "rocketmq"),
            ("messaging.operation.type", "process"),
            ("messaging.destination.name", "marketing_task_completed"),
            ("messaging.consumer.group.name", "mqplug-reward-granter"),
            ("messaging.message.id", go.msg_id.as_str()),
            ("mqplug.plugin.name", "reward-granter"),
            ("mqplug.outcome", "success"),
        ] {
            assert_eq!(process.attribute(key), Some(value), "{key} of {process:#?}");
        }
        let version = process
            .attribute("mqplug.plugin.version")
            .unwrap_or_default();
        assert_eq!(version.len(), 64, "the build's SHA-256: {process:#?}");
        assert_ne!(process.status_code, ERROR);

        let request = one(&trace, "the granter's request", |span| span.kind == CLIENT)?;
        assert_eq!(request.parent_span_id, process.span_id);
        assert_eq!(request.attribute("http.request.method"), Some("POST"));
        assert_eq!(request.attribute("http.response.status_code"), Some("201"));
        let grant = grants
            .iter()
            .find(|grant| grant.idempotency_key == go.msg_id)
            .with_context(|| format!("no grant for {}", go.msg_id))?;
        let header = grant
            .traceparent
            .as_deref()
            .context("the request had no traceparent")?;
        assert_eq!(
            parts(header),
            (trace_id.clone(), request.span_id.clone()),
            "the rewards service saw the request span's context"
        );

        let follow_up = one(&trace, "the granter's follow-up", |span| {
            span.service == "mqplug" && span.kind == PRODUCER
        })?;
        assert_eq!(follow_up.parent_span_id, process.span_id);
        assert_eq!(follow_up.name, "send marketing_reward_granted");
        let delivered = announced
            .iter()
            .find(|line| {
                line["traceparent"].as_str().map(|tp| parts(tp).0).as_ref() == Some(trace_id)
            })
            .with_context(|| format!("no follow-up in trace {trace_id}: {announced:#?}"))?;
        assert_eq!(
            parts(delivered["traceparent"].as_str().unwrap_or_default()).1,
            follow_up.span_id,
            "the follow-up carries its send span's context"
        );
        let next = one(&trace, "the Go consumer's process", |span| {
            span.service == "task-consumer"
        })?;
        assert_eq!(next.parent_span_id, follow_up.span_id);
    }

    // A message with no context starts its own trace; its failure shows.
    let dead = one(&spans, "the poison event", |span| {
        span.attribute("messaging.message.id") == Some(&poison)
    })?;
    assert!(dead.parent_span_id.is_empty(), "{dead:#?}");
    assert_eq!(dead.attribute("mqplug.outcome"), Some("dead_letter"));
    assert_eq!(dead.status_code, ERROR);
    assert!(dead.status_message.contains("dead letter"), "{dead:#?}");
    // The Collector's own account of the first trace (its debug exporter),
    // and with MQPLUG_SCREENSHOT=docs/trace.png a picture of it.
    // Its debug exporter writes apart from its file exporter: wait for it.
    let names = [
        "send marketing_task_completed",
        "process marketing_task_completed",
        "POST",
        "send marketing_reward_granted",
        "process marketing_reward_granted",
    ];
    let shows_all = |view: &str| {
        names
            .iter()
            .all(|name| view.contains(&format!("Name           : {name}")))
    };
    let deadline = std::time::Instant::now() + WAIT;
    let mut view = collector.debug_view(&trace_ids[0]);
    while !shows_all(&view) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        view = collector.debug_view(&trace_ids[0]);
    }
    assert!(shows_all(&view), "{names:?} in:\n{view}");
    if let Some(path) = std::env::var_os("MQPLUG_SCREENSHOT") {
        std::fs::write(&path, mqplug_tests::browser::picture_of_text(&view)?)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_traces_configured_the_context_passes_through_unchanged() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let collector = Collector::start()?;
    let stage = Stage::start(None, &collector).await?;
    let sent = stage.go_events_announced(&collector).await?;
    let grants = stage.rewards.grants();
    let announced = stage.announcer.deliveries();
    stage.stop().await?;

    for go in &sent {
        let traceparent = go.traceparent.as_deref().expect("the producer traced");
        let grant = grants
            .iter()
            .find(|grant| grant.idempotency_key == go.msg_id)
            .with_context(|| format!("no grant for {}", go.msg_id))?;
        assert_eq!(grant.traceparent.as_deref(), Some(traceparent), "unchanged");
        assert!(
            announced
                .iter()
                .any(|line: &Value| line["traceparent"] == traceparent),
            "the follow-up carries {traceparent}: {announced:#?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_no_message() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    mqplug_tests::host_log("warn");
    // A port nothing listens on: every export is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let mut config = host_config(
        &broker,
        "traces_down_topic",
        vec![PluginConfig::new("logger", plugin_path("reward-logger")?)],
    );
    config.traces = Some(TracesConfig {
        endpoint: format!("http://{closed}"),
        service_name: "mqplug".into(),
    });
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let mut ids = Vec::new();
    for user in 0..20 {
        ids.push(
            publisher
                .publish(&sample_event_with(
                    "USER_REGISTER",
                    user,
                    serde_json::json!({}),
                ))
                .await?
                .message_id,
        );
    }
    let all = recorder.wait_until(WAIT, |r| {
        ids.iter().all(|id| r.handled_message("logger", id))
    });
    host.shutdown().await;
    ensure!(all, "not every event was handled:\n{}", broker.logs());
    for handled in recorder.handled_by("logger") {
        assert_eq!(
            handled.outcome,
            mqplug::DeliveryOutcome::ConsumeSuccess,
            "{handled:?}"
        );
    }
    // What is lost is said (the exporter's own words, through `tracing`).
    let log = mqplug_tests::host_log("warn");
    assert!(log.contains("BatchSpanProcessor.ExportError"), "{log}");
    Ok(())
}
