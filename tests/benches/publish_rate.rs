//! Bulk publish rate against a real broker on 127.0.0.1, in one run:
//! `mqplug::publish::publish_all` with one send in flight, each event alone
//! (the one-task synchronous rate, what `mqplug publish` did before), against
//! 8, 32 and 64 sends in flight, each event still one `Publisher::publish`
//! (SendSync, the client's retries, the host's backoff), and against
//! RocketMQ batches (`Publisher::publish_batch`, SendSync and retried whole).
//! The platform's own producer is the bar: rocketmq-client-go's `SendSync`
//! (2 retries, as the platform sets it) from 1, 8, 32 and 64 goroutines
//! (tests/peers/go bench-peer), in the same rounds; each mqplug pipeline of
//! one event a send is printed against the Go producer at the same number
//! of sends in flight.
//!
//!   cargo bench -p mqplug-tests --bench publish_rate
//!   MQPLUG_BENCH_EVENTS=20000 MQPLUG_BENCH_ROUNDS=3 cargo bench -p mqplug-tests --bench publish_rate

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mqplug::TaskEvent;
use mqplug::mq::{MqRuntime, Publisher};
use mqplug::publish::{Pipeline, publish_all};
use mqplug::topic::TopicName;
use mqplug_tests::env_or;
use mqplug_tests::peers::go_bench_produce;
use mqplug_tests::{LocalBroker, sample_event};

const TOPIC: &str = "bench.publish.rate";
/// The Go producer's sends in flight, each compared with mqplug's pipeline
/// of one event a send at the same number.
const GO_IN_FLIGHT: [usize; 4] = [1, 8, 32, 64];
/// At least this long after the broker started before measuring.
const WARM_UP: Duration = Duration::from_secs(15);
/// How to send; the first is the baseline the others are compared to.
const PIPELINES: [Pipeline; 6] = [
    Pipeline {
        concurrency: 1,
        batch: 1,
    },
    Pipeline {
        concurrency: 8,
        batch: 1,
    },
    Pipeline {
        concurrency: 32,
        batch: 1,
    },
    Pipeline {
        concurrency: 64,
        batch: 1,
    },
    Pipeline {
        concurrency: 1,
        batch: 16,
    },
    Pipeline {
        concurrency: 8,
        batch: 16,
    },
];

/// Who sends in a measurement.
#[derive(Clone, Copy)]
enum Sender {
    Mqplug(Pipeline),
    /// The Go producer with this many sends in flight.
    Go(usize),
}

/// Publishes `events` as `pipeline` says; returns messages per second,
/// failing if any event was not sent.
async fn rate(
    publisher: &Arc<Publisher>,
    events: &Arc<[TaskEvent]>,
    pipeline: Pipeline,
) -> Result<f64> {
    let started = Instant::now();
    let published = publish_all(publisher, Arc::clone(events), pipeline, |_, _| {}).await;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(failure) = published.failures().next() {
        anyhow::bail!(
            "{} of {} not sent, e.g. {failure}",
            published.failed(),
            events.len()
        );
    }
    Ok(events.len() as f64 / seconds)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("publish_rate: run with `cargo bench`");
        return Ok(());
    }
    let per_round = env_or("MQPLUG_BENCH_EVENTS", 5000);
    let rounds = env_or("MQPLUG_BENCH_ROUNDS", 5).max(1);
    let broker = LocalBroker::start()?;
    let broker_started = Instant::now();
    let topic = TopicName::new(TOPIC)?;
    let mq = MqRuntime::new(0)?;
    let publisher = mqplug_tests::topic_publisher(&mq, &broker.name_server, &topic).await?;
    let publisher = Arc::new(publisher);
    let events: Arc<[TaskEvent]> = (0..per_round as u64)
        .map(|user| sample_event("USER_REGISTER", user))
        .collect();
    let warm_up: Arc<[TaskEvent]> = events[..per_round.min(2000)].into();

    // A JVM broker compiles its hot paths over the first thousands of sends:
    // warm it up unmeasured, with every pipeline. And Apache RocketMQ 5.5.0's
    // TransactionMetricsFlushService spins on a core for its first flush
    // interval (transactionMetricFlushInterval, 10 s; apache/rocketmq#10515),
    // which would slow whatever runs then: keep warming up past it.
    let mut warm_ups = 0;
    while warm_ups < PIPELINES.len() || broker_started.elapsed() < WARM_UP {
        rate(&publisher, &warm_up, PIPELINES[warm_ups % PIPELINES.len()]).await?;
        warm_ups += 1;
    }
    // Interleaved rounds, each round in another order (rotated), so no
    // pipeline always gets the broker right after the same other one.
    let senders: Vec<Sender> = PIPELINES
        .iter()
        .map(|pipeline| Sender::Mqplug(*pipeline))
        .chain(GO_IN_FLIGHT.iter().map(|n| Sender::Go(*n)))
        .collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); senders.len()];
    for round in 0..rounds {
        for turn in 0..senders.len() {
            let which = (turn + round) % senders.len();
            let measured = match senders[which] {
                Sender::Mqplug(pipeline) => {
                    let measured = rate(&publisher, &events, pipeline).await?;
                    eprintln!(
                        "round {}: {:>2} in flight x {:>2} a send: {measured:>7.0} msg/s",
                        round + 1,
                        pipeline.concurrency,
                        pipeline.batch
                    );
                    measured
                }
                Sender::Go(in_flight) => {
                    let name_server = broker.name_server.clone();
                    let wire = topic.wire().to_string();
                    let measured = tokio::task::spawn_blocking(move || {
                        go_bench_produce(&name_server, &wire, per_round, in_flight)
                    })
                    .await??;
                    eprintln!(
                        "round {}: {in_flight:>2} in flight, Go producer: {measured:>7.0} msg/s",
                        round + 1
                    );
                    measured
                }
            };
            rates[which].push(measured);
        }
    }
    Arc::into_inner(publisher)
        .context("publisher still shared")?
        .shutdown()
        .await;
    mq.shutdown().await;
    drop(broker);

    for rates in &mut rates {
        rates.sort_by(f64::total_cmp);
    }
    let baseline = median(&rates[0]);
    ensure!(baseline > 0.0, "no baseline rate");
    println!(
        "{per_round} events a round, {rounds} rounds, {:?} broker",
        mqplug_tests::broker::BrokerKind::from_env()?
    );
    println!("| sends in flight | events a send | median (msg/s) | min | max | median vs 1 x 1 |");
    println!("|---|---|---|---|---|---|");
    for (pipeline, rates) in PIPELINES.iter().zip(&rates) {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.2}x |",
            pipeline.concurrency,
            pipeline.batch,
            median(rates),
            rates[0],
            rates[rates.len() - 1],
            median(rates) / baseline
        );
    }
    println!();
    println!(
        "| sends in flight, one event a send | mqplug median (msg/s) | Go producer median (msg/s) | Go min-max | mqplug / Go |"
    );
    println!("|---|---|---|---|---|");
    for (i, in_flight) in GO_IN_FLIGHT.iter().enumerate() {
        let go = &rates[PIPELINES.len() + i];
        let Some(mqplug) = PIPELINES
            .iter()
            .position(|p| p.concurrency == *in_flight && p.batch == 1)
        else {
            continue;
        };
        println!(
            "| {in_flight} | {:.0} | {:.0} | {:.0}-{:.0} | {:.2} |",
            median(&rates[mqplug]),
            median(go),
            go[0],
            go[go.len() - 1],
            median(&rates[mqplug]) / median(go)
        );
    }
    Ok(())
}
