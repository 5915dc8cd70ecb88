//! Records what the host did, so tests can wait for it and inspect it.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mqplug::DeliveryOutcome;
use mqplug::observe::{HostEvent, Observer, Observers};

/// One message handled by one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    pub plugin: String,
    pub message_id: String,
    pub reconsume_times: u32,
    pub outcome: DeliveryOutcome,
    pub cause: Option<String>,
    /// The plugin build (SHA-256) that handled it.
    pub version: Option<String>,
    /// When the host reported it.
    pub at: Instant,
}

/// Collects every [`HostEvent`] the host emits.
#[derive(Clone, Default)]
pub struct Recorder {
    inner: Arc<(Mutex<Vec<Stamped>>, Condvar)>,
}

/// An event and when it was reported.
type Stamped = (Instant, HostEvent);

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observers(&self) -> Observers {
        let inner = self.inner.clone();
        let observer: Observer = Arc::new(move |event: &HostEvent| {
            let (events, changed) = &*inner;
            events.lock().unwrap().push((Instant::now(), event.clone()));
            changed.notify_all();
        });
        Observers::new(vec![observer])
    }

    pub fn handled(&self) -> Vec<Handled> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(at, event)| match event {
                HostEvent::Handled {
                    plugin,
                    message_id,
                    reconsume_times,
                    outcome,
                    cause,
                    version,
                    ..
                } => Some(Handled {
                    plugin: plugin.to_string(),
                    message_id: message_id.clone(),
                    reconsume_times: *reconsume_times,
                    outcome: *outcome,
                    cause: cause.clone(),
                    version: version.as_deref().map(str::to_string),
                    at: *at,
                }),
                _ => None,
            })
            .collect()
    }

    pub fn handled_by(&self, plugin: &str) -> Vec<Handled> {
        self.handled()
            .into_iter()
            .filter(|h| h.plugin == plugin)
            .collect()
    }

    /// Whether `plugin` handled the message `message_id`, with any outcome.
    pub fn handled_message(&self, plugin: &str, message_id: &str) -> bool {
        self.handled_by(plugin)
            .iter()
            .any(|h| h.message_id == message_id)
    }

    /// The log lines a plugin wrote, with the message id of each.
    pub fn plugin_logs(&self, plugin: &str) -> Vec<(String, String)> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, event)| match event {
                HostEvent::PluginLog {
                    plugin: p,
                    message_id,
                    message,
                    ..
                } if &**p == plugin => Some((message_id.clone(), message.clone())),
                _ => None,
            })
            .collect()
    }

    /// Consumers draining and stopped, in order: ("draining" or "stopped",
    /// plugin).
    pub fn lifecycle(&self) -> Vec<(&'static str, String)> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, event)| match event {
                HostEvent::Draining { plugin } => Some(("draining", plugin.to_string())),
                HostEvent::Stopped { plugin } => Some(("stopped", plugin.to_string())),
                _ => None,
            })
            .collect()
    }

    /// Log lines of `plugin` reported dropped over its budget, so far.
    pub fn logs_dropped(&self, plugin: &str) -> u64 {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, event)| match event {
                HostEvent::LogsDropped { plugin: p, lines } if &**p == plugin => *lines,
                _ => 0,
            })
            .sum()
    }

    /// Every outbound HTTP request of `plugin` that ended: how, and how long
    /// it waited.
    pub fn outbound(&self, plugin: &str) -> Vec<(mqplug::observe::OutboundResult, Duration)> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, event)| match event {
                HostEvent::Outbound {
                    plugin: p,
                    result,
                    took,
                } if &**p == plugin => Some((*result, *took)),
                _ => None,
            })
            .collect()
    }

    /// How each key-value call of `plugin` ended, in order.
    pub fn key_value(&self, plugin: &str) -> Vec<mqplug::observe::KeyValueResult> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, event)| match event {
                HostEvent::KeyValue { plugin: p, result } if &**p == plugin => Some(*result),
                _ => None,
            })
            .collect()
    }

    /// Every load and reload: (plugin, version, result).
    pub fn loads(&self) -> Vec<(String, String, Result<(), String>)> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, event)| match event {
                HostEvent::Loaded {
                    plugin,
                    version,
                    result,
                    ..
                } => Some((plugin.to_string(), version.to_string(), result.clone())),
                _ => None,
            })
            .collect()
    }

    /// Waits until `done` holds for the recorded events, or `timeout` passes.
    /// Returns whether it held.
    pub fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&Recorder) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let (events, changed) = &*self.inner;
            let guard = events.lock().unwrap();
            let _ = changed
                .wait_timeout(guard, (deadline - now).min(Duration::from_millis(200)))
                .unwrap();
        }
    }
}

/// A consumer's handler that keeps every delivery and acknowledges it, for
/// reading a topic back (a dead-letter queue, the copies a producer stored).
#[derive(Clone, Default)]
pub struct Collect(Arc<Mutex<Vec<mqplug::Delivery>>>);

impl Collect {
    /// The deliveries so far, in arrival order.
    pub fn deliveries(&self) -> Vec<mqplug::Delivery> {
        self.0.lock().unwrap().clone()
    }
}

impl mqplug::mq::MessageHandler for Collect {
    fn on_message(&self, delivery: &mqplug::Delivery, _body: &[u8]) -> DeliveryOutcome {
        self.0.lock().unwrap().push(delivery.clone());
        DeliveryOutcome::ConsumeSuccess
    }
}

impl Collect {
    /// A consumer of its own in `group` reading `topic` from its first
    /// message, keeping every delivery (for reading a topic back).
    pub async fn from_first(
        mq: &mqplug::mq::MqRuntime,
        name_server: &str,
        topic: mqplug::topic::TopicName,
        group: &str,
    ) -> anyhow::Result<(mqplug::mq::PluginConsumer, Collect)> {
        use mqplug::mq::{ConsumeFrom, ConsumerSettings, PluginConsumer};
        let seen = Collect::default();
        let consumer = PluginConsumer::start(
            mq,
            &ConsumerSettings {
                name_server: name_server.to_string(),
                group: group.to_string(),
                topic,
                tags: "*".into(),
                concurrency: 1,
                batch: 1,
                max_reconsume_times: 0,
                prefetch: None,
                consume_from: ConsumeFrom::First,
                drain_timeout: Duration::from_secs(1),
            },
            Arc::new(seen.clone()),
        )
        .await?;
        Ok((consumer, seen))
    }
}
