//! The host's configuration file (TOML). Unknown keys are errors that name
//! the key, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::event::DEFAULT_MAX_BODY_BYTES;
use crate::mq::{Backoff, ConsumeFrom, ConsumerSettings, DEFAULT_PRODUCER_GROUP, ProducerSettings};
use crate::observe::Observers;
use crate::outcome::UndecodablePolicy;
use crate::store::check_bucket_name;
use crate::topic::{DEFAULT_TOPIC, TopicName, TopicNameError, check_resource_name};
use crate::wasm::{
    ConfigValues, InstanceMode, KeyValueGrants, KeyValueLimits, Network, Origin, OutboundGrants,
    OutboundLimits, PluginSettings, PublishGrants, RuntimeSettings, StoreSettings, read_ca_file,
};

pub const DEFAULT_NAME_SERVER: &str = "127.0.0.1:9876";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config file {}: {cause}", path.display())]
    Parse {
        path: PathBuf,
        cause: toml::de::Error,
    },
    #[error(transparent)]
    Topic(#[from] TopicNameError),
    #[error("plugin {plugin}: {problem}")]
    Plugin { plugin: String, problem: String },
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("credentials: {0}")]
    Credentials(String),
}

/// Admin connections a host may hold at most: each costs a descriptor the
/// broker client also needs.
pub const MAX_ADMIN_CONNECTIONS: usize = 4096;

/// The whole configuration. Every key is optional except the plugins' `name`
/// and `path`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Name server address(es), `;`-separated.
    #[serde(default = "default_name_server")]
    pub name_server: String,
    /// The topic as users know it; dots become underscores on the wire.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// What to do with a body that is not a task event.
    #[serde(default)]
    pub on_undecodable: UndecodablePolicy,
    /// Bodies over this size are undecodable.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    #[serde(default)]
    pub producer: ProducerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Where plugins' `wasi:keyvalue` buckets live.
    #[serde(default)]
    pub store: StoreConfig,
    /// The RocketMQ user (ACL 2.0) the host connects as, when the cluster
    /// asks for credentials: for its consumers, its producer and the tools.
    #[serde(default)]
    pub credentials: Option<CredentialsConfig>,
    /// Where the host exports its traces (OTLP/HTTP); no spans without it.
    #[serde(default)]
    pub traces: Option<TracesConfig>,
    /// The file this config was read from, if any; hot reload watches it.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// Settings given on the command line, applied over the file's at start
    /// and again on every reload of the file.
    #[serde(skip)]
    pub overrides: Overrides,
}

/// Settings from the command line (or environment) that beat the config
/// file's, also after the file changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub name_server: Option<String>,
    pub topic: Option<String>,
    /// Plugins added with `--plugin NAME=PATH`, besides the file's.
    pub plugins: Vec<PluginConfig>,
    /// `--admin-listen`: an address, or `off`.
    pub admin_listen: Option<String>,
}

/// The admin HTTP listener: /healthz, /readyz, /plugins, /metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Address to bind; keep it on loopback unless something guards it.
    /// Port 0 picks a free port (logged at start-up).
    pub listen: String,
    /// Connections served at once. At the cap, the oldest connection that
    /// has not yet sent its request is closed to make room; if every one is
    /// mid-request, the new connection is closed instead.
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:9900".into(),
            max_connections: 64,
        }
    }
}

/// Hot reload of plugin files and of the config's plugin list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Watch the plugin files and the config file.
    pub watch: bool,
    /// How often files are checked.
    pub poll_ms: u64,
    /// A changed file is read only after its size and modification time have
    /// stayed the same this long, so a file still being written is not read.
    pub settle_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            poll_ms: 250,
            settle_ms: 500,
        }
    }
}

/// Where plugins' `wasi:keyvalue` buckets live (`[store]`). Opened when
/// the first plugin with a `key_value` table loads; a change needs a
/// restart.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// `embedded`: the database file (relative paths are relative to the
    /// config file). Default `$MQPLUG_DATA_DIR/state.redb`, else
    /// `$XDG_DATA_HOME/mqplug/state.redb`, else
    /// `~/.local/share/mqplug/state.redb`. One host process at a time.
    pub path: Option<PathBuf>,
    /// `redis`: the server, `redis://host:port/db` (`rediss://` is not
    /// built in).
    pub url: Option<String>,
    /// `redis`: what every key starts with; hosts that share state share it.
    pub prefix: String,
    /// `redis`: the time limit of connecting and of each command.
    pub timeout_ms: u64,
}

/// The store's kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreBackend {
    /// One redb file on this machine: durable, nothing to start.
    #[default]
    Embedded,
    /// A Redis that hosts on several machines share.
    Redis,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Embedded,
            path: None,
            url: None,
            prefix: "mqplug".into(),
            timeout_ms: 1000,
        }
    }
}

/// The longest `[store] timeout_ms`.
pub const MAX_STORE_TIMEOUT_MS: u64 = 30_000;

impl StoreConfig {
    /// The settings the wasm runtime opens the store with.
    pub fn settings(&self) -> Result<StoreSettings, String> {
        match self.backend {
            StoreBackend::Embedded => {
                let path = self.path.clone().or_else(default_state_path).ok_or(
                    "store.path is not set and there is no $MQPLUG_DATA_DIR, $XDG_DATA_HOME or $HOME to put it in",
                )?;
                Ok(StoreSettings::Embedded { path })
            }
            StoreBackend::Redis => {
                let url = self
                    .url
                    .clone()
                    .ok_or("store.backend = \"redis\" needs store.url (redis://host:port/db)")?;
                if !url.starts_with("redis://") {
                    return Err(format!(
                        "store.url must start with redis:// (got {:?})",
                        crate::text::inert(&crate::text::url_without_secrets(&url), 128)
                    ));
                }
                check_bucket_name(&self.prefix).map_err(|why| format!("store.prefix: {why}"))?;
                if !(1..=MAX_STORE_TIMEOUT_MS).contains(&self.timeout_ms) {
                    return Err(format!(
                        "store.timeout_ms = {} must be between 1 and {MAX_STORE_TIMEOUT_MS}",
                        self.timeout_ms
                    ));
                }
                Ok(StoreSettings::Redis {
                    url,
                    prefix: self.prefix.clone(),
                    timeout: Duration::from_millis(self.timeout_ms),
                })
            }
        }
    }
}

fn default_state_path() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("MQPLUG_DATA_DIR") {
        return Some(PathBuf::from(dir).join("state.redb"));
    }
    let data = var("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".local/share")))?;
    Some(data.join("mqplug").join("state.redb"))
}

/// A plugin's `wasi:keyvalue` grant (`[plugin.key_value]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyValueConfig {
    /// The buckets it may open, e.g. `["seen"]`; its own, whatever other
    /// plugins call theirs.
    pub buckets: Vec<String>,
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: usize,
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
    /// Keys and values over all its buckets, in MiB.
    #[serde(default = "default_max_total_mb")]
    pub max_total_mb: u64,
}

fn default_max_key_bytes() -> usize {
    KeyValueLimits::default().max_key_bytes
}
fn default_max_value_bytes() -> usize {
    KeyValueLimits::default().max_value_bytes
}
fn default_max_total_mb() -> u64 {
    KeyValueLimits::default().max_total_bytes / MIB as u64
}

/// The largest `max_key_bytes`, `max_value_bytes` and `max_total_mb`.
pub const MAX_KV_KEY_BYTES: usize = 4096;
pub const MAX_KV_VALUE_BYTES: usize = 16 * 1024 * 1024;
pub const MAX_KV_TOTAL_MB: u64 = 64 * 1024;

impl KeyValueConfig {
    fn check(&self, plugin: &str) -> Result<(), String> {
        if self.buckets.is_empty() {
            return Err("key_value.buckets names no bucket".into());
        }
        for bucket in &self.buckets {
            check_bucket_name(bucket).map_err(|why| format!("key_value.buckets: {why}"))?;
        }
        // The plugin's name is part of every key (`<plugin>:<bucket>:` in
        // Redis): it must not be able to reach into another's.
        check_bucket_name(plugin).map_err(|why| {
            format!("a plugin with key_value needs a name a store can keep apart: {why}")
        })?;
        let bounds = [
            (
                "max_key_bytes",
                self.max_key_bytes as u64,
                MAX_KV_KEY_BYTES as u64,
            ),
            (
                "max_value_bytes",
                self.max_value_bytes as u64,
                MAX_KV_VALUE_BYTES as u64,
            ),
            ("max_total_mb", self.max_total_mb, MAX_KV_TOTAL_MB),
        ];
        for (name, value, max) in bounds {
            if !(1..=max).contains(&value) {
                return Err(format!(
                    "key_value.{name} = {value} must be between 1 and {max}"
                ));
            }
        }
        Ok(())
    }

    fn grants(&self) -> KeyValueGrants {
        KeyValueGrants::new(
            self.buckets.iter().cloned(),
            KeyValueLimits {
                max_key_bytes: self.max_key_bytes,
                max_value_bytes: self.max_value_bytes,
                max_total_bytes: self.max_total_mb.saturating_mul(MIB as u64),
            },
        )
    }
}

/// Engine-wide limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Plugin instances alive at once, over all plugins.
    pub max_instances: u32,
    /// The most memory any plugin may be given, in MiB.
    pub max_memory_mb: usize,
    /// Count fuel, so plugins may set `fuel_per_event`. Costs every plugin
    /// 15-36 % per event.
    pub fuel: bool,
    /// Keep compiled plugins on disk, so a restart or a reload of a known
    /// build skips compilation.
    pub compile_cache: bool,
    /// Where; default `$MQPLUG_CACHE_DIR/components`, else
    /// `~/.cache/mqplug/components`. Its MAC key is kept beside it
    /// (`<folder>.key`); a folder others can write is not used.
    pub cache_dir: Option<PathBuf>,
    /// The most MiB of compiled plugins kept; least recently used go first.
    pub cache_max_mb: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let defaults = RuntimeSettings::default();
        RuntimeConfig {
            max_instances: defaults.max_instances,
            max_memory_mb: defaults.max_memory_bytes / MIB,
            fuel: defaults.fuel,
            compile_cache: true,
            cache_dir: None,
            cache_max_mb: defaults.cache_max_bytes / MIB as u64,
        }
    }
}

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
}

fn default_http_timeout_ms() -> u64 {
    OutboundLimits::default().timeout.as_millis() as u64
}

fn default_http_max_response_bytes() -> u64 {
    OutboundLimits::default().max_response_bytes
}

fn default_http_max_in_flight() -> usize {
    OutboundLimits::default().max_in_flight
}

/// The largest `http_max_response_bytes`.
pub const MAX_HTTP_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
/// The largest `http_max_in_flight`.
pub const MAX_HTTP_IN_FLIGHT: usize = 256;

/// `[traces]`: the OpenTelemetry collector the host exports a span to for
/// each message each plugin handles (see [`crate::traces`]). Read at start;
/// a change takes a restart.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The collector's OTLP/HTTP address, such as `http://127.0.0.1:4318`
    /// (`/v1/traces` is added when it has no path).
    pub endpoint: String,
    /// The `service.name` the spans carry.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "mqplug".into()
}

/// `[credentials]`: where the host reads the access key and secret key of
/// the RocketMQ user it connects as; like a plugin's secrets, never
/// written in the config itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    pub access_key: SecretSource,
    pub secret_key: SecretSource,
}

impl CredentialsConfig {
    /// Both keys, read now; the error names where each was looked for.
    pub fn read(&self) -> Result<crate::mq::Credentials, ConfigError> {
        let read = |what: &str, source: &SecretSource| {
            source
                .read()
                .map_err(|why| ConfigError::Credentials(format!("{what}: {why}")))
        };
        Ok(crate::mq::Credentials {
            access_key: read("access_key", &self.access_key)?,
            secret_key: read("secret_key", &self.secret_key)?,
        })
    }
}

/// Where the host reads one secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "where to read the secret: { env = \"VARIABLE\" } or { file = \"/path\" } \
                 (a secret's value is never written in the config)"
)]
pub struct SecretSource {
    /// An environment variable of the host process.
    pub env: Option<String>,
    /// A file (relative paths are relative to the config file); one
    /// trailing newline is dropped.
    pub file: Option<PathBuf>,
}

/// Longest config key or secret name.
pub const MAX_CONFIG_KEY_BYTES: usize = 256;
/// Longest config value or secret.
pub const MAX_CONFIG_VALUE_BYTES: usize = 64 * 1024;

impl SecretSource {
    /// The secret's value; the error names where it was looked for, never
    /// what was found.
    fn read(&self) -> Result<String, String> {
        let whence = match (&self.env, &self.file) {
            (Some(var), None) => format!("environment variable {var}"),
            (None, Some(path)) => format!("file {}", path.display()),
            _ => String::new(),
        };
        let mut value = match (&self.env, &self.file) {
            (Some(var), None) => std::env::var(var)
                .map_err(|_| format!("environment variable {var} is not set (or not UTF-8)"))?,
            (None, Some(path)) => {
                let bytes = std::fs::read(path)
                    .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
                String::from_utf8(bytes)
                    .map_err(|_| format!("{} is not UTF-8 text", path.display()))?
            }
            _ => return Err("give exactly one of `env` or `file`".into()),
        };
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
        if value.is_empty() {
            return Err(format!("{whence} is empty"));
        }
        if value.len() > MAX_CONFIG_VALUE_BYTES {
            return Err(format!("{whence} is over {MAX_CONFIG_VALUE_BYTES} bytes"));
        }
        Ok(value)
    }
}

/// Keys and values of `[plugin.config]` and `[plugin.secrets]`: bounded,
/// no key in both, each secret with one source. Secret values are read at
/// load, not here.
fn check_config_table(plugin: &PluginConfig) -> Result<(), String> {
    let keys = plugin.config.keys().chain(plugin.secrets.keys());
    for key in keys {
        if key.is_empty() || key.len() > MAX_CONFIG_KEY_BYTES {
            return Err(format!(
                "config key {:?} must be 1 to {MAX_CONFIG_KEY_BYTES} bytes",
                crate::text::inert(key, 64)
            ));
        }
    }
    for (key, value) in &plugin.config {
        if value.len() > MAX_CONFIG_VALUE_BYTES {
            return Err(format!(
                "config value {key:?} is over {MAX_CONFIG_VALUE_BYTES} bytes"
            ));
        }
        if plugin.secrets.contains_key(key) {
            return Err(format!(
                "{key:?} is both a config value and a secret; keep one"
            ));
        }
    }
    for (key, source) in &plugin.secrets {
        if source.env.is_some() == source.file.is_some() {
            return Err(format!(
                "secret {key:?}: give exactly one of `env` or `file`"
            ));
        }
    }
    Ok(())
}

/// The built-in producer: off unless `enabled`, like the platform's nil producer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    pub enabled: bool,
    pub group: String,
    pub retries: u32,
    pub send_timeout_ms: u64,
    /// Create the topic with this many queues at start-up (for local brokers;
    /// leave unset against a managed cluster).
    pub create_topic_queues: Option<i32>,
    /// After the client's own immediate retries fail, try again this many
    /// times, pausing `backoff_initial_ms`, doubling, at most `backoff_max_ms`.
    pub backoff_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            enabled: false,
            group: DEFAULT_PRODUCER_GROUP.to_string(),
            retries: 2,
            send_timeout_ms: 3000,
            create_topic_queues: None,
            backoff_attempts: 4,
            backoff_initial_ms: 200,
            backoff_max_ms: 5000,
        }
    }
}

const MIB: usize = 1024 * 1024;
/// The RocketMQ client counts a listener running past 30 s as failed.
const LISTENER_TIMEOUT_MS: u64 = 30_000;
/// The longest deadline a plugin may have: 2 s below the listener timeout,
/// room for instantiation, decoding and acknowledging around the handler.
pub const MAX_DEADLINE_MS: u64 = LISTENER_TIMEOUT_MS - 2_000;

/// `$MQPLUG_CACHE_DIR/components`, else `$XDG_CACHE_HOME/mqplug/components`,
/// else `~/.cache/mqplug/components`.
fn default_cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("MQPLUG_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("components"));
    }
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join("mqplug").join("components"))
}

fn default_name_server() -> String {
    DEFAULT_NAME_SERVER.to_string()
}
fn default_topic() -> String {
    DEFAULT_TOPIC.to_string()
}
fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_tags() -> String {
    "*".to_string()
}

/// The largest `prefetch` the RocketMQ client accepts (its bound on
/// `pullThresholdForTopic`).
pub const MAX_PREFETCH: u32 = 6_553_500;

fn default_concurrency() -> u32 {
    4
}
fn default_max_reconsume_times() -> i32 {
    16
}
/// The SDKs' `Once` holds its claim for config `dedupe_lease_ms`: a lease
/// that ends before the handler's deadline lets a second delivery start
/// the effect while the first still runs it.
fn check_dedupe_lease(plugin: &PluginConfig) -> Result<(), String> {
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

fn default_deadline_ms() -> u64 {
    5000
}
fn default_memory_limit_mb() -> usize {
    64
}
fn default_log_bytes_per_second() -> u64 {
    PluginSettings::new("").log_bytes_per_second
}

fn default_log_lines_per_second() -> u32 {
    1000
}

impl Default for HostConfig {
    fn default() -> Self {
        toml::from_str("").expect("the empty config is valid")
    }
}

impl HostConfig {
    /// The credentials of `[credentials]`, read now; `None` without it.
    pub fn credentials(&self) -> Result<Option<crate::mq::Credentials>, ConfigError> {
        self.credentials
            .as_ref()
            .map(CredentialsConfig::read)
            .transpose()
    }

    /// Applies `overrides` over this config and keeps them, so a reload of
    /// the file can apply them again.
    pub fn apply(&mut self, overrides: Overrides) {
        if let Some(name_server) = &overrides.name_server {
            self.name_server.clone_from(name_server);
        }
        if let Some(topic) = &overrides.topic {
            self.topic.clone_from(topic);
        }
        self.plugins.extend(overrides.plugins.iter().cloned());
        if let Some(listen) = &overrides.admin_listen {
            self.admin.enabled = listen != "off";
            self.admin.listen.clone_from(listen);
        }
        self.overrides = overrides;
    }

    /// Reads a config file; plugin paths become relative to its folder.
    pub fn from_file(path: &Path) -> Result<HostConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        HostConfig::from_text(&text, path)
    }

    /// Parses a config file's `text`; `path` is where it was read from
    /// (relative plugin paths are relative to its folder).
    pub fn from_text(text: &str, path: &Path) -> Result<HostConfig, ConfigError> {
        let mut config: HostConfig = toml::from_str(text).map_err(|cause| ConfigError::Parse {
            path: path.to_path_buf(),
            cause,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for plugin in &mut config.plugins {
            if plugin.path.is_relative() {
                plugin.path = base.join(&plugin.path);
            }
            for source in plugin.secrets.values_mut() {
                if let Some(file) = source.file.as_mut().filter(|file| file.is_relative()) {
                    *file = base.join(&*file);
                }
            }
            if let Some(file) = plugin
                .http_ca_file
                .as_mut()
                .filter(|file| file.is_relative())
            {
                *file = base.join(&*file);
            }
        }
        if let Some(file) = config.store.path.as_mut().filter(|file| file.is_relative()) {
            *file = base.join(&*file);
        }
        if let Some(credentials) = config.credentials.as_mut() {
            for source in [&mut credentials.access_key, &mut credentials.secret_key] {
                if let Some(file) = source.file.as_mut().filter(|file| file.is_relative()) {
                    *file = base.join(&*file);
                }
            }
        }
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    pub fn topic(&self) -> Result<TopicName, TopicNameError> {
        TopicName::new(&self.topic)
    }

    pub fn runtime_settings(&self) -> RuntimeSettings {
        RuntimeSettings {
            max_instances: self.runtime.max_instances,
            max_memory_bytes: self.runtime.max_memory_mb.saturating_mul(MIB),
            fuel: self.runtime.fuel,
            cache_dir: self
                .runtime
                .compile_cache
                .then(|| self.runtime.cache_dir.clone().or_else(default_cache_dir))
                .flatten(),
            cache_max_bytes: self.runtime.cache_max_mb.saturating_mul(MIB as u64),
            // Checked by `validate`; a config that was not is refused at the
            // first plugin with a bucket.
            store: self.store.settings().unwrap_or(StoreSettings::Embedded {
                path: PathBuf::new(),
            }),
        }
    }

    pub fn producer_settings(&self) -> Result<ProducerSettings, ConfigError> {
        Ok(ProducerSettings {
            name_server: self.name_server.clone(),
            group: self.producer.group.clone(),
            topic: self.topic()?,
            retries: self.producer.retries,
            send_timeout: Duration::from_millis(self.producer.send_timeout_ms),
            backoff: Backoff {
                attempts: self.producer.backoff_attempts,
                initial: Duration::from_millis(self.producer.backoff_initial_ms),
                max: Duration::from_millis(self.producer.backoff_max_ms),
            },
        })
    }

    /// Listener threads the plugins use at once: the sum of their concurrency.
    pub fn listener_threads(&self) -> usize {
        self.plugins.iter().map(|p| p.concurrency as usize).sum()
    }

    /// Instances the plugins may need at once: each plugin's concurrency,
    /// plus one for a reload.
    pub fn instances_needed(&self) -> u64 {
        self.plugins
            .iter()
            .map(|p| u64::from(p.concurrency) + 1)
            .sum()
    }

    /// Whether this plugin list fits the pools a running host was sized
    /// with at start (`listener_capacity` client listener threads,
    /// `max_instances` wasm instances); the reason when it does not.
    pub fn fits_pools(
        &self,
        listener_capacity: usize,
        max_instances: u32,
    ) -> Result<(), ConfigError> {
        let threads = self.listener_threads();
        if threads > listener_capacity {
            return Err(ConfigError::Runtime(format!(
                "the plugins' concurrency adds up to {threads} listener threads, over the \
                 {listener_capacity} the running host was started with; restart mqplug to apply \
                 this plugin list"
            )));
        }
        let wanted = self.instances_needed();
        if wanted > u64::from(max_instances) {
            return Err(ConfigError::Runtime(format!(
                "the plugins may need {wanted} instances at once, over the {max_instances} the \
                 running host's wasm pool holds; restart mqplug to apply this plugin list"
            )));
        }
        Ok(())
    }

    /// Checks everything that can be checked before connecting anywhere.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.topic()?;
        if let Some(traces) = &self.traces
            && !(traces.endpoint.starts_with("http://") || traces.endpoint.starts_with("https://"))
        {
            return Err(ConfigError::Runtime(format!(
                "traces.endpoint = {:?} must be an http:// or https:// URL (OTLP over HTTP)",
                traces.endpoint
            )));
        }
        if self.plugins.iter().any(|plugin| plugin.key_value.is_some()) {
            self.store.settings().map_err(ConfigError::Runtime)?;
        }
        if !(1..=MAX_ADMIN_CONNECTIONS).contains(&self.admin.max_connections) {
            return Err(ConfigError::Runtime(format!(
                "admin.max_connections = {} must be between 1 and {MAX_ADMIN_CONNECTIONS}",
                self.admin.max_connections
            )));
        }
        let mut names = std::collections::HashSet::new();
        // Group -> the plugin that has it: two plugins in one group would
        // split its queues and each see only part of the topic.
        let mut groups = std::collections::HashMap::new();
        for plugin in &self.plugins {
            let problem = |problem: String| ConfigError::Plugin {
                plugin: plugin.name.clone(),
                problem,
            };
            if !names.insert(plugin.name.as_str()) {
                return Err(problem("the name is used by another plugin".into()));
            }
            let group = plugin.group();
            check_resource_name(&group)
                .map_err(|bad| problem(format!("consumer group {group:?}: {bad}")))?;
            if let Some(other) = groups.insert(group.clone(), plugin.name.as_str()) {
                return Err(problem(format!(
                    "consumer group {group:?} is also plugin {other:?}'s (names map to groups \
                     with characters RocketMQ rejects replaced by '-'); set `group` on one of them"
                )));
            }
            if let Some(key_value) = &plugin.key_value {
                key_value.check(&plugin.name).map_err(problem)?;
            }
            if plugin.deadline_ms == 0 || plugin.deadline_ms > MAX_DEADLINE_MS {
                return Err(problem(format!(
                    "deadline_ms = {} must be between 1 and {MAX_DEADLINE_MS} (at least \
                     {} ms below the RocketMQ client's {LISTENER_TIMEOUT_MS} ms listener timeout)",
                    plugin.deadline_ms,
                    LISTENER_TIMEOUT_MS - MAX_DEADLINE_MS
                )));
            }
            check_config_table(plugin).map_err(problem)?;
            check_dedupe_lease(plugin).map_err(problem)?;
            plugin.outbound_grants().map_err(problem)?;
            let consumed = self.topic()?;
            for topic in &plugin.allowed_topics {
                let topic = TopicName::new(topic)
                    .map_err(|err| problem(format!("allowed_topics: {err}")))?;
                if let Some(why) = topic.reserved() {
                    return Err(problem(format!(
                        "allowed_topics: {topic} is not a topic a plugin may publish to: {why}"
                    )));
                }
                if topic.wire() == consumed.wire() {
                    return Err(problem(format!(
                        "allowed_topics: {topic} is the topic this host consumes: every plugin, \
                         this one too, would handle its own follow-ups again, without end"
                    )));
                }
            }
            if !plugin.allowed_topics.is_empty() && !self.producer.enabled {
                return Err(problem(
                    "allowed_topics needs the built-in producer: set [producer] enabled = true"
                        .into(),
                ));
            }
            if plugin.http_timeout_ms == 0 {
                return Err(problem("http_timeout_ms must be at least 1".into()));
            }
            if !(1..=MAX_HTTP_RESPONSE_BYTES).contains(&plugin.http_max_response_bytes) {
                return Err(problem(format!(
                    "http_max_response_bytes must be between 1 and {MAX_HTTP_RESPONSE_BYTES}"
                )));
            }
            if !(1..=MAX_HTTP_IN_FLIGHT).contains(&plugin.http_max_in_flight) {
                return Err(problem(format!(
                    "http_max_in_flight must be between 1 and {MAX_HTTP_IN_FLIGHT}"
                )));
            }
            if plugin.fuel_per_event.is_some() && !self.runtime.fuel {
                return Err(problem(
                    "fuel_per_event needs runtime.fuel = true (fuel counting is off)".into(),
                ));
            }
            if plugin.concurrency == 0 {
                return Err(problem("concurrency must be at least 1".into()));
            }
            if let Some(prefetch) = plugin.prefetch
                && !(1..=MAX_PREFETCH).contains(&prefetch)
            {
                return Err(problem(format!(
                    "prefetch = {prefetch} must be between 1 and {MAX_PREFETCH}"
                )));
            }
            if plugin.memory_limit_mb > self.runtime.max_memory_mb {
                return Err(problem(format!(
                    "memory_limit_mb = {} is over runtime.max_memory_mb = {}",
                    plugin.memory_limit_mb, self.runtime.max_memory_mb
                )));
            }
        }
        // Each event in flight holds an instance of its own, and a reload
        // instantiates the new build while the old one may still be busy.
        let wanted = self.instances_needed();
        if wanted > u64::from(self.runtime.max_instances) {
            return Err(ConfigError::Runtime(format!(
                "the plugins may need {wanted} instances at once (each plugin's concurrency, \
                 plus one for a reload), over runtime.max_instances = {}",
                self.runtime.max_instances
            )));
        }
        Ok(())
    }
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
            max_reconsume_times: self.max_reconsume_times,
            prefetch: self.prefetch,
            consume_from: self.consume_from,
            // In-flight handlers finish within their deadline; wait a little longer.
            drain_timeout: Duration::from_millis(self.deadline_ms + 2000),
        }
    }
}

#[cfg(test)]
mod keys;

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys `examples/mqplug.toml` shows, set or commented out: each
    /// `key = ...` line under its `[section]` (or `[[section]]`), and each
    /// section header itself.
    fn keys_shown(example: &str) -> std::collections::BTreeSet<String> {
        let mut shown = std::collections::BTreeSet::new();
        let mut section = String::new();
        for line in example.lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(header) = line.strip_prefix('[') {
                let name = header.trim_start_matches('[');
                if let Some(end) = name.find(']') {
                    section = name[..end].trim().to_string();
                    shown.insert(section.clone());
                }
                continue;
            }
            if let Some((key, value)) = line.split_once('=') {
                let key = key.trim();
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    let path = if section.is_empty() {
                        key.to_string()
                    } else {
                        format!("{section}.{key}")
                    };
                    // `{ env = ... }`: the table's own keys are its to say.
                    if value.trim_start().starts_with('{') {
                        shown.insert(format!("{path}.*"));
                    }
                    shown.insert(path);
                }
            }
        }
        shown
    }

    #[test]
    fn the_example_config_shows_every_key_a_config_may_hold() {
        let keys = keys::keys_of::<HostConfig>();
        // The walk found the sections and what is inside them.
        for key in [
            "name_server",
            "plugin.name",
            "plugin.key_value.buckets",
            "store.backend",
        ] {
            assert!(keys.contains(key), "{key} not found in {keys:?}");
        }
        let example = include_str!("../../examples/mqplug.toml");
        let shown = keys_shown(example);
        let missing: Vec<&String> = keys
            .iter()
            .filter(|key| {
                !shown.contains(*key)
                    && !key
                        .rsplit_once('.')
                        .is_some_and(|(table, _)| shown.contains(&format!("{table}.*")))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "examples/mqplug.toml does not show {missing:?} (it says it lists every key)"
        );
    }

    #[test]
    fn the_example_config_parses_with_every_key_at_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mqplug.toml");
        let example = HostConfig::from_file(&path).unwrap();
        example.validate().unwrap();
        let defaults = HostConfig::default();
        assert_eq!(example.name_server, defaults.name_server);
        assert_eq!(
            example.runtime.compile_cache,
            defaults.runtime.compile_cache
        );
        assert_eq!(example.reload.poll_ms, defaults.reload.poll_ms);
        assert_eq!(example.reload.settle_ms, defaults.reload.settle_ms);
        assert_eq!(example.admin.listen, defaults.admin.listen);
        let plugin = &example.plugins[0];
        let default_plugin = PluginConfig::new(&plugin.name, &plugin.path);
        assert_eq!(plugin, &default_plugin);
    }

    fn parse(text: &str) -> Result<HostConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn an_empty_file_gives_the_platform_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.name_server, "127.0.0.1:9876");
        assert_eq!(config.topic().unwrap().wire(), "marketing_task_completed");
        assert!(!config.producer.enabled);
        assert_eq!(config.producer.group, "marketing-producer-group");
        assert_eq!(config.producer.retries, 2);
        assert_eq!(config.on_undecodable, UndecodablePolicy::Retry);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = parse("name_servr = 'x'").unwrap_err().to_string();
        assert!(err.contains("unknown field `name_servr`"), "{err}");
        let err = parse("[[plugin]]\nname='a'\npath='a.wasm'\nconcurency=2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `concurency`"), "{err}");
        let err = parse("[producer]\nenable = true").unwrap_err().to_string();
        assert!(err.contains("unknown field `enable`"), "{err}");
    }

    #[test]
    fn prefetch_is_bounded_and_reaches_the_consumer() {
        let with = |prefetch: &str| {
            parse(&format!(
                "[[plugin]]\nname = 'a'\npath = 'a.wasm'\nprefetch = {prefetch}\n"
            ))
            .unwrap()
        };
        let config = with("64");
        config.validate().unwrap();
        let topic = TopicName::new("t").unwrap();
        assert_eq!(
            config.plugins[0].consumer_settings("ns", &topic).prefetch,
            Some(64)
        );
        for bad in ["0", &(MAX_PREFETCH + 1).to_string()] {
            let err = with(bad).validate().unwrap_err().to_string();
            assert!(
                err.contains(&format!("prefetch = {bad} must be between 1 and 6553500")),
                "{err}"
            );
        }
        let unset = PluginConfig::new("a", "a.wasm");
        assert_eq!(unset.consumer_settings("ns", &topic).prefetch, None);
    }

    #[test]
    fn the_plugins_concurrency_must_fit_in_the_instance_pool() {
        let config = parse(
            "[runtime]\nmax_instances = 10\n\
             [[plugin]]\nname = 'a'\npath = 'a.wasm'\nconcurrency = 4\n\
             [[plugin]]\nname = 'b'\npath = 'b.wasm'\nconcurrency = 4\n",
        )
        .unwrap();
        config.validate().unwrap();
        let mut config = config;
        config.plugins[1].concurrency = 5;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("need 11 instances") && err.contains("runtime.max_instances = 10"),
            "{err}"
        );
    }

    #[test]
    fn stdio_is_granted_only_by_the_plugins_own_config() {
        let config = parse(
            "[[plugin]]\nname = 'loud'\npath = 'l.wasm'\ninherit_stdio = true\n\
             [[plugin]]\nname = 'quiet'\npath = 'q.wasm'\n",
        )
        .unwrap();
        let grants: Vec<bool> = config.plugins.iter().map(|p| p.inherit_stdio).collect();
        assert_eq!(grants, [true, false]);
    }

    #[test]
    fn plugins_get_their_own_group_by_default() {
        let config = parse(
            "[[plugin]]\nname = 'reward logger'\npath = 'r.wasm'\n\
             [[plugin]]\nname = 'audit'\npath = 'a.wasm'\ngroup = 'audit-team'\ninstance_mode = 'fresh-per-event'",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.plugins[0].group(), "mqplug-reward-logger");
        assert_eq!(config.plugins[1].group(), "audit-team");
        assert_eq!(config.plugins[1].instance_mode, InstanceMode::FreshPerEvent);
    }

    #[test]
    fn validation_names_the_plugin_and_the_problem() {
        let config = parse("[[plugin]]\nname='slow'\npath='s.wasm'\ndeadline_ms=60000").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("plugin slow: deadline_ms = 60000"), "{err}");
        let config =
            parse("[[plugin]]\nname='a'\npath='a'\n[[plugin]]\nname='a'\npath='b'").unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("used by another")
        );
        let config = parse("topic = 'marketing task'").unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn names_that_map_to_one_consumer_group_are_refused() {
        let config =
            parse("[[plugin]]\nname='a.b'\npath='a'\n[[plugin]]\nname='a-b'\npath='b'").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("plugin a-b: consumer group \"mqplug-a-b\" is also plugin \"a.b\"'s"),
            "{err}"
        );
        let config = parse(
            "[[plugin]]\nname='a'\npath='a'\ngroup='team'\n[[plugin]]\nname='b'\npath='b'\ngroup='team'",
        )
        .unwrap();
        assert!(config.validate().is_err(), "an explicit group collides too");
    }

    #[test]
    fn a_plugin_list_that_outgrows_the_running_pools_is_refused_with_the_reason() {
        let config = parse(
            "[[plugin]]\nname='a'\npath='a'\nconcurrency=8\n[[plugin]]\nname='b'\npath='b'\nconcurrency=8",
        )
        .unwrap();
        config.fits_pools(16, 18).unwrap();
        let threads = config.fits_pools(15, 256).unwrap_err().to_string();
        assert!(
            threads.contains("16 listener threads, over the 15"),
            "{threads}"
        );
        let instances = config.fits_pools(64, 17).unwrap_err().to_string();
        assert!(
            instances.contains("18 instances at once, over the 17"),
            "{instances}"
        );
    }

    #[test]
    fn a_deadline_keeps_two_seconds_below_the_listener_timeout() {
        let deadline = |ms: u64| {
            parse(&format!("[[plugin]]\nname='p'\npath='p'\ndeadline_ms={ms}"))
                .unwrap()
                .validate()
        };
        deadline(MAX_DEADLINE_MS).unwrap();
        for ms in [0, MAX_DEADLINE_MS + 1, LISTENER_TIMEOUT_MS - 1] {
            let err = deadline(ms).unwrap_err().to_string();
            assert!(err.contains("must be between 1 and 28000"), "{ms}: {err}");
        }
    }

    #[test]
    fn a_dedupe_lease_must_outlast_the_deadline() {
        let lease = |lease: &str| {
            parse(&format!(
                "[[plugin]]\nname='p'\npath='p'\ndeadline_ms=5000\n\
                 [plugin.config]\ndedupe_lease_ms='{lease}'"
            ))
            .unwrap()
            .validate()
        };
        lease("5001").unwrap();
        for short in ["5000", "1000"] {
            let err = lease(short).unwrap_err().to_string();
            assert!(
                err.contains("must be above deadline_ms = 5000"),
                "{short}: {err}"
            );
        }
        let err = lease("a minute").unwrap_err().to_string();
        assert!(err.contains("not a whole number"), "{err}");
    }

    #[test]
    fn config_values_and_secret_sources_parse_and_relative_secret_files_follow_the_config() {
        let text = "[[plugin]]\nname = 'r'\npath = 'r.wasm'\n\
            [plugin.config]\nrewards_url = 'http://127.0.0.1:8080'\n\
            [plugin.secrets]\ntoken = { env = 'REWARDS_TOKEN' }\nkey = { file = 'secrets/key' }\n";
        let config = HostConfig::from_text(text, Path::new("/etc/mqplug/mqplug.toml")).unwrap();
        config.validate().unwrap();
        let plugin = &config.plugins[0];
        assert_eq!(plugin.config["rewards_url"], "http://127.0.0.1:8080");
        assert_eq!(
            plugin.secrets["token"].env.as_deref(),
            Some("REWARDS_TOKEN")
        );
        assert_eq!(
            plugin.secrets["key"].file.as_deref(),
            Some(Path::new("/etc/mqplug/secrets/key"))
        );
    }

    #[test]
    fn an_empty_secret_names_where_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("token");
        std::fs::write(&empty, "\n").unwrap();
        let source = SecretSource {
            env: None,
            file: Some(empty.clone()),
        };
        assert_eq!(
            source.read().unwrap_err(),
            format!("file {} is empty", empty.display())
        );
    }

    #[test]
    fn a_secret_with_two_sources_or_none_and_a_key_in_both_tables_are_refused() {
        let refused = [
            (
                "[plugin.secrets]\nt = { env = 'A', file = 'b' }\n",
                "exactly one of `env` or `file`",
            ),
            (
                "[plugin.secrets]\nt = {}\n",
                "exactly one of `env` or `file`",
            ),
            (
                "[plugin.config]\nt = 'x'\n[plugin.secrets]\nt = { env = 'A' }\n",
                "both a config value and a secret",
            ),
            ("[plugin.config]\n'' = 'x'\n", "must be 1 to 256 bytes"),
        ];
        for (tables, why) in refused {
            let text = format!("[[plugin]]\nname = 'r'\npath = 'r.wasm'\n{tables}");
            let config = HostConfig::from_text(&text, Path::new("/m.toml")).unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(why), "{tables}: {err}");
        }
        let err =
            parse("[[plugin]]\nname = 'r'\npath = 'r.wasm'\n[plugin.secrets]\nt = 'inline'\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("expected where to read the secret: { env = \"VARIABLE\" } or { file"),
            "a secret's value is never in the file: {err}"
        );
    }

    #[test]
    fn publishing_needs_the_producer_and_valid_topic_names() {
        let entry = |topics: &str, producer: bool| {
            format!(
                "[producer]\nenabled = {producer}\n[[plugin]]\nname = 'r'\npath = 'r.wasm'\n\
                 allowed_topics = [{topics}]\n"
            )
        };
        let check = |text: String| {
            HostConfig::from_text(&text, Path::new("/m.toml"))
                .unwrap()
                .validate()
                .map_err(|err| err.to_string())
        };
        check(entry("'marketing.reward.granted'", true)).unwrap();
        let err = check(entry("'marketing.reward.granted'", false)).unwrap_err();
        assert!(err.contains("needs the built-in producer"), "{err}");
        let err = check(entry("'bad topic!'", true)).unwrap_err();
        assert!(err.contains("allowed_topics"), "{err}");
        // RocketMQ's own topics and the one the host consumes.
        for (topic, why) in [
            ("'%DLQ%mqplug-rewards'", "dead-letter queue"),
            ("'%RETRY%mqplug-rewards'", "retry topic"),
            ("'SCHEDULE_TOPIC_XXXX'", "system topics"),
            ("'rmq_sys_wheel_timer'", "system topics"),
            ("'marketing_task_completed'", "the topic this host consumes"),
            ("'marketing.task.completed'", "the topic this host consumes"),
        ] {
            let err = check(entry(topic, true)).unwrap_err();
            assert!(err.contains(why), "{topic}: {err}");
        }
    }

    #[test]
    fn key_value_grants_and_the_store_are_checked_naming_what_is_wrong() {
        let check = |store: &str, plugin: &str| {
            let text = format!(
                "{store}\n[[plugin]]\nname = {plugin}\npath = 'p.wasm'\n\
                 [plugin.key_value]\nbuckets = ['seen']\n"
            );
            let config = parse(&text).map_err(|err| err.to_string())?;
            config.validate().map_err(|err| err.to_string())?;
            Ok::<_, String>(config)
        };
        let config = check("", "'granter'").unwrap();
        assert!(matches!(
            config.store.settings(),
            Ok(StoreSettings::Embedded { .. })
        ));
        let err = check("", "'a:b'").unwrap_err();
        assert!(err.contains("a name a store can keep apart"), "{err}");
        let err = check("[store]\nbackend = 'redis'", "'g'").unwrap_err();
        assert!(err.contains("needs store.url"), "{err}");
        let err = check("[store]\nbackend = 'redis'\nurl = 'http://x'", "'g'").unwrap_err();
        assert!(err.contains("redis://"), "{err}");
        // The error is shown on /plugins and the status page: never the
        // URL's password.
        let err = check(
            "[store]\nbackend = 'redis'\nurl = 'rediss://admin:pa55word@cache:6380/0'",
            "'g'",
        )
        .unwrap_err();
        assert!(err.contains("rediss://***@cache:6380/0"), "{err}");
        assert!(!err.contains("pa55word"), "{err}");
        let err = check(
            "[store]\nbackend = 'redis'\nurl = 'redis://x'\ntimeout_ms = 0",
            "'g'",
        )
        .unwrap_err();
        assert!(err.contains("timeout_ms = 0"), "{err}");
        let bad_bucket = parse(
            "[[plugin]]\nname = 'g'\npath = 'p.wasm'\n[plugin.key_value]\nbuckets = ['a b']\n",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            bad_bucket.contains("not allowed in a bucket name"),
            "{bad_bucket}"
        );
        let too_big = parse(
            "[[plugin]]\nname = 'g'\npath = 'p.wasm'\n[plugin.key_value]\nbuckets = ['a']\n\
             max_value_bytes = 99999999\n",
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(too_big.contains("key_value.max_value_bytes"), "{too_big}");
        // A relative store path is relative to the config file.
        let config = HostConfig::from_text(
            "[store]\npath = 'state/s.redb'\n",
            Path::new("/etc/mqplug/mqplug.toml"),
        )
        .unwrap();
        assert_eq!(
            config.store.settings(),
            Ok(StoreSettings::Embedded {
                path: PathBuf::from("/etc/mqplug/state/s.redb")
            })
        );
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        /// A config with every section, the base of the near misses.
        const FULL: &str = "name_server = \"127.0.0.1:9876;127.0.0.2:9876\"\n\
            topic = \"marketing.task.completed\"\non_undecodable = \"drop\"\n\
            max_body_bytes = 1048576\n[runtime]\nmax_instances = 64\nmax_memory_mb = 128\n\
            fuel = true\ncache_max_mb = 64\n[admin]\nlisten = \"127.0.0.1:0\"\n\
            max_connections = 8\n[reload]\npoll_ms = 50\nsettle_ms = 300\n\
            [producer]\nenabled = true\nretries = 2\nsend_timeout_ms = 3000\n\
            [store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nprefix = \"mq\"\n\
            timeout_ms = 500\n\
            [[plugin]]\nname = \"rewards\"\npath = \"rewards.wasm\"\n\
            tags = \"USER_REGISTER || INVITE_FRIEND\"\nconcurrency = 4\n\
            max_reconsume_times = 3\ninstance_mode = \"fresh-per-event\"\ndeadline_ms = 2000\n\
            memory_limit_mb = 32\nlog_lines_per_second = 10\nfuel_per_event = 1000000\n\
            [plugin.key_value]\nbuckets = [\"seen\"]\nmax_value_bytes = 1024\nmax_total_mb = 8\n\
            [[plugin]]\nname = \"a.b\"\npath = \"/abs/a.wasm\"\ngroup = \"g-1\"\n";

        #[test]
        fn the_base_of_the_near_misses_is_valid() {
            let config = HostConfig::from_text(FULL, Path::new("/etc/mqplug/mqplug.toml")).unwrap();
            config.validate().unwrap();
            assert_eq!(config.plugins.len(), 2);
            assert_eq!(
                config.plugins[0].path,
                Path::new("/etc/mqplug/rewards.wasm")
            );
        }

        /// Everything a host does with a config before it connects anywhere.
        fn exercise(text: &str) {
            let Ok(config) = HostConfig::from_text(text, Path::new("/etc/mqplug/mqplug.toml"))
            else {
                return;
            };
            if config.validate().is_err() {
                return;
            }
            let _ = config.runtime_settings();
            let _ = config.fits_pools(usize::MAX, u32::MAX);
            let topic = config.topic().expect("validated");
            for plugin in &config.plugins {
                let _ = plugin.plugin_settings();
                let _ = plugin.consumer_settings(&config.name_server, &topic);
                // What validation promises.
                assert!((1..=MAX_DEADLINE_MS).contains(&plugin.deadline_ms));
                assert!(check_resource_name(&plugin.group()).is_ok());
                if let Some(key_value) = &plugin.key_value {
                    assert!(
                        key_value
                            .buckets
                            .iter()
                            .all(|b| check_bucket_name(b).is_ok())
                    );
                    assert!(check_bucket_name(&plugin.name).is_ok());
                    assert!(config.store.settings().is_ok());
                }
            }
        }

        /// A value of any TOML type, including the edges of the integers.
        fn arb_value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                prop_oneof![
                    Just(0i128),
                    Just(-1),
                    Just(u32::MAX as i128 + 1),
                    Just(i64::MAX as i128)
                ]
                .prop_map(|n| n.to_string()),
                "[ -~]{0,40}".prop_map(|s| format!("{s:?}")),
                any::<bool>().prop_map(|b| b.to_string()),
                any::<f64>().prop_map(|f| format!("{f:?}")),
                Just("[]".to_string()),
            ]
        }

        const KEYS: &[&str] = &[
            "name",
            "path",
            "group",
            "tags",
            "concurrency",
            "max_reconsume_times",
            "prefetch",
            "instance_mode",
            "deadline_ms",
            "memory_limit_mb",
            "log_lines_per_second",
            "log_bytes_per_second",
            "consume_from",
            "fuel_per_event",
            "inherit_stdio",
        ];

        const KV_KEYS: &[&str] = &["max_key_bytes", "max_value_bytes", "max_total_mb"];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
                exercise(&text);
            }

            #[test]
            fn near_misses_of_a_full_config_never_panic(
                position in any::<usize>(), byte in any::<u8>(), cut in any::<bool>(),
            ) {
                exercise(&String::from_utf8_lossy(&crate::mutated(FULL.as_bytes(), position, byte, cut)));
            }

            #[test]
            fn any_value_for_any_plugin_key_is_validated_without_panicking(
                values in proptest::collection::vec((0..KEYS.len(), arb_value()), 0..8),
            ) {
                let mut text = String::from("[[plugin]]\nname = \"p\"\npath = \"p.wasm\"\n");
                let mut seen = std::collections::HashSet::new();
                for (key, value) in values {
                    if KEYS[key] != "name" && KEYS[key] != "path" && seen.insert(key) {
                        text.push_str(&format!("{} = {value}\n", KEYS[key]));
                    }
                }
                exercise(&text);
            }

            #[test]
            fn any_key_value_grant_is_validated_without_panicking(
                bucket in "[ -~]{0,70}",
                name in "[ -~]{1,20}",
                values in proptest::collection::vec((0..KV_KEYS.len(), arb_value()), 0..4),
            ) {
                let mut text = format!(
                    "[store]\npath = \"s.redb\"\n[[plugin]]\nname = {name:?}\npath = \"p.wasm\"\n\
                     [plugin.key_value]\nbuckets = [{bucket:?}]\n"
                );
                let mut seen = std::collections::HashSet::new();
                for (key, value) in values {
                    if seen.insert(key) {
                        text.push_str(&format!("{} = {value}\n", KV_KEYS[key]));
                    }
                }
                exercise(&text);
            }
        }
    }
}
