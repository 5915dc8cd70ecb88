//! Throughput against a real broker on 127.0.0.1, in one run:
//! - publish rate: mqplug's `Publisher` against the raw client's sync send;
//! - backlog drain: mqplug with the no-op plugin against a plain Rust
//!   consumer with the same no-op handler (decode, then nothing) compiled in,
//!   and against the platform's own consumer (rocketmq-client-go's push
//!   consumer with its defaults and `json.Unmarshal`, tests/peers/go).
//!
//!   cargo bench -p mqplug-tests --bench broker_throughput
//!   MQPLUG_BENCH_MESSAGES=400000 MQPLUG_BENCH_ROUNDS=7 cargo bench -p mqplug-tests --bench broker_throughput
//!
//! The drain runs `MQPLUG_BENCH_ROUNDS` (default 5) rounds of each, in
//! fresh groups, rotating which goes first; it reports each
//! round, the median and the spread, and writes the rounds to
//! `target/bench-results/drain-rounds.csv` (`bench-charts` draws them).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mqplug::config::PluginConfig;
use mqplug::event::DEFAULT_MAX_BODY_BYTES;
use mqplug::mq::{ConsumeFrom, MqRuntime};
use mqplug::observe::{HostEvent, Observer, Observers};
use mqplug::topic::TopicName;
use mqplug::{Host, HostConfig, TaskEvent};
use mqplug_tests::peers::GoConsumer;
use mqplug_tests::{LocalBroker, plugins::plugin_path, sample_event};
use rocketmq_client_rust::{
    ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus, DefaultMQProducer,
    DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;

const TOPIC: &str = "bench.throughput";
const CONCURRENCY: u32 = 16;
const PUBLISH_SAMPLE: usize = 2000;
/// A drain that handles no message for this long has stalled.
const STALL: Duration = Duration::from_secs(60);

/// One synchronous send with the raw client, the message built as mqplug's
/// `Publisher` builds it.
async fn raw_send(raw: &DefaultMQProducer, topic: &TopicName, event: &TaskEvent) -> Result<()> {
    let message = Message::builder()
        .topic(topic.wire())
        .tags("USER_REGISTER")
        .keys(vec![event.key()])
        .body(event.encode())
        .build()?;
    raw.send_with_timeout(message, 3000).await?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("broker_throughput: run with `cargo bench`");
        return Ok(());
    }
    let backlog: usize = std::env::var("MQPLUG_BENCH_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let rounds: usize = std::env::var("MQPLUG_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5)
        .max(1);
    // MQPLUG_BENCH_LOG=<file>: the host's and the client's logs (RUST_LOG,
    // default info) go there.
    if let Some(file) = std::env::var_os("MQPLUG_BENCH_LOG") {
        let file = std::fs::File::create(&file).context("MQPLUG_BENCH_LOG")?;
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .init();
    }
    let broker = LocalBroker::start()?;
    let topic = TopicName::new(TOPIC)?;
    let mq = MqRuntime::new(0)?;
    let publisher = mqplug_tests::topic_publisher(&mq, &broker.name_server, &topic).await?;
    let event = sample_event("USER_REGISTER", 123);

    // Publish rate, one task each, alternating to share the machine's noise.
    let mut raw = DefaultMQProducer::builder(mq.client())
        .name_server_addr(broker.name_server.clone())
        .producer_group("bench-raw-producer")
        .retry_times_when_send_failed(2)
        .build();
    raw.start().await?;
    // A JVM broker compiles its hot paths over the first thousands of sends:
    // warm it up unmeasured, then alternate which of the two goes first
    // (ABBA), so neither gets the colder broker.
    for _ in 0..PUBLISH_SAMPLE {
        raw_send(&raw, &topic, &event).await?;
    }
    let (mut mqplug_rate, mut raw_rate) = (Vec::new(), Vec::new());
    const ROUNDS: usize = 4;
    for round in 0..ROUNDS {
        for mqplug_turn in [round % 2 == 0, round % 2 == 1] {
            let started = Instant::now();
            for _ in 0..PUBLISH_SAMPLE / ROUNDS {
                if mqplug_turn {
                    publisher.publish(&event).await?;
                } else {
                    raw_send(&raw, &topic, &event).await?;
                }
            }
            let rate = (PUBLISH_SAMPLE / ROUNDS) as f64 / started.elapsed().as_secs_f64();
            if mqplug_turn {
                mqplug_rate.push(rate);
            } else {
                raw_rate.push(rate);
            }
        }
    }
    raw.shutdown().await;
    eprintln!("publish rounds: mqplug {mqplug_rate:.0?}, raw {raw_rate:.0?}");
    let mqplug_rate = mqplug_rate.iter().sum::<f64>() / ROUNDS as f64;
    let raw_rate = raw_rate.iter().sum::<f64>() / ROUNDS as f64;

    // The rest of the backlog, 8 sends in flight.
    let publisher = Arc::new(publisher);
    // The warm-up and the measured sends are part of it.
    let remaining = backlog.saturating_sub(2 * PUBLISH_SAMPLE);
    let pipeline = mqplug::publish::Pipeline {
        concurrency: 8,
        batch: 1,
    };
    let published = mqplug::publish::publish_all(
        &publisher,
        vec![event.clone(); remaining],
        pipeline,
        |_, _| {},
    )
    .await;
    if published.failed() > 0 {
        bail!(
            "{} of {remaining} backlog events not sent",
            published.failed()
        );
    }
    Arc::into_inner(publisher)
        .context("publisher still shared")?
        .shutdown()
        .await;
    let total = (2 * PUBLISH_SAMPLE).max(backlog);
    eprintln!("backlog of {total} messages published");

    // Drain the same backlog in fresh groups, alternating which goes first
    // (ABBA), so neither always meets the warmer broker.
    let (mut native, mut hosted, mut go) = (Vec::new(), Vec::new(), Vec::new());
    let drained: Result<()> = async {
        for round in 0..rounds {
            // Three consumers, the order rotated each round.
            for turn in 0..3 {
                let which = (round + turn) % 3;
                // MQPLUG_BENCH_ONLY=native|mqplug|go: one consumer, for a profile.
                let only = std::env::var("MQPLUG_BENCH_ONLY").ok();
                if only.is_some_and(|only| only != ["native", "mqplug", "go"][which]) {
                    match which {
                        0 => native.push(f64::NAN),
                        1 => hosted.push(f64::NAN),
                        _ => go.push(f64::NAN),
                    }
                    continue;
                }
                match which {
                    0 => native.push(drain_native(&mq, &broker, &topic, round, total).await?),
                    1 => hosted.push(drain_mqplug(&broker, round, total).await?),
                    _ => go.push(drain_go(&broker, &topic, round, total).await?),
                }
            }
            eprintln!(
                "drain round {round}: mqplug {:.0} msg/s, native {:.0} msg/s, Go {:.0} msg/s; mqplug/native {:.3}, mqplug/Go {:.3}",
                hosted[round],
                native[round],
                go[round],
                hosted[round] / native[round],
                hosted[round] / go[round]
            );
        }
        Ok(())
    }
    .await;
    keep_broker_logs(&broker, drained.is_err());
    drained?;
    mq.shutdown().await;
    write_rounds(&hosted, &native, &go)?;

    let native_rate = median(&native);
    let hosted_rate = median(&hosted);
    let go_rate = median(&go);
    let ratios: Vec<f64> = hosted.iter().zip(&native).map(|(h, n)| h / n).collect();
    let go_ratios: Vec<f64> = hosted.iter().zip(&go).map(|(h, g)| h / g).collect();
    println!("| measurement | mqplug | raw client | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| publish, sync send, 1 task (msg/s) | {mqplug_rate:.0} | {raw_rate:.0} | {:.2} |",
        mqplug_rate / raw_rate
    );
    println!(
        "| drain {total} msgs, concurrency {CONCURRENCY}, median of {rounds} rounds (msg/s) | {hosted_rate:.0} | {native_rate:.0} | {:.3} |",
        hosted_rate / native_rate
    );
    println!(
        "drain spread: mqplug {:.0}-{:.0}, native {:.0}-{:.0}; per-round ratio median {:.3}, {:.3}-{:.3}",
        min(&hosted),
        max(&hosted),
        min(&native),
        max(&native),
        median(&ratios),
        min(&ratios),
        max(&ratios)
    );
    println!(
        "| drain {total} msgs, mqplug against the Go push consumer (defaults), median of {rounds} rounds (msg/s) | {hosted_rate:.0} | {go_rate:.0} (Go) | {:.3} |",
        hosted_rate / go_rate
    );
    println!(
        "Go spread: {:.0}-{:.0}; per-round mqplug/Go median {:.3}, {:.3}-{:.3}",
        min(&go),
        max(&go),
        median(&go_ratios),
        min(&go_ratios),
        max(&go_ratios)
    );
    println!("rounds: mqplug {hosted:.0?}, native {native:.0?}, Go {go:.0?}");
    Ok(())
}

/// Keeps the broker's logs in `target/bench-results/broker-logs/` (its store
/// log says whether it deleted files or refused writes); after a failed or
/// stalled drain, also prints their tails.
fn keep_broker_logs(broker: &LocalBroker, failed: bool) {
    let to = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-results/broker-logs");
    let _ = std::fs::remove_dir_all(&to);
    if let Some(parent) = to.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(broker.data_dir().join("logs"))
        .arg(&to)
        .status();
    match copied {
        Ok(status) if status.success() => eprintln!("broker logs kept in {}", to.display()),
        other => eprintln!("broker logs not kept in {}: {other:?}", to.display()),
    }
    if failed {
        eprintln!("{}", broker.logs());
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// `target/bench-results/drain-rounds.csv`: round, mqplug, native, go.
fn write_rounds(hosted: &[f64], native: &[f64], go: &[f64]) -> Result<()> {
    let dir = mqplug_tests::workspace_root().join("target/bench-results");
    std::fs::create_dir_all(&dir)?;
    let mut csv = String::from("round,mqplug,native,go\n");
    for (round, ((h, n), g)) in hosted.iter().zip(native).zip(go).enumerate() {
        csv.push_str(&format!("{},{h:.0},{n:.0},{g:.0}\n", round + 1));
    }
    std::fs::write(dir.join("drain-rounds.csv"), csv)?;
    Ok(())
}

/// Counts handled messages and notes when the first and the last arrived,
/// so the rate covers the drain itself, not the consumer's start-up.
struct DrainClock {
    total: usize,
    count: AtomicUsize,
    first: OnceLock<Instant>,
    last: OnceLock<Instant>,
}

impl DrainClock {
    fn new(total: usize) -> Arc<Self> {
        Arc::new(DrainClock {
            total,
            count: AtomicUsize::new(0),
            first: OnceLock::new(),
            last: OnceLock::new(),
        })
    }

    fn tick(&self) {
        let now = Instant::now();
        let _ = self.first.set(now);
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.total {
            let _ = self.last.set(now);
        }
    }

    /// Waits for every message; returns messages per second from the first
    /// handled to the last. Gives up when no message came for `STALL`.
    async fn rate(&self) -> Result<f64> {
        let (mut seen, mut moved) = (0, Instant::now());
        loop {
            if let (Some(first), Some(last)) = (self.first.get(), self.last.get()) {
                let seconds = last.duration_since(*first).as_secs_f64().max(1e-9);
                return Ok((self.total - 1) as f64 / seconds);
            }
            let count = self.count.load(Ordering::Relaxed);
            if count != seen {
                (seen, moved) = (count, Instant::now());
            } else if moved.elapsed() > STALL {
                bail!(
                    "stalled: only {count} of {} drained, none in the last {STALL:?}",
                    self.total
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

struct NativeNoop(Arc<DrainClock>);

impl MessageListenerConcurrently for NativeNoop {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        for msg in msgs {
            let body = msg.body();
            let event =
                TaskEvent::decode(body.as_deref().unwrap_or_default(), DEFAULT_MAX_BODY_BYTES);
            std::hint::black_box(event.is_ok());
            self.0.tick();
        }
        Ok(ConsumeConcurrentlyStatus::ConsumeSuccess)
    }
}

async fn drain_native(
    mq: &MqRuntime,
    broker: &LocalBroker,
    topic: &TopicName,
    round: usize,
    total: usize,
) -> Result<f64> {
    let clock = DrainClock::new(total);
    let mut consumer = DefaultMQPushConsumer::builder(mq.client())
        .name_server_addr(broker.name_server.clone())
        .consumer_group(format!("bench-native-{round}"))
        .consume_from_where(ConsumeFromWhere::ConsumeFromFirstOffset)
        .consume_thread_min(CONCURRENCY)
        .consume_thread_max(CONCURRENCY)
        .consume_message_batch_max_size(1)
        .build();
    consumer.subscribe(topic.wire(), "*").await?;
    consumer.register_message_listener_concurrently(NativeNoop(clock.clone()));
    consumer.start().await?;
    let rate = clock.rate().await?;
    consumer.shutdown().await;
    Ok(rate)
}

/// The platform's consumer: rocketmq-client-go's push consumer with its
/// defaults, `json.Unmarshal` into the platform's struct (bench-peer).
async fn drain_go(
    broker: &LocalBroker,
    topic: &TopicName,
    round: usize,
    total: usize,
) -> Result<f64> {
    let name_server = broker.name_server.clone();
    let wire = topic.wire().to_string();
    tokio::task::spawn_blocking(move || {
        let mut consumer = GoConsumer::bench_drain(
            &name_server,
            &wire,
            &format!("bench-go-{round}"),
            total,
            false,
        )?;
        let mut seen = (0, Instant::now());
        let rate = loop {
            let lines = consumer.lines();
            if let Some(rate) = lines.iter().find_map(|line| line["rate"].as_f64()) {
                break rate;
            }
            // bench-peer prints nothing until the end; a stall shows as no end.
            if lines.len() != seen.0 {
                seen = (lines.len(), Instant::now());
            } else if seen.1.elapsed() > STALL * 3 {
                bail!("the Go consumer did not drain {total} messages: {lines:?}");
            }
            consumer.wait_until(Duration::from_millis(200), |lines| lines.len() != seen.0);
        };
        consumer.stop()?;
        Ok(rate)
    })
    .await?
}

async fn drain_mqplug(broker: &LocalBroker, round: usize, total: usize) -> Result<f64> {
    let clock = DrainClock::new(total);
    let ticks = clock.clone();
    let observer: Observer = Arc::new(move |event: &HostEvent| {
        if matches!(event, HostEvent::Handled { .. }) {
            ticks.tick();
        }
    });
    let mut config = HostConfig::default();
    config.name_server.clone_from(&broker.name_server);
    config.topic = TOPIC.into();
    // MQPLUG_BENCH_BATCH: messages a listener call takes (the plugin's `batch`).
    let batch: u32 = std::env::var("MQPLUG_BENCH_BATCH")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    // A batch's messages are in their handlers at once: an instance each.
    config.runtime.max_instances = config.runtime.max_instances.max(CONCURRENCY * batch + 16);
    config.plugins = vec![PluginConfig {
        group: Some(format!("bench-mqplug-{round}")),
        concurrency: CONCURRENCY,
        batch,
        // A batch must fit the listener timeout.
        deadline_ms: 1000,
        consume_from: ConsumeFrom::First,
        ..PluginConfig::new("noop", plugin_path("noop")?)
    }];
    let host = Host::start(&config, Observers::new(vec![observer])).await?;
    let rate = clock.rate().await?;
    host.shutdown().await;
    Ok(rate)
}
