//! Host events for whoever wants to watch: tests, and the metrics.
//!
//! Observers are called synchronously on the thread that produced the event,
//! so they must be cheap and must not block.

use std::sync::Arc;
use std::time::Duration;

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
        /// The plugin build that handled it (its SHA-256), if a handler ran.
        version: Option<Arc<str>>,
        /// What kind of non-success it was, for counting.
        failure: Option<FailureKind>,
        /// Decoding plus the handler call.
        duration: Duration,
    },
    /// A plugin was loaded at start-up, reloaded, or a reload was refused.
    Loaded {
        plugin: Arc<str>,
        /// The digest of the build that was (or failed to be) loaded.
        version: Arc<str>,
        /// `Err` with the reason when the build was refused and the old
        /// version kept serving.
        result: Result<(), String>,
        /// Whether the compiled component came from the cache.
        from_cache: bool,
        /// Reading, compiling (or loading from cache) and instantiating.
        took: Duration,
    },
    /// A plugin's consumer stopped pulling and waits for its in-flight
    /// handlers (shutdown, removal or restart).
    Draining { plugin: Arc<str> },
    /// A plugin's consumer has stopped: its handlers' outcomes are sent.
    Stopped { plugin: Arc<str> },
    /// Log lines of a plugin dropped over its budget in the window that
    /// just ended.
    LogsDropped { plugin: Arc<str>, lines: u64 },
    /// A plugin's outbound HTTP request ended: answered, refused by its
    /// grants, or failed.
    Outbound {
        plugin: Arc<str>,
        result: OutboundResult,
        /// Until the response head (or the refusal or failure).
        took: Duration,
    },
    /// A plugin's key-value call (`wasi:keyvalue`, `dedupe`) ended.
    KeyValue {
        plugin: Arc<str>,
        result: KeyValueResult,
    },
    /// An accepted event's follow-up messages went out, or could not (the
    /// event is then retried and sends them again).
    FollowUps {
        plugin: Arc<str>,
        /// Each message's topic, as configured.
        topics: Vec<String>,
        sent: bool,
    },
}

/// How a key-value call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyValueResult {
    Ok,
    /// Over a limit, past the deadline, or a bucket not granted.
    Refused,
    /// The store failed or did not answer.
    Failed,
}

impl KeyValueResult {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyValueResult::Ok => "ok",
            KeyValueResult::Refused => "refused",
            KeyValueResult::Failed => "failed",
        }
    }
}

/// How an outbound request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundResult {
    /// The server answered with this status.
    Response(u16),
    /// Not allowed by the plugin's grants: origin or address.
    Refused,
    /// Allowed, but failed: connection, timeout, deadline, protocol.
    Failed,
}

/// Why a message was not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// The handler returned `err`.
    Rejected,
    /// Accepted, but its follow-up messages could not be sent.
    Publish,
    /// A trap: panic, `unreachable`, stack overflow, bad memory access.
    Trap,
    Deadline,
    MemoryLimit,
    OutOfFuel,
    /// The host failed around the call (e.g. could not instantiate).
    Host,
    /// The body was not a task event; no handler ran.
    Undecodable,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Rejected => "rejected",
            FailureKind::Publish => "publish",
            FailureKind::Trap => "trap",
            FailureKind::Deadline => "deadline",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::OutOfFuel => "out_of_fuel",
            FailureKind::Host => "host",
            FailureKind::Undecodable => "undecodable",
        }
    }
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

    /// These observers and one more.
    pub fn with(&self, observer: Observer) -> Self {
        let mut all: Vec<Observer> = self.0.iter().cloned().collect();
        all.push(observer);
        Observers::new(all)
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
