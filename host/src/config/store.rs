//! `[store]`: where plugins' key-value buckets live.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::store::check_bucket_name;
use crate::wasm::StoreSettings;

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

pub(super) fn default_state_path() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("MQPLUG_DATA_DIR") {
        return Some(PathBuf::from(dir).join("state.redb"));
    }
    let data = var("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".local/share")))?;
    Some(data.join("mqplug").join("state.redb"))
}
