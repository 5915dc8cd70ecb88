//! Handlers that wait on a slow service: how many threads they hold.
//!
//! The chaos plugin's `HTTP` event makes a GET through `wasi:http` to a
//! loopback server that answers after `MQPLUG_BENCH_LATENCY_MS` (default
//! 40). `MQPLUG_BENCH_IN_FLIGHT` handlers (default 1,000) call it at once,
//! each again as soon as it returned, for `MQPLUG_BENCH_ROUNDS` (default
//! 10) calls each, two ways in one run:
//! - awaited: `Plugin::handle_async` on a Tokio runtime of 2 worker
//!   threads, as a listener call with a batch runs its messages;
//! - blocking: `Plugin::handle` from one thread per handler in flight, as a
//!   listener thread runs a message alone (the baseline).
//!
//! It prints each way's rate against the ideal (in flight / latency), the
//! most threads the process had while they ran (`/proc/self/status`), and
//! the ratio of the two rates. Then the same through a host and a real
//! broker: a backlog of such events drained by the chaos plugin with
//! `MQPLUG_BENCH_HOST_CONCURRENCY` (default 8) listener threads,
//! `MQPLUG_BENCH_BATCH` (default 32) messages a call, against batch 1.
//!
//!   MQPLUG_BENCH_HOST_CONCURRENCY=32 cargo bench -p mqplug-tests --bench waiting
//!
//!   cargo bench -p mqplug-tests --bench waiting
//!   MQPLUG_BENCH_IN_FLIGHT=100 cargo bench -p mqplug-tests --bench waiting

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mqplug::config::PluginConfig;
use mqplug::delivery::Delivery;
use mqplug::outcome::HandlerOutcome;
use mqplug::slot::load_plugin;
use mqplug::wasm::{RuntimeSettings, WasmRuntime};
use mqplug_tests::env_or;
use mqplug_tests::plugins::plugin_path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The process's threads now.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples the thread count every 10 ms until dropped; the most it saw.
struct ThreadPeak {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl ThreadPeak {
    fn start() -> ThreadPeak {
        let (peak, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (p, s) = (peak.clone(), stop.clone());
        let sampler = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(threads(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        ThreadPeak {
            peak,
            stop,
            sampler: Some(sampler),
        }
    }

    /// The peak, not counting the sampler itself.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
        self.peak.load(Ordering::Relaxed).saturating_sub(1)
    }
}

/// A server on 127.0.0.1 that answers each request after `latency`, on its
/// own runtime of one thread (its threads are counted too: it is the same
/// for both ways).
fn slow_server(latency: Duration) -> Result<std::net::SocketAddr> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A backlog for a thousand connections at once: with the usual 128, the
    // kernel drops SYNs and the client retries after a second, which is
    // not the service's latency.
    let listener = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        anyhow::Ok(socket.listen(4096)?)
    })?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    tokio::time::sleep(latency).await;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\ngranted",
                        )
                        .await;
                });
            }
        });
    });
    Ok(addr)
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("waiting: run with `cargo bench`");
        return Ok(());
    }
    let in_flight = env_or("MQPLUG_BENCH_IN_FLIGHT", 1000).max(1);
    let rounds = env_or("MQPLUG_BENCH_ROUNDS", 10).max(1);
    let latency = Duration::from_millis(env_or("MQPLUG_BENCH_LATENCY_MS", 40) as u64);
    let addr = slow_server(latency)?;
    let origin = format!("http://{addr}");
    let runtime = WasmRuntime::new(RuntimeSettings {
        max_instances: u32::try_from(in_flight + 16)?,
        ..RuntimeSettings::default()
    })
    .map_err(|err| anyhow::anyhow!("{err:#}"))?;
    let entry = PluginConfig {
        allowed_outbound_hosts: vec![origin.clone()],
        http_max_in_flight: in_flight,
        config: BTreeMap::new(),
        ..PluginConfig::new("chaos", plugin_path("chaos")?)
    };
    let plugin = Arc::new(load_plugin(&runtime, &entry, &Default::default())?);
    let event = Arc::new(mqplug_tests::sample_event_with(
        "HTTP",
        7,
        serde_json::json!({"url": format!("{origin}/grants"), "method": "GET"}),
    ));
    let total = in_flight * rounds;
    let ideal = in_flight as f64 / latency.as_secs_f64();

    // Awaited: every handler a task on 2 worker threads.
    let tokio_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let peak = ThreadPeak::start();
    let started = Instant::now();
    let failed = tokio_runtime.block_on(async {
        let mut handlers = tokio::task::JoinSet::new();
        for _ in 0..in_flight {
            let (plugin, event) = (plugin.clone(), event.clone());
            handlers.spawn(async move {
                let mut failed = 0;
                for _ in 0..rounds {
                    failed += failure(plugin.handle_async(&event, &delivery()).await.outcome);
                }
                failed
            });
        }
        let mut failed = 0;
        while let Some(done) = handlers.join_next().await {
            failed += done.unwrap_or(rounds);
        }
        failed
    });
    let awaited_rate = total as f64 / started.elapsed().as_secs_f64();
    let awaited_threads = peak.finish();
    ensure!(failed == 0, "{failed} of {total} awaited calls failed");
    drop(tokio_runtime);

    // Blocking: a thread per handler in flight.
    let peak = ThreadPeak::start();
    let started = Instant::now();
    let handlers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (plugin, event) = (plugin.clone(), event.clone());
            std::thread::spawn(move || {
                (0..rounds)
                    .map(|_| failure(plugin.handle(&event, &delivery())))
                    .sum::<usize>()
            })
        })
        .collect();
    let failed: usize = handlers
        .into_iter()
        .map(|h| h.join().unwrap_or(rounds))
        .sum();
    let blocking_rate = total as f64 / started.elapsed().as_secs_f64();
    let blocking_threads = peak.finish();
    ensure!(failed == 0, "{failed} of {total} blocking calls failed");

    println!(
        "{in_flight} handlers in flight, each waiting {} ms on the service, {rounds} calls each; ideal {ideal:.0} calls/s",
        latency.as_millis()
    );
    println!("| way | calls/s | vs ideal (in flight / latency) | most threads |");
    println!("|---|---|---|---|");
    println!(
        "| awaited (handle_async, 2 workers) | {awaited_rate:.0} | {:.2} | {awaited_threads} |",
        awaited_rate / ideal
    );
    println!(
        "| blocking (handle, a thread each) | {blocking_rate:.0} | {:.2} | {blocking_threads} |",
        blocking_rate / ideal
    );
    println!(
        "awaited / blocking: rate {:.2}, threads {:.3}",
        awaited_rate / blocking_rate,
        awaited_threads as f64 / blocking_threads.max(1) as f64
    );
    drop(plugin);

    // The same through a host and a real broker: a backlog of HTTP events,
    // `host_concurrency()` listener threads, each taking `batch` messages.
    let host_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let batch = env_or("MQPLUG_BENCH_BATCH", 32);
    let rows = host_runtime.block_on(async {
        let broker = mqplug_tests::LocalBroker::start()?;
        let mut rows = Vec::new();
        for (round, batch) in [batch, 1].into_iter().enumerate() {
            rows.push(drain_through_host(&broker, round, batch, &origin, latency).await?);
        }
        anyhow::Ok(rows)
    })?;
    println!();
    println!(
        "through a host: {} listener threads, the service answering in {} ms",
        host_concurrency(),
        latency.as_millis()
    );
    println!(
        "| batch | handlers waiting at once | handled/s | vs waiting / latency | most threads in the process |"
    );
    println!("|---|---|---|---|---|");
    for (batch, rate, threads) in rows {
        let waiting = host_concurrency() as usize * batch;
        println!(
            "| {batch} | {waiting} | {rate:.0} | {:.2} | {threads} |",
            rate / (waiting as f64 / latency.as_secs_f64())
        );
    }
    Ok(())
}

/// Listener threads of the host's plugin (`MQPLUG_BENCH_HOST_CONCURRENCY`,
/// default 8).
fn host_concurrency() -> u32 {
    u32::try_from(env_or("MQPLUG_BENCH_HOST_CONCURRENCY", 8).clamp(1, 256)).unwrap_or(8)
}

/// Publishes 20 HTTP events per handler that can wait at once, drains them
/// through a host (the chaos plugin, `host_concurrency()` x `batch`), and
/// returns the batch, the rate from the first handled to the last, and the
/// most threads the process had meanwhile.
async fn drain_through_host(
    broker: &mqplug_tests::LocalBroker,
    round: usize,
    batch: usize,
    origin: &str,
    latency: Duration,
) -> Result<(usize, f64, usize)> {
    use mqplug::mq::{ConsumeFrom, MqRuntime};
    use mqplug::observe::{HostEvent, Observer, Observers};
    use mqplug::topic::TopicName;

    let waiting = host_concurrency() as usize * batch;
    let total = waiting * 20;
    let topic_name = format!("bench.waiting.{round}");
    let topic = TopicName::new(&topic_name)?;
    let mq = MqRuntime::new(0)?;
    let publisher = mqplug_tests::topic_publisher(&mq, &broker.name_server, &topic).await?;
    let event = mqplug_tests::sample_event_with(
        "HTTP",
        7,
        serde_json::json!({"url": format!("{origin}/grants"), "method": "GET"}),
    );
    let published = mqplug::publish::publish_all(
        &Arc::new(publisher),
        vec![event; total],
        mqplug::publish::Pipeline {
            concurrency: 16,
            batch: 16,
        },
        |_, _| {},
    )
    .await;
    ensure!(
        published.failed() == 0,
        "{} not published",
        published.failed()
    );
    mq.shutdown().await;

    let handled = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let times: Arc<std::sync::Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let (h, f, t) = (handled.clone(), failed.clone(), times.clone());
    let observer: Observer = Arc::new(move |event: &HostEvent| {
        if let HostEvent::Handled { outcome, cause, .. } = event {
            if *outcome != mqplug::DeliveryOutcome::ConsumeSuccess {
                if f.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("first failure: {cause:?}");
                }
                return;
            }
            let now = Instant::now();
            let mut times = t.lock().unwrap();
            times.0.get_or_insert(now);
            times.1 = Some(now);
            h.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut config = mqplug::HostConfig::default();
    config.name_server.clone_from(&broker.name_server);
    config.topic = topic_name;
    config.runtime.max_instances = u32::try_from(waiting + 16)?;
    config.plugins = vec![PluginConfig {
        group: Some(format!("bench-waiting-{round}")),
        concurrency: host_concurrency(),
        batch: u32::try_from(batch)?,
        deadline_ms: (28_000 / batch as u64).min(5_000),
        consume_from: ConsumeFrom::First,
        allowed_outbound_hosts: vec![origin.to_string()],
        http_max_in_flight: waiting,
        ..PluginConfig::new("chaos", plugin_path("chaos")?)
    }];
    let peak = ThreadPeak::start();
    let host = mqplug::Host::start(&config, Observers::new(vec![observer])).await?;
    let deadline = Instant::now() + Duration::from_secs(60) + latency * (total as u32);
    while handled.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.shutdown().await;
    let threads = peak.finish();
    let count = handled.load(Ordering::Relaxed);
    ensure!(
        count >= total,
        "only {count} of {total} handled ({} failures)",
        failed.load(Ordering::Relaxed)
    );
    let (first, last) = *times.lock().unwrap();
    let seconds = match (first, last) {
        (Some(first), Some(last)) => last.duration_since(first).as_secs_f64().max(1e-9),
        _ => anyhow::bail!("nothing handled"),
    };
    let failures = failed.load(Ordering::Relaxed);
    if failures > 0 {
        eprintln!("batch {batch}: {failures} deliveries failed and were retried");
    }
    Ok((batch, (count - 1) as f64 / seconds, threads))
}

fn delivery() -> Delivery {
    Delivery {
        message_id: "C0A8000100002A9F0000000000000001".into(),
        ..Delivery::default()
    }
}

/// 1 if the call failed (the first failure is printed), else 0.
fn failure(outcome: HandlerOutcome) -> usize {
    static PRINTED: AtomicBool = AtomicBool::new(false);
    if outcome == HandlerOutcome::Accepted {
        return 0;
    }
    if !PRINTED.swap(true, Ordering::Relaxed) {
        eprintln!("a call failed: {outcome:?}");
    }
    1
}
