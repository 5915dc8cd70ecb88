//! Test support: a real RocketMQ name server and broker on 127.0.0.1, a
//! real Redis, the example and test plugins built for wasm32-wasip2, and a
//! recorder of what the host did.

pub mod broker;
pub mod browser;
pub mod collector;
pub mod http_server;
pub mod peers;
pub mod plugins;
pub mod proxy;
pub mod recorder;
pub mod redis;
pub mod rewards;

pub use broker::{LocalBroker, LocalCluster};
pub use collector::Collector;
pub use recorder::{Collect, Recorder};
pub use redis::LocalRedis;

use std::path::PathBuf;

/// The repository's root folder.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

use mqplug::config::{HostConfig, PluginConfig};

/// Everything the process logs through `tracing` at `filter`, from every
/// thread, from the first call on: one global subscriber per test binary,
/// installed by the first test that asks (later calls keep the first
/// filter). Returns what was logged so far.
pub fn host_log(filter: &str) -> String {
    use std::sync::{Arc, Mutex, OnceLock};
    #[derive(Clone)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOG: OnceLock<Shared> = OnceLock::new();
    let log = LOG.get_or_init(|| {
        let log = Shared(Arc::default());
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        log
    });
    String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned()
}

/// How many descriptors a test that opens thousands of connections may
/// hold: the process's soft limit raised to its hard limit first (many
/// systems start processes at a soft limit of 1024), then a quarter of that
/// (the rest is for the broker client and the tests running beside it), at
/// most `wanted`.
pub fn open_files_allowed(wanted: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for both calls to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return wanted.min(256);
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let quarter = usize::try_from(limit.rlim_cur / 4).unwrap_or(usize::MAX);
    wanted.min(quarter)
}

/// How long a test watches for deliveries that should not happen (a
/// duplicate, a redelivery, a filtered event) after everything expected has
/// arrived. Absence cannot be awaited: a bug shows as an extra delivery in
/// this window. Not a measurement and not a wait for a condition.
pub const QUIET_PERIOD: std::time::Duration = std::time::Duration::from_secs(2);

/// The compile cache every test shares: under the build's target folder,
/// never the user's `~/.cache` (its key file sits beside it).
pub fn test_cache_dir() -> PathBuf {
    plugins::target_dir().join("test-cache").join("components")
}

use mqplug::mq::ConsumeFrom;

/// A host config for `broker` with the producer on (creating `topic` with 4
/// queues) and `plugins` reading from the first offset.
pub fn host_config(broker: &LocalBroker, topic: &str, plugins: Vec<PluginConfig>) -> HostConfig {
    host_config_for(&broker.name_server, topic, plugins)
}

/// [`host_config`] for any name server (a [`LocalCluster`]'s).
pub fn host_config_for(name_server: &str, topic: &str, plugins: Vec<PluginConfig>) -> HostConfig {
    let mut config = HostConfig::default();
    name_server.clone_into(&mut config.name_server);
    config.topic = topic.to_string();
    config.producer.enabled = true;
    config.producer.create_topic_queues = Some(4);
    // A free port: tests run side by side.
    config.admin.listen = "127.0.0.1:0".into();
    config.runtime.cache_dir = Some(test_cache_dir());
    config.plugins = plugins
        .into_iter()
        .map(|plugin| PluginConfig {
            consume_from: ConsumeFrom::First,
            ..plugin
        })
        .collect();
    config
}

/// The platform's example event with the given type and user.
pub fn sample_event(event_type: &str, user_id: u64) -> mqplug::TaskEvent {
    sample_event_with(event_type, user_id, serde_json::json!({"count": 1}))
}

/// The platform's example event with the given type, user and event data
/// (what the chaos plugin reads its instructions from).
pub fn sample_event_with(
    event_type: &str,
    user_id: u64,
    event_data: serde_json::Value,
) -> mqplug::TaskEvent {
    let body = serde_json::json!({
        "event_type": event_type, "user_id": user_id, "tenant_id": "tenant1", "app_id": "app1",
        "campaign_id": "campaign-1", "campaign_name": "测试活动", "event_data": event_data,
        "timestamp": "2026-11-25T14:19:15+08:00",
    });
    mqplug::TaskEvent::decode(body.to_string().as_bytes(), usize::MAX).expect("a valid event")
}

/// A benchmark's setting from the environment (`MQPLUG_BENCH_...`), or
/// `default` when unset or not a number.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// A bench's profile mode: `once` over and over for `MQPLUG_BENCH_SECONDS`
/// (default 10), after one unmeasured second; how many times, and the
/// mean time of one.
pub fn repeat_for_profile(
    mut once: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(u32, std::time::Duration)> {
    let mut run = |length: std::time::Duration| -> anyhow::Result<(u32, std::time::Duration)> {
        let started = std::time::Instant::now();
        let mut times = 0u32;
        while started.elapsed() < length {
            once()?;
            times += 1;
        }
        Ok((times, started.elapsed() / times.max(1)))
    };
    run(std::time::Duration::from_secs(1))?;
    let seconds = env_or("MQPLUG_BENCH_SECONDS", 10) as u64;
    run(std::time::Duration::from_secs(seconds))
}

/// mqplug's publisher on `topic`, with the topic created on the broker
/// (4 queues).
pub async fn topic_publisher(
    mq: &mqplug::mq::MqRuntime,
    name_server: &str,
    topic: &mqplug::topic::TopicName,
) -> anyhow::Result<mqplug::mq::Publisher> {
    let mut publisher = mqplug::mq::Publisher::start(
        mq,
        mqplug::mq::ProducerSettings::new(name_server.to_string(), topic.clone()),
    )
    .await?;
    publisher.create_topic(4).await?;
    Ok(publisher)
}
