//! Local mode: run message bodies through a plugin without a broker.

use std::sync::{Arc, Mutex};

use crate::delivery::Delivery;
use crate::dispatch::{Dispatcher, OutboxSender};
use crate::observe::{HostEvent, Observer, Observers};
use crate::outcome::{DeliveryOutcome, UndecodablePolicy};
use crate::topic::TopicName;
use crate::wasm::Plugin;

/// One replayed message and what the broker would have been told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayResult {
    pub message_id: String,
    pub outcome: DeliveryOutcome,
    pub cause: Option<String>,
}

/// Runs bodies through a plugin exactly as the consumer would (same decoding,
/// same outcome rule), one after another.
pub struct Replayer {
    dispatcher: Dispatcher,
    topic: TopicName,
    last: Arc<Mutex<Option<HostEvent>>>,
}

impl Replayer {
    pub fn new(
        plugin: Arc<Plugin>,
        topic: TopicName,
        undecodable: UndecodablePolicy,
        max_body_bytes: usize,
    ) -> Self {
        let last = Arc::new(Mutex::new(None));
        let sink = last.clone();
        let observer: Observer = Arc::new(move |event: &HostEvent| {
            if matches!(event, HostEvent::Handled { .. }) {
                *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(event.clone());
            }
        });
        let dispatcher = Dispatcher::new(
            plugin.name(),
            plugin.clone(),
            undecodable,
            max_body_bytes,
            Observers::new(vec![observer]),
        );
        Replayer {
            dispatcher,
            topic,
            last,
        }
    }

    /// Sends accepted events' follow-up messages through `sender` (else an
    /// event with follow-ups is retried, as on a host without a producer).
    pub fn with_outbox(mut self, sender: Arc<dyn OutboxSender>) -> Self {
        self.dispatcher = self.dispatcher.with_outbox(sender);
        self
    }

    /// Replays one body as the `sequence`-th message, on its
    /// `reconsume_times`-th redelivery.
    pub fn replay(&self, sequence: usize, body: &[u8], reconsume_times: u32) -> ReplayResult {
        let delivery = Delivery {
            message_id: format!("replay-{sequence}"),
            topic: self.topic.wire().to_string(),
            reconsume_times,
            queue_offset: i64::try_from(sequence).unwrap_or(i64::MAX),
            born_timestamp: chrono::Utc::now().timestamp_millis(),
            ..Delivery::default()
        };
        self.replay_delivery(&delivery, body)
    }

    /// Replays one message as delivered: its id, tag, keys and counts kept
    /// (a dead letter sent back through the plugin).
    pub fn replay_delivery(&self, delivery: &Delivery, body: &[u8]) -> ReplayResult {
        let delivery = Delivery {
            topic: self.topic.wire().to_string(),
            ..delivery.clone()
        };
        let outcome = self.dispatcher.dispatch(&delivery, body);
        let cause = match self.last.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(HostEvent::Handled { cause, .. }) => cause,
            _ => None,
        };
        ReplayResult {
            message_id: delivery.message_id,
            outcome,
            cause,
        }
    }
}
