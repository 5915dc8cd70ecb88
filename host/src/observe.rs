//! Host events for whoever wants to watch: tests, and later metrics.
//!
//! Observers are called synchronously on the thread that produced the event,
//! so they must be cheap and must not block.

use std::sync::Arc;

use crate::outcome::DeliveryOutcome;

/// Something that happened in the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// A plugin wrote a log line through its `log` import.
    PluginLog {
        plugin: Arc<str>,
        message_id: String,
        level: LogLevel,
        message: String,
    },
    /// A message was handled by a plugin and its outcome decided.
    Handled {
        plugin: Arc<str>,
        message_id: String,
        reconsume_times: u32,
        outcome: DeliveryOutcome,
        /// Why it was not acknowledged, if it was not.
        cause: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// A callback for [`HostEvent`]s.
pub type Observer = Arc<dyn Fn(&HostEvent) + Send + Sync>;

/// The set of observers, cheap to clone into every plugin and consumer.
#[derive(Clone, Default)]
pub struct Observers(Arc<Vec<Observer>>);

impl Observers {
    pub fn new(observers: Vec<Observer>) -> Self {
        Observers(Arc::new(observers))
    }

    pub fn emit(&self, event: impl FnOnce() -> HostEvent) {
        if self.0.is_empty() {
            return;
        }
        let event = event();
        for observer in self.0.iter() {
            observer(&event);
        }
    }
}
