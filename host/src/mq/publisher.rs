//! The built-in producer: publishes task events with a synchronous send.

use std::collections::HashMap;
use std::time::Duration;

use rocketmq_client_rust::DefaultMQProducer;
use rocketmq_model::common::message::message_single::Message;

use super::client::MqRuntime;
use super::error::MqError;
use crate::event::TaskEvent;
use crate::topic::TopicName;

/// The marketing platform's producer group.
pub const DEFAULT_PRODUCER_GROUP: &str = "marketing-producer-group";

#[derive(Debug, Clone)]
pub struct ProducerSettings {
    pub name_server: String,
    pub group: String,
    pub topic: TopicName,
    /// Retries of a failed synchronous send (the platform uses 2).
    pub retries: u32,
    pub send_timeout: Duration,
}

impl ProducerSettings {
    pub fn new(name_server: impl Into<String>, topic: TopicName) -> Self {
        ProducerSettings {
            name_server: name_server.into(),
            group: DEFAULT_PRODUCER_GROUP.to_string(),
            topic,
            retries: 2,
            send_timeout: Duration::from_secs(3),
        }
    }
}

/// What the broker said about a published event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The message's unique id, which consumers see as `message-id`.
    pub message_id: String,
    pub queue_id: Option<i32>,
    pub queue_offset: u64,
}

/// Publishes task events to the configured topic. Each message is tagged with
/// its event type (consumers filter by tag) and keyed by [`TaskEvent::key`].
pub struct Publisher {
    producer: DefaultMQProducer,
    settings: ProducerSettings,
}

impl Publisher {
    pub async fn start(runtime: &MqRuntime, settings: ProducerSettings) -> Result<Self, MqError> {
        let mut producer = DefaultMQProducer::builder(runtime.client())
            .name_server_addr(settings.name_server.clone())
            .producer_group(settings.group.clone())
            .retry_times_when_send_failed(settings.retries)
            .send_msg_timeout(u32::try_from(settings.send_timeout.as_millis()).unwrap_or(u32::MAX))
            .build();
        producer.start().await.map_err(|err| {
            MqError::new(format!("start producer group {}", settings.group), &err)
        })?;
        Ok(Publisher { producer, settings })
    }

    pub fn topic(&self) -> &TopicName {
        &self.settings.topic
    }

    /// Creates the topic with `queues` queues on every broker, if it does not
    /// exist. A consumer that subscribes before its topic exists waits for
    /// the client's 30 s route refresh before it sees anything.
    pub async fn create_topic(&mut self, queues: i32) -> Result<(), MqError> {
        let wire = self.settings.topic.wire().to_string();
        self.producer
            .create_topic("TBW102", &wire, queues, HashMap::new())
            .await
            .map_err(|err| MqError::new(format!("create topic {wire}"), &err))
    }

    /// Publishes one event and waits for the broker's answer.
    pub async fn publish(&self, event: &TaskEvent) -> Result<PublishReceipt, MqError> {
        let tags = (!event.event_type.is_empty()).then_some(event.event_type.as_str());
        self.publish_body(event.encode(), tags, vec![event.key()])
            .await
    }

    /// Publishes any body, e.g. to test how consumers treat malformed input.
    pub async fn publish_body(
        &self,
        body: Vec<u8>,
        tags: Option<&str>,
        keys: Vec<String>,
    ) -> Result<PublishReceipt, MqError> {
        let wire = self.settings.topic.wire();
        let mut builder = Message::builder().topic(wire).keys(keys).body(body);
        if let Some(tags) = tags {
            builder = builder.tags(tags);
        }
        let message = builder
            .build()
            .map_err(|err| MqError::new(format!("build a message for {wire}"), &err))?;
        let timeout = u64::try_from(self.settings.send_timeout.as_millis()).unwrap_or(u64::MAX);
        let result = self
            .producer
            .send_with_timeout(message, timeout)
            .await
            .map_err(|err| MqError::new(format!("send to {wire}"), &err))?
            .ok_or_else(|| MqError {
                action: format!("send to {wire}"),
                cause: "the client returned no send result".into(),
            })?;
        Ok(PublishReceipt {
            message_id: result.msg_id.map(|id| id.to_string()).unwrap_or_default(),
            queue_id: result.message_queue.as_ref().map(|mq| mq.queue_id()),
            queue_offset: result.queue_offset,
        })
    }

    pub async fn shutdown(mut self) {
        self.producer.shutdown().await;
    }
}
