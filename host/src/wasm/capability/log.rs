//! `mqplug:plugin/log`, in both contract versions: a plugin's lines reach
//! the host's log within the plugin's budget, escaped, cut, and with its
//! secrets blanked.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use super::config::ConfigValues;
use super::log_budget::LogBudget;
use crate::observe::{HostEvent, LogLevel, Observers};
use crate::text::{MAX_UNTRUSTED_BYTES, inert_owned};
use crate::wasm::bindings::{v0_1, v0_2};

/// The longest log line a plugin can write; longer ones are cut.
pub const MAX_LOG_LINE_BYTES: usize = MAX_UNTRUSTED_BYTES;

/// One instance's log.
pub(crate) struct Log {
    plugin: Arc<str>,
    /// The message being handled.
    message_id: String,
    budget: Arc<LogBudget>,
    /// Whose values are blanked in every line.
    secrets: Arc<ConfigValues>,
    observers: Observers,
}

impl Log {
    pub(crate) fn new(
        plugin: Arc<str>,
        budget: Arc<LogBudget>,
        secrets: Arc<ConfigValues>,
        observers: Observers,
    ) -> Self {
        Log {
            plugin,
            message_id: String::new(),
            budget,
            secrets,
            observers,
        }
    }

    /// Lines from now on are the event `message_id`'s.
    pub(crate) fn begin_event(&mut self, message_id: &str) {
        self.message_id.clear();
        self.message_id.push_str(message_id);
    }

    /// Links `log` (and the records it shares, `types`) of both contract
    /// versions; `get` picks the instance's log out of the store's data.
    pub(crate) fn add_to_linker<T: Send + 'static>(
        linker: &mut Linker<T>,
        get: fn(&mut T) -> &mut Log,
    ) -> wasmtime::Result<()> {
        v0_1::Plugin::add_to_linker::<T, HasSelf<Log>>(linker, get)?;
        v0_2::mqplug::plugin::types::add_to_linker::<T, HasSelf<Log>>(linker, get)?;
        v0_2::mqplug::plugin::log::add_to_linker::<T, HasSelf<Log>>(linker, get)
    }

    /// One line of the plugin's, of any contract version.
    fn write(&mut self, level: LogLevel, message: String) {
        if !self.budget.admit(message.len()) {
            return;
        }
        // A secret the plugin was given never reaches the host's log.
        let message = self.secrets.redact(message);
        // Plugin-controlled: escaped (no forged host lines) and cut.
        let message = inert_owned(message, MAX_LOG_LINE_BYTES);
        // The dispatcher's `message` span already carries plugin and message id.
        match level {
            LogLevel::Trace => tracing::trace!(target: "mqplug::plugin", "{message}"),
            LogLevel::Debug => tracing::debug!(target: "mqplug::plugin", "{message}"),
            LogLevel::Info => tracing::info!(target: "mqplug::plugin", "{message}"),
            LogLevel::Warn => tracing::warn!(target: "mqplug::plugin", "{message}"),
            LogLevel::Error => tracing::error!(target: "mqplug::plugin", "{message}"),
        }
        self.observers.emit(|| HostEvent::PluginLog {
            plugin: self.plugin.clone(),
            message_id: self.message_id.clone(),
            level,
            message,
        });
    }
}

impl v0_1::mqplug::plugin::types::Host for Log {}
impl v0_2::mqplug::plugin::types::Host for Log {}

/// The `log` import of each contract version: the same levels, one writer.
macro_rules! log_host {
    ($($version:ident),*) => {$(
        impl $version::mqplug::plugin::log::Host for Log {
            fn log(&mut self, level: $version::mqplug::plugin::log::Level, message: String) {
                use $version::mqplug::plugin::log::Level;
                let level = match level {
                    Level::Trace => LogLevel::Trace,
                    Level::Debug => LogLevel::Debug,
                    Level::Info => LogLevel::Info,
                    Level::Warn => LogLevel::Warn,
                    Level::Error => LogLevel::Error,
                };
                self.write(level, message);
            }
        }
    )*};
}

log_host!(v0_1, v0_2);
