//! What a plugin may be granted besides its handler: `[plugin.key_value]`,
//! its HTTP limits and its `[plugin.config]` table's checks.

use serde::Deserialize;

use super::{MAX_CONFIG_KEY_BYTES, MAX_CONFIG_VALUE_BYTES, MIB, PluginConfig};
use crate::store::check_bucket_name;
use crate::wasm::{KeyValueGrants, KeyValueLimits, OutboundLimits};

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

pub(super) fn default_max_key_bytes() -> usize {
    KeyValueLimits::default().max_key_bytes
}

pub(super) fn default_max_value_bytes() -> usize {
    KeyValueLimits::default().max_value_bytes
}

pub(super) fn default_max_total_mb() -> u64 {
    KeyValueLimits::default().max_total_bytes / MIB as u64
}

/// The largest `max_key_bytes`, `max_value_bytes` and `max_total_mb`.
pub const MAX_KV_KEY_BYTES: usize = 4096;

pub const MAX_KV_VALUE_BYTES: usize = 16 * 1024 * 1024;

pub const MAX_KV_TOTAL_MB: u64 = 64 * 1024;

impl KeyValueConfig {
    pub(super) fn check(&self, plugin: &str) -> Result<(), String> {
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

    pub(super) fn grants(&self) -> KeyValueGrants {
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

pub(super) fn default_http_timeout_ms() -> u64 {
    OutboundLimits::default().timeout.as_millis() as u64
}

pub(super) fn default_http_max_response_bytes() -> u64 {
    OutboundLimits::default().max_response_bytes
}

pub(super) fn default_http_max_in_flight() -> usize {
    OutboundLimits::default().max_in_flight
}

/// The largest `http_max_response_bytes`.
pub const MAX_HTTP_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

/// The largest `http_max_in_flight`.
pub const MAX_HTTP_IN_FLIGHT: usize = 4096;

/// Keys and values of `[plugin.config]` and `[plugin.secrets]`: bounded,
/// no key in both, each secret with one source. Secret values are read at
/// load, not here.
pub(super) fn check_config_table(plugin: &PluginConfig) -> Result<(), String> {
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
