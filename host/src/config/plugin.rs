//! `[[plugin]]`: one plugin's entry, its checks and the settings built from
//! it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::grants::{
    check_config_table, default_http_max_in_flight, default_http_max_response_bytes,
    default_http_timeout_ms,
};
use super::{
    ConfigError, KeyValueConfig, LISTENER_TIMEOUT_MS, MAX_DEADLINE_MS, MAX_HTTP_IN_FLIGHT,
    MAX_HTTP_RESPONSE_BYTES, MIB, RuntimeConfig, SecretSource,
};
use crate::canary::CanaryConfig;
use crate::mq::{ConsumeFrom, ConsumerSettings};
use crate::observe::Observers;
use crate::recorded::RecordFailuresConfig;
use crate::topic::TopicName;
use crate::wasm::{
    ConfigValues, InstanceMode, KeyValueGrants, Network, Origin, OutboundGrants, OutboundLimits,
    PluginSettings, PublishGrants, read_ca_file,
};

/// One plugin and the consumer that feeds it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Used in logs and in the default consumer group.
    pub name: String,
    /// The component file; relative paths are relative to the config file.
    pub path: PathBuf,
    /// Consumer group; default `mqplug-<name>`. Each plugin has its own, so
    /// one plugin's retries never re-run another's successes.
    pub group: Option<String>,
    /// RocketMQ tag expression: `*`, or event types like `A || B`.
    #[serde(default = "default_tags")]
    pub tags: String,
    /// Messages handled at once by this plugin.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Messages handed to one listener call (RocketMQ's
    /// `consumeMessageBatchMaxSize`), in their handlers at once on its
    /// thread, each still with its own outcome. 1 (the default) hands each
    /// message over alone. More cuts the client's per-message thread
    /// hand-off and keeps `concurrency` x `batch` handlers waiting on
    /// `concurrency` threads; the batch must fit the listener timeout
    /// (`batch` x `deadline_ms` at most 28,000), and a plugin with
    /// follow-ups (`allowed_topics`) keeps 1.
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// Redeliveries before the broker dead-letters a message.
    #[serde(default = "default_max_reconsume_times")]
    pub max_reconsume_times: i32,
    /// Messages this plugin's consumer holds ahead of its handler, over all
    /// its queues (RocketMQ's `pullThresholdForTopic`). Unset: the client's
    /// default of 1,000 per queue. Each plugin's group prefetches its own
    /// copy of a backlog, so a host with many plugins may lower it.
    #[serde(default)]
    pub prefetch: Option<u32>,
    #[serde(default)]
    pub instance_mode: InstanceMode,
    /// Per-event deadline; keep well under the client's 30 s listener timeout.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    #[serde(default = "default_memory_limit_mb")]
    pub memory_limit_mb: usize,
    /// Log lines per second this plugin may write; the excess is dropped and
    /// counted in a warning.
    #[serde(default = "default_log_lines_per_second")]
    pub log_lines_per_second: u32,
    /// Log bytes per second, besides the lines; the excess is dropped and
    /// counted likewise.
    #[serde(default = "default_log_bytes_per_second")]
    pub log_bytes_per_second: u64,
    /// Where a new consumer group starts: `last` (default) or `first`.
    #[serde(default)]
    pub consume_from: ConsumeFrom,
    /// Fuel per event (about one unit per wasm instruction); needs
    /// `runtime.fuel = true`. Unset: no fuel limit.
    #[serde(default)]
    pub fuel_per_event: Option<u64>,
    /// Grant the plugin the host's stdout and stderr (e.g. while debugging a
    /// plugin that prints). Default: what it prints is discarded.
    #[serde(default)]
    pub inherit_stdio: bool,
    /// Values the plugin reads through `wasi:config/store` (`[plugin.config]`).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Secrets the plugin reads through `wasi:config/store`
    /// (`[plugin.secrets]`, e.g. `token = { env = "REWARDS_TOKEN" }` or
    /// `{ file = "/run/secrets/token" }`): where the host reads each value,
    /// never the value itself. Read at every load and reload.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
    /// Origins the plugin may send HTTP requests to
    /// (`wasi:http/outgoing-handler`), e.g. `["http://127.0.0.1:8080"]`;
    /// scheme, host and port must match. None by default.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// Internal address ranges (`10.0.0.0/8`) a granted name may resolve
    /// to; without them only public addresses, or an address a grant names
    /// literally, are reached.
    #[serde(default)]
    pub allowed_outbound_networks: Vec<String>,
    /// One request's time limit; the guest may shorten it, and the event's
    /// deadline ends it anyway.
    #[serde(default = "default_http_timeout_ms")]
    pub http_timeout_ms: u64,
    /// A response body longer than this is an error the guest sees.
    #[serde(default = "default_http_max_response_bytes")]
    pub http_max_response_bytes: u64,
    /// Requests of this plugin in flight at once; more are refused
    /// (`connection-limit-reached`).
    #[serde(default = "default_http_max_in_flight")]
    pub http_max_in_flight: usize,
    /// A PEM file of CA certificates the plugin's `https` origins may be
    /// signed by, besides the system's roots (an internal CA); relative
    /// paths are relative to the config file. Read at every load.
    #[serde(default)]
    pub http_ca_file: Option<PathBuf>,
    /// Topics the plugin may publish follow-up messages to (the `publish`
    /// import), as configured (`marketing.reward.granted`); needs the
    /// built-in producer (`[producer] enabled = true`). None by default.
    #[serde(default)]
    pub allowed_topics: Vec<String>,
    /// `wasi:keyvalue` buckets (`[plugin.key_value]`, e.g.
    /// `buckets = ["seen"]`) in the host's store. None by default.
    #[serde(default)]
    pub key_value: Option<KeyValueConfig>,
    /// A candidate build beside this one (`[plugin.canary]`: `path`,
    /// `percent`, `window`, `min_events`): it handles that share of users
    /// with the entry's grants, and is rolled back by itself when it does
    /// measurably worse. None by default.
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
    /// Write down each event the plugin fails with what it saw
    /// (`[plugin.record_failures]`: `dir`, `max_mb`), for `mqplug dlq
    /// export`. Off by default.
    #[serde(default)]
    pub record_failures: Option<RecordFailuresConfig>,
}

pub(super) fn default_tags() -> String {
    "*".to_string()
}

/// The largest `prefetch` the RocketMQ client accepts (its bound on
/// `pullThresholdForTopic`).
pub const MAX_PREFETCH: u32 = 6_553_500;

pub(super) fn default_concurrency() -> u32 {
    4
}

pub(super) fn default_max_reconsume_times() -> i32 {
    16
}

/// The SDKs' `Once` holds its claim for config `dedupe_lease_ms`: a lease
/// that ends before the handler's deadline lets a second delivery start
/// the effect while the first still runs it.
pub(super) fn check_dedupe_lease(plugin: &PluginConfig) -> Result<(), String> {
    let Some(lease) = plugin.config.get("dedupe_lease_ms") else {
        return Ok(());
    };
    match lease.trim().parse::<u64>() {
        Ok(lease) if lease > plugin.deadline_ms => Ok(()),
        Ok(lease) => Err(format!(
            "config dedupe_lease_ms = {lease} must be above deadline_ms = {}: a claim that \
             ends while its handler may still run lets another delivery do the effect too",
            plugin.deadline_ms
        )),
        Err(_) => Err(format!(
            "config dedupe_lease_ms = {:?} is not a whole number of milliseconds",
            crate::text::inert(lease, 64)
        )),
    }
}

/// The most messages one listener call takes (`batch`).
pub const MAX_BATCH: u32 = 32;

pub(super) fn default_batch() -> u32 {
    1
}

pub(super) fn default_deadline_ms() -> u64 {
    5000
}

pub(super) fn default_memory_limit_mb() -> usize {
    64
}

pub(super) fn default_log_bytes_per_second() -> u64 {
    PluginSettings::new("").log_bytes_per_second
}

pub(super) fn default_log_lines_per_second() -> u32 {
    1000
}

impl PluginConfig {
    /// A plugin with every setting at its default.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        PluginConfig {
            name: name.into(),
            path: path.into(),
            group: None,
            tags: default_tags(),
            concurrency: default_concurrency(),
            batch: default_batch(),
            max_reconsume_times: default_max_reconsume_times(),
            prefetch: None,
            instance_mode: InstanceMode::default(),
            deadline_ms: default_deadline_ms(),
            memory_limit_mb: default_memory_limit_mb(),
            log_lines_per_second: default_log_lines_per_second(),
            log_bytes_per_second: default_log_bytes_per_second(),
            consume_from: ConsumeFrom::default(),
            fuel_per_event: None,
            inherit_stdio: false,
            config: BTreeMap::new(),
            secrets: BTreeMap::new(),
            allowed_outbound_hosts: Vec::new(),
            allowed_outbound_networks: Vec::new(),
            http_timeout_ms: default_http_timeout_ms(),
            http_max_response_bytes: default_http_max_response_bytes(),
            http_max_in_flight: default_http_max_in_flight(),
            http_ca_file: None,
            allowed_topics: Vec::new(),
            key_value: None,
            canary: None,
            record_failures: None,
        }
    }

    /// The consumer group: configured, or `mqplug-<name>` with characters
    /// RocketMQ rejects replaced by `-`.
    pub fn group(&self) -> String {
        self.group.clone().unwrap_or_else(|| {
            let name: String = self
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            format!("mqplug-{name}")
        })
    }

    /// The sandbox settings, with the secrets read from where the entry
    /// says; the error names the secret and where it was looked for.
    pub fn plugin_settings(&self) -> Result<PluginSettings, ConfigError> {
        let mut secrets = BTreeMap::new();
        for (key, source) in &self.secrets {
            let value = source.read().map_err(|why| ConfigError::Plugin {
                plugin: self.name.clone(),
                problem: format!("secret {key:?}: {why}"),
            })?;
            secrets.insert(key.clone(), value);
        }
        let problem = |problem: String| ConfigError::Plugin {
            plugin: self.name.clone(),
            problem,
        };
        let (origins, networks) = self.outbound_grants().map_err(problem)?;
        let ca = match &self.http_ca_file {
            Some(path) => {
                read_ca_file(path).map_err(|why| problem(format!("http_ca_file: {why}")))?
            }
            None => Vec::new(),
        };
        let topics = self
            .allowed_topics
            .iter()
            .map(|topic| {
                TopicName::new(topic).map_err(|err| problem(format!("allowed_topics: {err}")))
            })
            .collect::<Result<_, _>>()?;
        let config = Arc::new(ConfigValues::new(&self.config, secrets));
        Ok(PluginSettings {
            key_value: Arc::new(
                self.key_value
                    .as_ref()
                    .map_or_else(KeyValueGrants::none, KeyValueConfig::grants),
            ),
            config: config.clone(),
            publish: Arc::new(PublishGrants::new(topics)),
            outbound: Arc::new(
                OutboundGrants::new(
                    &self.name,
                    origins,
                    networks,
                    OutboundLimits {
                        timeout: Duration::from_millis(self.http_timeout_ms),
                        max_response_bytes: self.http_max_response_bytes,
                        max_in_flight: self.http_max_in_flight,
                    },
                    Observers::default(),
                )
                .trusting(ca)
                .redacting(config),
            ),
            name: self.name.clone(),
            deadline: Duration::from_millis(self.deadline_ms),
            memory_limit_bytes: self.memory_limit_mb.saturating_mul(MIB),
            instance_mode: self.instance_mode,
            log_lines_per_second: self.log_lines_per_second,
            log_bytes_per_second: self.log_bytes_per_second,
            fuel_per_event: self.fuel_per_event,
            inherit_stdio: self.inherit_stdio,
            record_failures: self.record_failures.is_some(),
        })
    }

    /// The parsed `allowed_outbound_hosts` and `allowed_outbound_networks`.
    pub fn outbound_grants(&self) -> Result<(Vec<Origin>, Vec<Network>), String> {
        let origins = self
            .allowed_outbound_hosts
            .iter()
            .map(|origin| {
                Origin::parse(origin).map_err(|why| format!("allowed_outbound_hosts: {why}"))
            })
            .collect::<Result<_, _>>()?;
        let networks = self
            .allowed_outbound_networks
            .iter()
            .map(|network| {
                Network::parse(network).map_err(|why| format!("allowed_outbound_networks: {why}"))
            })
            .collect::<Result<_, _>>()?;
        Ok((origins, networks))
    }

    pub fn consumer_settings(&self, name_server: &str, topic: &TopicName) -> ConsumerSettings {
        ConsumerSettings {
            name_server: name_server.to_string(),
            group: self.group(),
            topic: topic.clone(),
            tags: self.tags.clone(),
            concurrency: self.concurrency,
            batch: self.batch,
            max_reconsume_times: self.max_reconsume_times,
            prefetch: self.prefetch,
            consume_from: self.consume_from,
            // In-flight handlers finish within their deadline; wait a little longer.
            drain_timeout: Duration::from_millis(self.deadline_ms + 2000),
        }
    }

    /// Checks this entry on its own, before anything connects: its limits,
    /// grants and topics. `consumed` is the host's topic; follow-ups need
    /// the producer; limits stay within `runtime`'s.
    pub(super) fn check(
        &self,
        consumed: &TopicName,
        producer_enabled: bool,
        runtime: &RuntimeConfig,
    ) -> Result<(), String> {
        if let Some(key_value) = &self.key_value {
            key_value.check(&self.name)?;
        }
        if let Some(problem) = self.canary.as_ref().and_then(CanaryConfig::problem) {
            return Err(problem);
        }
        if let Some(problem) = self
            .record_failures
            .as_ref()
            .and_then(RecordFailuresConfig::problem)
        {
            return Err(problem);
        }
        if self.deadline_ms == 0 || self.deadline_ms > MAX_DEADLINE_MS {
            return Err(format!(
                "deadline_ms = {} must be between 1 and {MAX_DEADLINE_MS} (at least \
                 {} ms below the RocketMQ client's {LISTENER_TIMEOUT_MS} ms listener timeout)",
                self.deadline_ms,
                LISTENER_TIMEOUT_MS - MAX_DEADLINE_MS
            ));
        }
        check_config_table(self)?;
        check_dedupe_lease(self)?;
        self.outbound_grants()?;
        for topic in &self.allowed_topics {
            let topic = TopicName::new(topic).map_err(|err| format!("allowed_topics: {err}"))?;
            if let Some(why) = topic.reserved() {
                return Err(format!(
                    "allowed_topics: {topic} is not a topic a plugin may publish to: {why}"
                ));
            }
            if topic.wire() == consumed.wire() {
                return Err(format!(
                    "allowed_topics: {topic} is the topic this host consumes: every plugin, \
                     this one too, would handle its own follow-ups again, without end"
                ));
            }
        }
        if !self.allowed_topics.is_empty() && !producer_enabled {
            return Err(
                "allowed_topics needs the built-in producer: set [producer] enabled = true".into(),
            );
        }
        if self.http_timeout_ms == 0 {
            return Err("http_timeout_ms must be at least 1".into());
        }
        if !(1..=MAX_HTTP_RESPONSE_BYTES).contains(&self.http_max_response_bytes) {
            return Err(format!(
                "http_max_response_bytes must be between 1 and {MAX_HTTP_RESPONSE_BYTES}"
            ));
        }
        if !(1..=MAX_HTTP_IN_FLIGHT).contains(&self.http_max_in_flight) {
            return Err(format!(
                "http_max_in_flight must be between 1 and {MAX_HTTP_IN_FLIGHT}"
            ));
        }
        if self.fuel_per_event.is_some() && !runtime.fuel {
            return Err("fuel_per_event needs runtime.fuel = true (fuel counting is off)".into());
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return Err(format!("batch must be between 1 and {MAX_BATCH}"));
        }
        if u64::from(self.batch) * self.deadline_ms > super::MAX_DEADLINE_MS {
            return Err(format!(
                "batch = {} with deadline_ms = {} may take {} ms in one listener call, over the {} ms it may take: \
                 lower batch or deadline_ms",
                self.batch,
                self.deadline_ms,
                u64::from(self.batch) * self.deadline_ms,
                super::MAX_DEADLINE_MS
            ));
        }
        if self.batch > 1 && !self.allowed_topics.is_empty() {
            return Err(
                "batch > 1 with allowed_topics: follow-ups need the whole listener timeout of each message; keep batch = 1"
                    .into(),
            );
        }
        if let Some(prefetch) = self.prefetch
            && !(1..=MAX_PREFETCH).contains(&prefetch)
        {
            return Err(format!(
                "prefetch = {prefetch} must be between 1 and {MAX_PREFETCH}"
            ));
        }
        if self.memory_limit_mb > runtime.max_memory_mb {
            return Err(format!(
                "memory_limit_mb = {} is over runtime.max_memory_mb = {}",
                self.memory_limit_mb, runtime.max_memory_mb
            ));
        }
        Ok(())
    }
}
