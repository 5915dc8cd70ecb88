//! Counters and histograms fed by [`HostEvent`]s, written in the Prometheus
//! text format for `/metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::observe::{HostEvent, Observer, OutboundResult};
use crate::wasm::PoolUsage;

/// Upper bounds of the handler duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct PluginCounters {
    /// By RocketMQ outcome: `success`, `retry_later`.
    messages: BTreeMap<&'static str, u64>,
    /// By failure kind: `rejected`, `trap`, `deadline`, ...
    failures: BTreeMap<&'static str, u64>,
    /// Cumulative counts per bucket, then the count and sum.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
    /// By (result, source): (`ok`|`failed`, `compiled`|`cache`).
    loads: BTreeMap<(&'static str, &'static str), u64>,
    /// Log lines dropped over the plugin's budget.
    logs_dropped: u64,
    /// Outbound HTTP requests by result: `response`, `refused`, `failed`.
    outbound: BTreeMap<&'static str, u64>,
    /// Seconds until the response head, summed, of those answered.
    outbound_seconds: f64,
    /// Key-value calls by result: `ok`, `refused`, `failed`.
    key_value: BTreeMap<&'static str, u64>,
    /// Follow-up messages by (topic, `sent`|`failed`).
    follow_ups: BTreeMap<(String, &'static str), u64>,
    /// Handler durations of the last [`RECENT_WINDOW`], for the status page's
    /// percentiles (at most [`MAX_RECENT`]).
    recent: VecDeque<(Instant, Duration)>,
    /// The last [`MAX_RELOADS`] loads and reloads, newest last.
    reloads: VecDeque<LoadRecord>,
}

/// How far back the status page's latency percentiles look.
pub const RECENT_WINDOW: Duration = Duration::from_secs(60);
/// Most handler durations kept for them per plugin.
const MAX_RECENT: usize = 20_000;
/// Loads and reloads kept per plugin.
const MAX_RELOADS: usize = 5;

/// One load or reload of a plugin, for the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadRecord {
    pub at: SystemTime,
    /// The build's digest (its first 12 hex digits).
    pub version: String,
    /// `Err` with why the build was refused (its predecessor kept serving).
    pub result: Result<(), String>,
    pub from_cache: bool,
}

/// Handler latency over the last [`RECENT_WINDOW`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecentLatency {
    pub events: usize,
    pub p50: Duration,
    pub p99: Duration,
}

/// Every plugin's counters. Cheap to update from any thread.
#[derive(Default)]
pub struct Metrics {
    plugins: Mutex<BTreeMap<Arc<str>, PluginCounters>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// An observer that counts what the host reports.
    pub fn observer(self: &Arc<Self>) -> Observer {
        let metrics = self.clone();
        Arc::new(move |event: &HostEvent| metrics.record(event))
    }

    fn record(&self, event: &HostEvent) {
        // One lock for every plugin's counters, taken only by the events that
        // count. Measured against per-plugin atomic counters (BENCHMARKS.md,
        // "Counting a message"), it is the cheaper of the two on 2 cores.
        match event {
            HostEvent::Handled {
                plugin,
                outcome,
                failure,
                duration,
                ..
            } => {
                let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
                let counters = plugins.entry(plugin.clone()).or_default();
                let outcome = outcome.as_str();
                *counters.messages.entry(outcome).or_default() += 1;
                if let Some(kind) = failure {
                    *counters.failures.entry(kind.as_str()).or_default() += 1;
                }
                let seconds = duration.as_secs_f64();
                for (bucket, bound) in counters.buckets.iter_mut().zip(BUCKETS) {
                    if seconds <= bound {
                        *bucket += 1;
                    }
                }
                counters.count += 1;
                counters.sum_seconds += seconds;
                let now = Instant::now();
                counters.recent.push_back((now, *duration));
                while counters.recent.len() > MAX_RECENT
                    || counters
                        .recent
                        .front()
                        .is_some_and(|(at, _)| now.duration_since(*at) > RECENT_WINDOW)
                {
                    counters.recent.pop_front();
                }
            }
            HostEvent::Loaded {
                plugin,
                version,
                result,
                from_cache,
                ..
            } => {
                let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
                let counters = plugins.entry(plugin.clone()).or_default();
                counters.reloads.push_back(LoadRecord {
                    at: SystemTime::now(),
                    version: version.chars().take(12).collect(),
                    result: result.clone(),
                    from_cache: *from_cache,
                });
                if counters.reloads.len() > MAX_RELOADS {
                    counters.reloads.pop_front();
                }
                let result = if result.is_ok() { "ok" } else { "failed" };
                let source = if *from_cache { "cache" } else { "compiled" };
                *counters.loads.entry((result, source)).or_default() += 1;
            }
            HostEvent::LogsDropped { plugin, lines } => {
                let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
                plugins.entry(plugin.clone()).or_default().logs_dropped += lines;
            }
            HostEvent::Outbound {
                plugin,
                result,
                took,
            } => {
                let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
                let counters = plugins.entry(plugin.clone()).or_default();
                let result = match result {
                    OutboundResult::Response(_) => {
                        counters.outbound_seconds += took.as_secs_f64();
                        "response"
                    }
                    OutboundResult::Refused => "refused",
                    OutboundResult::Failed => "failed",
                };
                *counters.outbound.entry(result).or_default() += 1;
            }
            HostEvent::KeyValue { plugin, result } => {
                let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
                let counters = plugins.entry(plugin.clone()).or_default();
                *counters.key_value.entry(result.as_str()).or_default() += 1;
            }
            HostEvent::FollowUps {
                plugin,
                topics,
                sent,
            } => {
                let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
                let counters = plugins.entry(plugin.clone()).or_default();
                let result = if *sent { "sent" } else { "failed" };
                for topic in topics {
                    *counters
                        .follow_ups
                        .entry((topic.clone(), result))
                        .or_default() += 1;
                }
            }
            HostEvent::PluginLog { .. }
            | HostEvent::Draining { .. }
            | HostEvent::Stopped { .. } => {}
        }
    }

    /// Key-value calls of a plugin by result (`ok`, `refused`, `failed`).
    pub fn key_value(&self, plugin: &str) -> BTreeMap<&'static str, u64> {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        plugins
            .get(plugin)
            .map(|counters| counters.key_value.clone())
            .unwrap_or_default()
    }

    /// Follow-up messages of a plugin by result (`sent`, `failed`), over
    /// every topic.
    pub fn follow_ups(&self, plugin: &str) -> BTreeMap<&'static str, u64> {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        let mut totals = BTreeMap::new();
        if let Some(counters) = plugins.get(plugin) {
            for ((_, result), n) in &counters.follow_ups {
                *totals.entry(*result).or_default() += n;
            }
        }
        totals
    }

    /// Failures of a plugin by kind (`rejected`, `trap`, `deadline`, ...).
    pub fn failures(&self, plugin: &str) -> BTreeMap<&'static str, u64> {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        plugins
            .get(plugin)
            .map(|counters| counters.failures.clone())
            .unwrap_or_default()
    }

    /// The plugin's last loads and reloads, oldest first.
    pub fn reloads(&self, plugin: &str) -> Vec<LoadRecord> {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        plugins
            .get(plugin)
            .map(|counters| counters.reloads.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Handler latency percentiles over the last [`RECENT_WINDOW`].
    pub fn recent_latency(&self, plugin: &str) -> RecentLatency {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut durations: Vec<Duration> = plugins
            .get(plugin)
            .map(|counters| {
                counters
                    .recent
                    .iter()
                    .filter(|(at, _)| now.duration_since(*at) <= RECENT_WINDOW)
                    .map(|(_, took)| *took)
                    .collect()
            })
            .unwrap_or_default();
        drop(plugins);
        durations.sort_unstable();
        let at = |q: f64| -> Duration {
            if durations.is_empty() {
                return Duration::ZERO;
            }
            // Nearest rank.
            let rank = (q * durations.len() as f64).ceil() as usize;
            durations[rank.clamp(1, durations.len()) - 1]
        };
        RecentLatency {
            events: durations.len(),
            p50: at(0.50),
            p99: at(0.99),
        }
    }

    /// Handled messages of a plugin by outcome (`success`, `retry_later`).
    pub fn messages(&self, plugin: &str, outcome: &str) -> u64 {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        plugins
            .get(plugin)
            .and_then(|c| c.messages.get(outcome).copied())
            .unwrap_or(0)
    }

    /// Loads of a plugin by result (`ok`, `failed`) and source (`compiled`, `cache`).
    pub fn loads(&self, plugin: &str, result: &str, source: &str) -> u64 {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        plugins
            .get(plugin)
            .and_then(|c| {
                c.loads
                    .iter()
                    .find(|((r, s), _)| *r == result && *s == source)
                    .map(|(_, n)| *n)
            })
            .unwrap_or(0)
    }

    /// The Prometheus text format. `versions` are the serving builds, written
    /// as `mqplug_plugin_info`.
    pub fn render(&self, versions: &[(String, String)]) -> String {
        let plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        family(
            &mut out,
            "mqplug_plugin_info",
            "gauge",
            "The build each plugin serves (version = SHA-256 of its wasm file).",
        );
        for (plugin, version) in versions {
            let _ = writeln!(
                out,
                "mqplug_plugin_info{{plugin=\"{}\",version=\"{}\"}} 1",
                label(plugin),
                label(version)
            );
        }
        counter_by_plugin(
            &mut out,
            &plugins,
            ("mqplug_messages_total", "outcome"),
            "Messages handled, by plugin and the outcome RocketMQ was told.",
            |counters| &counters.messages,
        );
        counter_by_plugin(
            &mut out,
            &plugins,
            ("mqplug_failures_total", "kind"),
            "Messages not acknowledged, by plugin and why (rejected, trap, deadline, memory_limit, out_of_fuel, host, undecodable).",
            |counters| &counters.failures,
        );
        family(
            &mut out,
            "mqplug_handler_duration_seconds",
            "histogram",
            "Decoding plus the handler call, per message.",
        );
        for (plugin, counters) in plugins.iter() {
            let plugin = label(plugin);
            for (n, bound) in counters.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "mqplug_handler_duration_seconds_bucket{{plugin=\"{plugin}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "mqplug_handler_duration_seconds_bucket{{plugin=\"{plugin}\",le=\"+Inf\"}} {}\nmqplug_handler_duration_seconds_sum{{plugin=\"{plugin}\"}} {}\nmqplug_handler_duration_seconds_count{{plugin=\"{plugin}\"}} {}",
                counters.count, counters.sum_seconds, counters.count
            );
        }
        family(
            &mut out,
            "mqplug_log_lines_dropped_total",
            "counter",
            "Plugin log lines dropped over the plugin's lines or bytes per second.",
        );
        for (plugin, counters) in plugins.iter() {
            let _ = writeln!(
                out,
                "mqplug_log_lines_dropped_total{{plugin=\"{}\"}} {}",
                label(plugin),
                counters.logs_dropped
            );
        }
        family(
            &mut out,
            "mqplug_outbound_requests_total",
            "counter",
            "Plugins' outbound HTTP requests, by result (response, refused by the grants, failed).",
        );
        for (plugin, counters) in plugins.iter() {
            for (result, n) in &counters.outbound {
                let _ = writeln!(
                    out,
                    "mqplug_outbound_requests_total{{plugin=\"{}\",result=\"{result}\"}} {n}",
                    label(plugin)
                );
            }
        }
        family(
            &mut out,
            "mqplug_key_value_calls_total",
            "counter",
            "Plugins' key-value calls, by result (ok, refused: a limit, the deadline or a bucket not granted, failed: the store).",
        );
        for (plugin, counters) in plugins.iter() {
            for (result, n) in &counters.key_value {
                let _ = writeln!(
                    out,
                    "mqplug_key_value_calls_total{{plugin=\"{}\",result=\"{result}\"}} {n}",
                    label(plugin)
                );
            }
        }
        family(
            &mut out,
            "mqplug_follow_ups_total",
            "counter",
            "Plugins' follow-up messages, by topic and result (sent; failed: the event is retried and sends them again).",
        );
        for (plugin, counters) in plugins.iter() {
            for ((topic, result), n) in &counters.follow_ups {
                let _ = writeln!(
                    out,
                    "mqplug_follow_ups_total{{plugin=\"{}\",topic=\"{}\",result=\"{result}\"}} {n}",
                    label(plugin),
                    label(topic)
                );
            }
        }
        family(
            &mut out,
            "mqplug_outbound_response_seconds_sum",
            "counter",
            "Seconds until the response head, summed over answered outbound requests.",
        );
        for (plugin, counters) in plugins.iter() {
            if counters.outbound.contains_key("response") {
                let _ = writeln!(
                    out,
                    "mqplug_outbound_response_seconds_sum{{plugin=\"{}\"}} {}",
                    label(plugin),
                    counters.outbound_seconds
                );
            }
        }
        family(
            &mut out,
            "mqplug_plugin_loads_total",
            "counter",
            "Plugin loads and reloads, by result (ok, failed) and source (compiled, cache).",
        );
        for (plugin, counters) in plugins.iter() {
            for ((result, source), n) in &counters.loads {
                let _ = writeln!(
                    out,
                    "mqplug_plugin_loads_total{{plugin=\"{}\",result=\"{result}\",source=\"{source}\"}} {n}",
                    label(plugin)
                );
            }
        }
        out
    }
}

/// The gauges read at scrape time: the pooling allocator's live slots and
/// the process's resident memory.
/// `mqplug_consumer_lag_messages`: for each (plugin, group, waiting), the
/// messages waiting in the plugin's group, as RocketMQ's own exporter names
/// its `rocketmq_consumer_lag_messages`.
pub fn render_lag(groups: &[(String, String, u64)]) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "mqplug_consumer_lag_messages",
        "gauge",
        "Messages waiting in the plugin's consumer group: the queues' ends minus the group's committed offsets, read every 5 s.",
    );
    for (plugin, group, waiting) in groups {
        let _ = writeln!(
            out,
            "mqplug_consumer_lag_messages{{plugin=\"{}\",group=\"{}\"}} {waiting}",
            label(plugin),
            label(group)
        );
    }
    out
}

pub fn render_gauges(pool: &PoolUsage) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "mqplug_pool_live",
        "gauge",
        "Slots of the wasm pooling allocator in use, by kind; freed when an instance is dropped.",
    );
    for (kind, n) in [
        ("component_instances", pool.component_instances),
        ("core_instances", pool.core_instances),
        ("memories", pool.memories as u64),
        ("tables", pool.tables as u64),
    ] {
        let _ = writeln!(out, "mqplug_pool_live{{kind=\"{kind}\"}} {n}");
    }
    family(
        &mut out,
        "mqplug_pool_capacity_component_instances",
        "gauge",
        "Component instances the pool can hold (runtime.max_instances).",
    );
    let _ = writeln!(
        out,
        "mqplug_pool_capacity_component_instances {}",
        pool.max_component_instances
    );
    if let Some(bytes) = resident_memory_bytes() {
        family(
            &mut out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the mqplug process.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {bytes}");
    }
    out
}

/// The process's resident set size, from `VmRSS` in `/proc/self/status`
/// (Linux only).
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Writes a counter family labelled by plugin and one more label `key`,
/// with the counts `counts` picks from each plugin's counters.
fn counter_by_plugin(
    out: &mut String,
    plugins: &BTreeMap<Arc<str>, PluginCounters>,
    (name, key): (&str, &str),
    help: &str,
    counts: impl Fn(&PluginCounters) -> &BTreeMap<&'static str, u64>,
) {
    family(out, name, "counter", help);
    for (plugin, counters) in plugins {
        for (value, n) in counts(counters) {
            let _ = writeln!(
                out,
                "{name}{{plugin=\"{}\",{key}=\"{value}\"}} {n}",
                label(plugin)
            );
        }
    }
}

/// Writes a metric family's `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::FailureKind;
    use crate::outcome::DeliveryOutcome;

    fn handled(outcome: DeliveryOutcome, failure: Option<FailureKind>, ms: u64) -> HostEvent {
        HostEvent::Handled {
            plugin: Arc::from("p\"1"),
            message_id: "m".into(),
            reconsume_times: 0,
            outcome,
            cause: None,
            version: None,
            failure,
            duration: Duration::from_millis(ms),
        }
    }

    #[test]
    fn the_status_page_gets_recent_percentiles_and_the_last_reloads() {
        let metrics = Metrics::new();
        let observe = metrics.observer();
        assert_eq!(metrics.recent_latency("p\"1").events, 0);
        // 1..=100 ms: the median is 50 ms, the 99th percentile 99 ms.
        for ms in (1..=100).rev() {
            observe(&handled(DeliveryOutcome::ConsumeSuccess, None, ms));
        }
        let recent = metrics.recent_latency("p\"1");
        assert_eq!(recent.events, 100);
        assert_eq!(recent.p50, Duration::from_millis(50));
        assert_eq!(recent.p99, Duration::from_millis(99));
        for i in 0..7 {
            observe(&HostEvent::Loaded {
                plugin: Arc::from("p\"1"),
                version: Arc::from(format!("{i}123456789abcdef").as_str()),
                result: if i == 6 {
                    Err("not a component".into())
                } else {
                    Ok(())
                },
                from_cache: i % 2 == 0,
                took: Duration::from_millis(3),
            });
        }
        let reloads = metrics.reloads("p\"1");
        assert_eq!(reloads.len(), 5, "the last five");
        assert_eq!(reloads[0].version, "2123456789ab");
        assert_eq!(reloads[4].result, Err("not a component".to_string()));
    }

    #[test]
    fn counts_outcomes_failures_durations_and_loads() {
        let metrics = Metrics::new();
        let observe = metrics.observer();
        observe(&handled(DeliveryOutcome::ConsumeSuccess, None, 2));
        observe(&handled(
            DeliveryOutcome::ConsumeRetryLater,
            Some(FailureKind::Trap),
            200,
        ));
        observe(&HostEvent::Loaded {
            plugin: Arc::from("p\"1"),
            version: Arc::from("abc"),
            result: Err("bad".into()),
            from_cache: false,
            took: Duration::from_millis(3),
        });
        observe(&HostEvent::LogsDropped {
            plugin: Arc::from("p\"1"),
            lines: 320,
        });
        let text = metrics.render(&[("p\"1".into(), "abc".into())]);
        for line in [
            "mqplug_plugin_info{plugin=\"p\\\"1\",version=\"abc\"} 1",
            "mqplug_messages_total{plugin=\"p\\\"1\",outcome=\"success\"} 1",
            "mqplug_messages_total{plugin=\"p\\\"1\",outcome=\"retry_later\"} 1",
            "mqplug_failures_total{plugin=\"p\\\"1\",kind=\"trap\"} 1",
            "mqplug_handler_duration_seconds_bucket{plugin=\"p\\\"1\",le=\"0.005\"} 1",
            "mqplug_handler_duration_seconds_bucket{plugin=\"p\\\"1\",le=\"0.5\"} 2",
            "mqplug_handler_duration_seconds_count{plugin=\"p\\\"1\"} 2",
            "mqplug_plugin_loads_total{plugin=\"p\\\"1\",result=\"failed\",source=\"compiled\"} 1",
            "mqplug_log_lines_dropped_total{plugin=\"p\\\"1\"} 320",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        assert_eq!(metrics.messages("p\"1", "success"), 1);
        let gauges = render_gauges(&PoolUsage {
            component_instances: 3,
            core_instances: 12,
            memories: 5,
            tables: 4,
            max_component_instances: 256,
        });
        for line in [
            "mqplug_pool_live{kind=\"component_instances\"} 3",
            "mqplug_pool_live{kind=\"memories\"} 5",
            "mqplug_pool_capacity_component_instances 256",
        ] {
            assert!(gauges.contains(line), "missing {line}:\n{gauges}");
        }
        let rss = resident_memory_bytes().expect("Linux has /proc/self/statm");
        assert!(rss > 1 << 20, "a test process holds more than 1 MiB: {rss}");
        assert_eq!(metrics.loads("p\"1", "failed", "compiled"), 1);
    }
}
