//! Counters and histograms fed by [`HostEvent`]s, written in the Prometheus
//! text format for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::observe::{FailureKind, HostEvent, Observer};
use crate::outcome::DeliveryOutcome;
use crate::wasm::PoolUsage;

/// Upper bounds of the handler duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// RocketMQ outcomes, as counted.
const OUTCOMES: [&str; 2] = ["success", "retry_later"];
/// Plugin load results and where the compiled component came from.
const LOADS: [(&str, &str); 4] = [
    ("ok", "compiled"),
    ("ok", "cache"),
    ("failed", "compiled"),
    ("failed", "cache"),
];

/// One plugin's counters: atomics, so counting a message takes no lock.
#[derive(Default)]
struct PluginCounters {
    /// By RocketMQ outcome, indexed like [`OUTCOMES`].
    messages: [AtomicU64; OUTCOMES.len()],
    /// By failure kind, indexed like [`FailureKind::ALL`].
    failures: [AtomicU64; FailureKind::ALL.len()],
    /// Cumulative counts per bucket, then the count and sum.
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    /// Indexed like [`LOADS`].
    loads: [AtomicU64; LOADS.len()],
}

/// Every plugin's counters. Counting takes a shared read of the plugin map
/// (written only when a plugin is seen for the first time) and atomic adds:
/// no lock that one message holds against another.
#[derive(Default)]
pub struct Metrics {
    plugins: RwLock<BTreeMap<Arc<str>, Arc<PluginCounters>>>,
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

    fn counters(&self, plugin: &Arc<str>) -> Arc<PluginCounters> {
        if let Some(counters) = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(plugin)
        {
            return counters.clone();
        }
        self.plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(plugin.clone())
            .or_default()
            .clone()
    }

    fn existing(&self, plugin: &str) -> Option<Arc<PluginCounters>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(plugin)
            .cloned()
    }

    fn record(&self, event: &HostEvent) {
        match event {
            HostEvent::Handled {
                plugin,
                outcome,
                failure,
                duration,
                ..
            } => {
                let counters = self.counters(plugin);
                let outcome = match outcome {
                    DeliveryOutcome::ConsumeSuccess => 0,
                    DeliveryOutcome::ConsumeRetryLater => 1,
                };
                counters.messages[outcome].fetch_add(1, Ordering::Relaxed);
                if let Some(kind) = failure {
                    counters.failures[kind.index()].fetch_add(1, Ordering::Relaxed);
                }
                let seconds = duration.as_secs_f64();
                for (bucket, bound) in counters.buckets.iter().zip(BUCKETS) {
                    if seconds <= bound {
                        bucket.fetch_add(1, Ordering::Relaxed);
                    }
                }
                counters.count.fetch_add(1, Ordering::Relaxed);
                let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
                counters.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
            }
            HostEvent::Loaded {
                plugin,
                result,
                from_cache,
                ..
            } => {
                let load = (
                    if result.is_ok() { "ok" } else { "failed" },
                    if *from_cache { "cache" } else { "compiled" },
                );
                let index = LOADS.iter().position(|l| *l == load).unwrap_or(0);
                self.counters(plugin).loads[index].fetch_add(1, Ordering::Relaxed);
            }
            HostEvent::PluginLog { .. }
            | HostEvent::Draining { .. }
            | HostEvent::Stopped { .. } => {}
        }
    }

    /// Handled messages of a plugin by outcome (`success`, `retry_later`).
    pub fn messages(&self, plugin: &str, outcome: &str) -> u64 {
        let index = OUTCOMES.iter().position(|o| *o == outcome);
        match (self.existing(plugin), index) {
            (Some(counters), Some(index)) => counters.messages[index].load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Loads of a plugin by result (`ok`, `failed`) and source (`compiled`, `cache`).
    pub fn loads(&self, plugin: &str, result: &str, source: &str) -> u64 {
        let index = LOADS.iter().position(|l| *l == (result, source));
        match (self.existing(plugin), index) {
            (Some(counters), Some(index)) => counters.loads[index].load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// The Prometheus text format. `versions` are the serving builds, written
    /// as `mqplug_plugin_info`.
    pub fn render(&self, versions: &[(String, String)]) -> String {
        let plugins = self
            .plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
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
            |counters| OUTCOMES.iter().copied().zip(&counters.messages).collect(),
        );
        counter_by_plugin(
            &mut out,
            &plugins,
            ("mqplug_failures_total", "kind"),
            "Messages not acknowledged, by plugin and why (rejected, trap, deadline, memory_limit, out_of_fuel, host, undecodable).",
            |counters| {
                FailureKind::ALL
                    .iter()
                    .map(|kind| kind.as_str())
                    .zip(&counters.failures)
                    .collect()
            },
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
                let n = n.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "mqplug_handler_duration_seconds_bucket{{plugin=\"{plugin}\",le=\"{bound}\"}} {n}"
                );
            }
            let count = counters.count.load(Ordering::Relaxed);
            let sum_seconds = counters.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "mqplug_handler_duration_seconds_bucket{{plugin=\"{plugin}\",le=\"+Inf\"}} {count}\nmqplug_handler_duration_seconds_sum{{plugin=\"{plugin}\"}} {sum_seconds}\nmqplug_handler_duration_seconds_count{{plugin=\"{plugin}\"}} {count}"
            );
        }
        family(
            &mut out,
            "mqplug_plugin_loads_total",
            "counter",
            "Plugin loads and reloads, by result (ok, failed) and source (compiled, cache).",
        );
        for (plugin, counters) in plugins.iter() {
            for ((result, source), n) in LOADS.iter().zip(&counters.loads) {
                let n = n.load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
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
/// with the counts `counts` picks from each plugin's counters; counts still
/// at zero are left out.
fn counter_by_plugin(
    out: &mut String,
    plugins: &BTreeMap<Arc<str>, Arc<PluginCounters>>,
    (name, key): (&str, &str),
    help: &str,
    counts: impl Fn(&PluginCounters) -> Vec<(&'static str, &AtomicU64)>,
) {
    family(out, name, "counter", help);
    for (plugin, counters) in plugins {
        for (value, n) in counts(counters) {
            let n = n.load(Ordering::Relaxed);
            if n == 0 {
                continue;
            }
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
    use std::time::Duration;

    use super::*;

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
