//! A host carrying many teams' plugins: the release `mqplug` binary started
//! with 1, 10 and 50 plugins (the no-op plugin under different names, each
//! its own consumer group on the same topic), against Apache RocketMQ on
//! loopback.
//!
//! For each count, two runs:
//! - idle, on an empty topic: start-up time (spawn to every consumer
//!   started), resident memory, threads and open files once settled;
//! - drain, on a backlog: every plugin drains the same backlog from the
//!   first offset; the host's total rate (messages handled per second, all
//!   plugins together, first to last) and the rate per plugin.
//!
//! Writes `target/bench-results/many-plugins.csv` for `bench-charts`.
//!
//!   cargo bench -p mqplug --bench many_plugins
//!   MQPLUG_BENCH_PLUGINS=1,10,50 MQPLUG_BENCH_BACKLOG=50000 cargo bench -p mqplug --bench many_plugins
//!   MQPLUG_BENCH_PREFETCH=128 cargo bench -p mqplug --bench many_plugins   # each plugin's `prefetch`

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mqplug::mq::{MqRuntime, ProducerSettings, Publisher};
use mqplug::topic::TopicName;
use mqplug_tests::{LocalBroker, plugins::plugin_path, sample_event};

const MQPLUG: &str = env!("CARGO_BIN_EXE_mqplug");
const IDLE_TOPIC: &str = "bench.idle";
const BACKLOG_TOPIC: &str = "bench.many";

/// Kills the host if the bench fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `mqplug run` with `plugins` no-op plugins on `topic`; returns it
/// with its admin address and how long until every consumer had started.
fn start_host(
    dir: &std::path::Path,
    name_server: &str,
    topic: &str,
    plugins: usize,
    run: &str,
) -> Result<(Running, String, Duration)> {
    let noop = plugin_path("noop")?;
    let admin = format!("127.0.0.1:{}", free_port()?);
    let mut config = format!(
        "name_server = \"{name_server}\"\ntopic = \"{topic}\"\n[admin]\nlisten = \"{admin}\"\n"
    );
    // MQPLUG_BENCH_PREFETCH=<n>: each plugin's `prefetch`.
    let prefetch = std::env::var("MQPLUG_BENCH_PREFETCH")
        .ok()
        .and_then(|n| n.parse::<u32>().ok())
        .map(|n| format!("prefetch = {n}\n"))
        .unwrap_or_default();
    for i in 0..plugins {
        config.push_str(&format!(
            "[[plugin]]\nname = \"p{i}\"\npath = \"{}\"\ngroup = \"bench-{run}-p{i}\"\nconsume_from = \"first\"\n{prefetch}",
            noop.display()
        ));
    }
    let path = dir.join(format!("{run}.toml"));
    std::fs::write(&path, config)?;
    let started = Instant::now();
    let mut child = Command::new(MQPLUG)
        .args(["run", "--config"])
        .arg(&path)
        .env("MQPLUG_LOG", "info")
        .env(
            "MQPLUG_CACHE_DIR",
            mqplug_tests::test_cache_dir().parent().context("cache")?,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (send, lines) = mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().context("stdout")?) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().context("stderr")?),
    ] {
        let send = send.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let running = Running(child);
    let mut consumers = 0;
    let deadline = started + Duration::from_secs(300);
    while consumers < plugins {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{consumers} of {plugins} consumers started within 300 s");
        }
        match lines.recv_timeout(left) {
            Ok(line) if line.contains("consumer started") => consumers += 1,
            Ok(_) => {}
            Err(_) => bail!("the host stopped: {consumers} of {plugins} consumers started"),
        }
    }
    let took = started.elapsed();
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((running, admin, took))
}

/// VmRSS (bytes) and threads of a process, and its open files.
fn usage(pid: u32) -> Result<(u64, u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{name} in /proc/{pid}/status"))
    };
    let files = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((field("VmRSS:")? * 1024, field("Threads:")?, files))
}

/// Resident bytes of a process by kind of mapping: anonymous (the heap,
/// thread stacks), anonymous reservations of at least 1 GiB (the wasm
/// pooling allocator's slots), and file-backed (code, mapped files).
fn resident_split(pid: u32) -> Result<(u64, u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut anon, mut pool, mut file) = (0, 0, 0);
    let mut current: Option<(u64, bool)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            // address perms offset dev inode [path]
            let path = fields.nth(4);
            let anonymous = path.is_none_or(|path| path.starts_with('['));
            current = Some((end - start, anonymous));
        } else if first == "Rss:"
            && let Some((size, anonymous)) = current
        {
            let kib: u64 = fields.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            match (anonymous, size >= 1 << 30) {
                (true, true) => pool += kib * 1024,
                (true, false) => anon += kib * 1024,
                (false, _) => file += kib * 1024,
            }
        }
    }
    Ok((anon, pool, file))
}

/// Messages the host has acknowledged, over all plugins.
fn handled(admin: &str) -> Result<u64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin)?;
    write!(stream, "GET /metrics HTTP/1.1\r\nhost: bench\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .lines()
        .filter(|line| {
            line.starts_with("mqplug_messages_total{") && line.contains("outcome=\"success\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Creates `topic` (4 queues) and publishes `count` events to it, 16 sends
/// in flight (`publish::publish_all`).
async fn publish_backlog(name_server: &str, topic: &str, count: usize) -> Result<()> {
    use mqplug::publish::{Pipeline, publish_all};
    let mq = MqRuntime::new(1)?;
    let mut publisher = Publisher::start(
        &mq,
        ProducerSettings::new(name_server.to_string(), TopicName::new(topic)?),
    )
    .await?;
    publisher.create_topic(4).await?;
    let publisher = std::sync::Arc::new(publisher);
    let events = vec![sample_event("USER_REGISTER", 123); count];
    let pipeline = Pipeline {
        concurrency: 16,
        batch: 1,
    };
    let published = publish_all(&publisher, events, pipeline, |_, _| {}).await;
    std::sync::Arc::into_inner(publisher)
        .context("publisher shared")?
        .shutdown()
        .await;
    mq.shutdown().await;
    if published.failed() > 0 {
        bail!("{} of {count} events not sent", published.failed());
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("many_plugins: run with `cargo bench`");
        return Ok(());
    }
    let counts: Vec<usize> = std::env::var("MQPLUG_BENCH_PLUGINS")
        .unwrap_or_else(|_| "1,10,50".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let backlog: usize = std::env::var("MQPLUG_BENCH_BACKLOG")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50_000);
    let broker = LocalBroker::start()?;
    let dir = tempfile::tempdir()?;
    publish_backlog(&broker.name_server, IDLE_TOPIC, 0).await?;
    publish_backlog(&broker.name_server, BACKLOG_TOPIC, backlog).await?;
    eprintln!("backlog of {backlog} published");

    let mut rows = Vec::new();
    for &n in &counts {
        // Idle: start-up, memory, threads, files.
        let (host, _, startup) = start_host(
            dir.path(),
            &broker.name_server,
            IDLE_TOPIC,
            n,
            &format!("idle-{n}"),
        )?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss, threads, files) = usage(host.0.id())?;
        let split = resident_split(host.0.id())?;
        drop(host);
        eprintln!(
            "{n} plugins idle: {:.1} MiB heap and other anonymous, {:.1} MiB in the wasm pool's reservation, {:.1} MiB file-backed",
            split.0 as f64 / 1048576.0,
            split.1 as f64 / 1048576.0,
            split.2 as f64 / 1048576.0
        );

        // Drain: every plugin the whole backlog.
        let (host, admin, _) = start_host(
            dir.path(),
            &broker.name_server,
            BACKLOG_TOPIC,
            n,
            &format!("drain-{n}"),
        )?;
        let total = (n * backlog) as u64;
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut first = None;
        let mut peak_rss = 0;
        let last = loop {
            let done = handled(&admin).unwrap_or(0);
            let now = Instant::now();
            if first.is_none() && done > 0 {
                first = Some((now, done));
            }
            peak_rss = peak_rss.max(usage(host.0.id())?.0);
            if done >= total {
                break (now, done);
            }
            if now > deadline {
                bail!("{done} of {total} handled within 900 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        drop(host);
        let (first_at, first_done) = first.context("nothing handled")?;
        let seconds = last.0.duration_since(first_at).as_secs_f64().max(1e-3);
        let rate = (last.1 - first_done) as f64 / seconds;
        let row = (
            n,
            startup.as_secs_f64(),
            rss,
            threads,
            files,
            rate,
            rate / n as f64,
            peak_rss,
        );
        eprintln!(
            "{n} plugins: start-up {:.2} s, idle {:.1} MiB, {threads} threads, {files} files; \
             drain {rate:.0} msg/s in all, {:.0} per plugin; peak {:.1} MiB",
            row.1,
            rss as f64 / 1048576.0,
            row.6,
            peak_rss as f64 / 1048576.0
        );
        rows.push(row);
    }

    println!(
        "| plugins | start-up | idle resident | per extra plugin | threads | open files | drain, all plugins (msg/s) | per plugin | vs 1 plugin |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let base = rows.first().copied();
    let mut csv = String::from(
        "plugins,startup_s,idle_rss_bytes,threads,files,drain_total,drain_per_plugin,peak_rss_bytes\n",
    );
    for row in &rows {
        let (n, startup, rss, threads, files, rate, per, peak) = *row;
        let (extra, versus) = match base {
            Some(base) if n > base.0 => (
                format!(
                    "{:.2} MiB",
                    (rss as f64 - base.2 as f64) / (n - base.0) as f64 / 1048576.0
                ),
                format!("{:.2}x", rate / base.5),
            ),
            _ => ("-".into(), "1.00x".into()),
        };
        println!(
            "| {n} | {startup:.2} s | {:.1} MiB | {extra} | {threads} | {files} | {rate:.0} | {per:.0} | {versus} |",
            rss as f64 / 1048576.0
        );
        csv.push_str(&format!(
            "{n},{startup:.3},{rss},{threads},{files},{rate:.0},{per:.0},{peak}\n"
        ));
    }
    let results = mqplug_tests::workspace_root().join("target/bench-results");
    std::fs::create_dir_all(&results)?;
    std::fs::write(results.join("many-plugins.csv"), csv)?;
    Ok(())
}
