//! Publish-to-handled latency at a steady rate, mqplug and the platform's
//! own consumer side by side: one publisher sends `MQPLUG_BENCH_RATE`
//! events a second (default 1,000) for `MQPLUG_BENCH_SECONDS` (default 20)
//! to a real broker on 127.0.0.1, and two consumer groups read the same
//! stream at the same time: mqplug with the no-op plugin (concurrency 16)
//! and rocketmq-client-go's push consumer with its defaults and
//! `json.Unmarshal` (tests/peers/go bench-peer). An event's latency runs
//! from just before its send to when each consumer reports it handled, on
//! the machine's wall clock (both run here). It prints p50, p90, p99 and
//! the maximum of each, and their ratios, and writes
//! `target/bench-results/latency.csv` for `bench-charts`.
//!
//!   cargo bench -p mqplug-tests --bench latency
//!   MQPLUG_BENCH_RATE=2000 MQPLUG_BENCH_SECONDS=30 cargo bench -p mqplug-tests --bench latency

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use mqplug::config::PluginConfig;
use mqplug::mq::{ConsumeFrom, MqRuntime};
use mqplug::observe::{HostEvent, Observer, Observers};
use mqplug::topic::TopicName;
use mqplug::{Host, HostConfig};
use mqplug_tests::env_or;
use mqplug_tests::peers::GoConsumer;
use mqplug_tests::{LocalBroker, plugins::plugin_path, sample_event};

const TOPIC: &str = "bench.latency";
const CONCURRENCY: u32 = 16;
/// Events sent, unmeasured, before the measured ones: both consumers have
/// their queues and the broker has compiled its paths.
const WARM_UP_SECONDS: u64 = 5;

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Message id to a wall-clock time in Unix nanoseconds.
type Times = Arc<Mutex<HashMap<String, i64>>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("latency: run with `cargo bench`");
        return Ok(());
    }
    let rate = env_or("MQPLUG_BENCH_RATE", 1000).max(1) as u64;
    let seconds = env_or("MQPLUG_BENCH_SECONDS", 20).max(1) as u64;
    let broker = LocalBroker::start()?;
    let topic = TopicName::new(TOPIC)?;
    let mq = MqRuntime::new(0)?;
    let publisher = mqplug_tests::topic_publisher(&mq, &broker.name_server, &topic).await?;
    let publisher = Arc::new(publisher);

    // mqplug: the no-op plugin; an observer notes when each was handled.
    let handled: Times = Arc::default();
    let noted = handled.clone();
    let observer: Observer = Arc::new(move |event: &HostEvent| {
        if let HostEvent::Handled { message_id, .. } = event {
            let now = unix_nanos();
            noted.lock().unwrap().insert(message_id.clone(), now);
        }
    });
    let mut config = HostConfig::default();
    config.name_server.clone_from(&broker.name_server);
    config.topic = TOPIC.into();
    config.plugins = vec![PluginConfig {
        group: Some("bench-latency-mqplug".into()),
        concurrency: CONCURRENCY,
        consume_from: ConsumeFrom::First,
        ..PluginConfig::new("noop", plugin_path("noop")?)
    }];
    let host = Host::start(&config, Observers::new(vec![observer])).await?;
    let warm_up = (WARM_UP_SECONDS * rate) as usize;
    let measured = (seconds * rate) as usize;
    let name_server = broker.name_server.clone();
    let wire = topic.wire().to_string();
    let mut go = tokio::task::spawn_blocking(move || {
        GoConsumer::bench_drain(
            &name_server,
            &wire,
            "bench-latency-go",
            warm_up + measured,
            true,
        )
    })
    .await??;

    let sent: Times = Arc::default();
    let warm_sent: Times = Arc::default();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    let event = sample_event("USER_REGISTER", 123);
    for i in 0..warm_up + measured {
        // A steady schedule: the i-th send is due at i intervals from the
        // start, however long the earlier ones took.
        tokio::time::sleep_until((started + interval * i as u32).into()).await;
        let (publisher, event) = (publisher.clone(), event.clone());
        let times = if i < warm_up {
            warm_sent.clone()
        } else {
            sent.clone()
        };
        sends.spawn(async move {
            let at = unix_nanos();
            let receipt = publisher.publish(&event).await?;
            times.lock().unwrap().insert(receipt.message_id, at);
            anyhow::Ok(())
        });
        while let Some(done) = sends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    let achieved = (warm_up + measured) as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "sent {} events at {achieved:.0} a second",
        warm_up + measured
    );

    // Both have handled every measured event, or a minute passed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ids: Vec<String> = sent.lock().unwrap().keys().cloned().collect();
    loop {
        let go_seen: std::collections::HashSet<String> = go
            .lines()
            .iter()
            .filter_map(|line| line["msg_id"].as_str().map(str::to_string))
            .collect();
        let mqplug_missing = {
            let handled = handled.lock().unwrap();
            ids.iter().filter(|id| !handled.contains_key(*id)).count()
        };
        let go_missing = ids.iter().filter(|id| !go_seen.contains(*id)).count();
        if mqplug_missing == 0 && go_missing == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("not handled within a minute: {mqplug_missing} by mqplug, {go_missing} by Go");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let go_handled: HashMap<String, i64> = go
        .lines()
        .iter()
        .filter_map(|line| {
            Some((
                line["msg_id"].as_str()?.to_string(),
                line["handled_ns"].as_i64()?,
            ))
        })
        .collect();
    tokio::task::spawn_blocking(move || go.stop()).await??;
    host.shutdown().await;
    Arc::into_inner(publisher)
        .context("publisher still shared")?
        .shutdown()
        .await;
    mq.shutdown().await;

    let sent = sent.lock().unwrap().clone();
    let mqplug = latencies(&sent, &handled.lock().unwrap())?;
    let go = latencies(&sent, &go_handled)?;
    println!(
        "{measured} events at {rate} a second ({achieved:.0} achieved), after {warm_up} unmeasured; publish to handled, milliseconds"
    );
    println!("| percentile | mqplug, no-op plugin | Go push consumer | mqplug / Go |");
    println!("|---|---|---|---|");
    let mut csv = String::from("percentile,mqplug_ms,go_ms\n");
    for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0)] {
        let (m, g) = (percentile(&mqplug, q), percentile(&go, q));
        println!("| {name} | {m:.2} | {g:.2} | {:.2} |", m / g);
        csv.push_str(&format!("{name},{m:.3},{g:.3}\n"));
    }
    let dir = mqplug_tests::workspace_root().join("target/bench-results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("latency.csv"), csv)?;
    Ok(())
}

/// Each sent event's latency in milliseconds, sorted.
fn latencies(sent: &HashMap<String, i64>, handled: &HashMap<String, i64>) -> Result<Vec<f64>> {
    let mut all: Vec<f64> = sent
        .iter()
        .map(|(id, at)| {
            let done = handled
                .get(id)
                .with_context(|| format!("{id} never handled"))?;
            Ok((done - at) as f64 / 1e6)
        })
        .collect::<Result<_>>()?;
    all.sort_by(f64::total_cmp);
    Ok(all)
}

/// The `q` quantile of sorted `values` (nearest rank).
fn percentile(values: &[f64], q: f64) -> f64 {
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}
