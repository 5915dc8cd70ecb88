//! `[runtime]` (the wasm engine's pools and compile cache) and `[reload]`
//! (watching files).

use std::path::PathBuf;

use serde::Deserialize;

use super::MIB;
use crate::wasm::RuntimeSettings;

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

/// `$MQPLUG_CACHE_DIR/components`, else `$XDG_CACHE_HOME/mqplug/components`,
/// else `~/.cache/mqplug/components`.
pub(super) fn default_cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("MQPLUG_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("components"));
    }
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join("mqplug").join("components"))
}
