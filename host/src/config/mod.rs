//! The host's configuration file (TOML). Unknown keys are errors that name
//! the key, so a typo never silently falls back to a default.
//!
//! One room per section, each type beside the checks it needs: the host's
//! own keys and the whole file's checks here, `[[plugin]]` in `plugin.rs`,
//! what a plugin may be granted in `grants.rs`, secrets and
//! `[credentials]` in `secrets.rs`, `[store]`, `[producer]`, `[runtime]`
//! and `[reload]`, `[admin]` and `[traces]` in theirs.

mod admin;
mod grants;
#[cfg(test)]
mod keys;
mod plugin;
mod producer;
mod runtime;
mod secrets;
mod store;
#[cfg(test)]
mod tests;

pub use admin::*;
pub use grants::*;
pub use plugin::*;
pub use producer::*;
pub use runtime::*;
pub use secrets::*;
pub use store::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::event::DEFAULT_MAX_BODY_BYTES;
use crate::mq::{Backoff, ProducerSettings};
use crate::outcome::UndecodablePolicy;
use crate::topic::{DEFAULT_TOPIC, TopicName, TopicNameError, check_resource_name};
use crate::wasm::{RuntimeSettings, StoreSettings};

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

pub(super) const MIB: usize = 1024 * 1024;

/// The RocketMQ client counts a listener running past 30 s as failed.
pub(super) const LISTENER_TIMEOUT_MS: u64 = 30_000;

/// The longest deadline a plugin may have: 2 s below the listener timeout,
/// room for instantiation, decoding and acknowledging around the handler.
pub const MAX_DEADLINE_MS: u64 = LISTENER_TIMEOUT_MS - 2_000;

pub(super) fn default_name_server() -> String {
    DEFAULT_NAME_SERVER.to_string()
}

pub(super) fn default_topic() -> String {
    DEFAULT_TOPIC.to_string()
}

pub(super) fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
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
            if let Some(canary) = plugin
                .canary
                .as_mut()
                .filter(|canary| canary.path.is_relative())
            {
                canary.path = base.join(&canary.path);
            }
            if let Some(record) = plugin
                .record_failures
                .as_mut()
                .filter(|record| record.dir.is_relative())
            {
                record.dir = base.join(&record.dir);
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

    /// Instances the plugins may need at once: each plugin's concurrency
    /// times its batch (a batch's messages are in their handlers at once),
    /// plus one for a reload.
    pub fn instances_needed(&self) -> u64 {
        self.plugins
            .iter()
            // A canary's candidate keeps instances of its own beside the
            // current build's.
            .map(|p| {
                (u64::from(p.concurrency) * u64::from(p.batch) + 1)
                    * if p.canary.is_some() { 2 } else { 1 }
            })
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
        let consumed = self.topic()?;
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
            plugin
                .check(&consumed, self.producer.enabled, &self.runtime)
                .map_err(problem)?;
        }
        // Each event in flight holds an instance of its own, and a reload
        // instantiates the new build while the old one may still be busy.
        let wanted = self.instances_needed();
        if wanted > u64::from(self.runtime.max_instances) {
            return Err(ConfigError::Runtime(format!(
                "the plugins may need {wanted} instances at once (each plugin's concurrency \
                 times its batch, plus one for a reload, twice over for a plugin with a canary), over \
                 runtime.max_instances = {}",
                self.runtime.max_instances
            )));
        }
        Ok(())
    }
}
