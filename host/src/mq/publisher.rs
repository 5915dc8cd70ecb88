//! The built-in producer: publishes task events with a synchronous send.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rocketmq_client_rust::{
    ClientError, ClientRpcHook, ClientRuntime, DefaultMQProducer, SendResult,
};
use rocketmq_model::common::message::MessageTrait;
use rocketmq_model::common::message::message_client_id_setter::MessageClientIDSetter;
use rocketmq_model::common::message::message_property::MessagePropertyKey;
use rocketmq_model::common::message::message_single::Message;

use super::client::MqRuntime;
use super::error::MqError;
use crate::event::TaskEvent;
use crate::topic::TopicName;
use crate::traces::{SendSpan, TraceContext};

/// The marketing platform's producer group.
pub const DEFAULT_PRODUCER_GROUP: &str = "marketing-producer-group";

#[derive(Debug, Clone)]
pub struct ProducerSettings {
    pub name_server: String,
    pub group: String,
    pub topic: TopicName,
    /// Retries of a failed synchronous send inside the client (the platform
    /// uses 2). The client retries at once, with no pause.
    pub retries: u32,
    pub send_timeout: Duration,
    /// Further attempts after the client gave up, with exponential backoff,
    /// so a broker restart does not turn into lost events.
    pub backoff: Backoff,
}

/// Pauses between the host's own send attempts: `initial`, doubling, at most
/// `max`, for `attempts` attempts after the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    /// 4 more attempts after 0.2, 0.4, 0.8 and 1.6 s: about 3 s in all.
    fn default() -> Self {
        Backoff {
            attempts: 4,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The pause before attempt `n` (1 is the first retry).
    pub fn pause(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.initial.saturating_mul(factor).min(self.max)
    }
}

impl ProducerSettings {
    pub fn new(name_server: impl Into<String>, topic: TopicName) -> Self {
        ProducerSettings {
            name_server: name_server.into(),
            group: DEFAULT_PRODUCER_GROUP.to_string(),
            topic,
            retries: 2,
            send_timeout: Duration::from_secs(3),
            backoff: Backoff::default(),
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
    /// Sends it took (1 when the first one worked).
    pub attempts: u32,
}

/// Publishes task events to the configured topic. Each message is tagged with
/// its event type (consumers filter by tag) and keyed by [`TaskEvent::key`].
///
/// A send that fails is tried again after a pause ([`Backoff`]) on a freshly
/// started client. The fresh client matters: rocketmq-client-rust 1.0.0 trips
/// a per-client circuit breaker after 5 failed connections to a broker and
/// then refuses that broker for 30 s, even once it is back, so after a broker
/// restart the old client would keep failing while a new one sends at once.
///
/// Sends may run at once from many tasks (`&self`, see
/// [`crate::publish::publish_all`]): each holds a read lock on the current
/// client for its send, and the client multiplexes them on one connection
/// per broker. A renewal takes the write lock, so it waits for the sends in
/// flight on the old client and holds new ones until the fresh client runs;
/// the sends that failed on the old client renew it once, not once each.
pub struct Publisher {
    runtime: Arc<ClientRuntime>,
    /// Signs requests when the cluster asks for credentials.
    rpc_hook: Option<Arc<ClientRpcHook>>,
    current: tokio::sync::RwLock<Client>,
    settings: ProducerSettings,
}

/// One started client and its place in the sequence of replacements.
struct Client {
    producer: DefaultMQProducer,
    generation: u64,
}

impl Publisher {
    pub async fn start(runtime: &MqRuntime, settings: ProducerSettings) -> Result<Self, MqError> {
        let (rpc_hook, runtime) = (runtime.rpc_hook(), runtime.client());
        let producer = start_client(&runtime, rpc_hook.clone(), &settings).await?;
        Ok(Publisher {
            runtime,
            rpc_hook,
            current: tokio::sync::RwLock::new(Client {
                producer,
                generation: 0,
            }),
            settings,
        })
    }

    /// Replaces the client, unless another failed send already replaced the
    /// one that `failed_generation` names. If no new client starts, the old
    /// one stays.
    async fn renew(&self, failed_generation: u64) {
        let mut current = self.current.write().await;
        if current.generation != failed_generation {
            return;
        }
        match start_client(&self.runtime, self.rpc_hook.clone(), &self.settings).await {
            Ok(producer) => {
                let mut old = std::mem::replace(
                    &mut *current,
                    Client {
                        producer,
                        generation: failed_generation + 1,
                    },
                );
                drop(current);
                tracing::debug!(
                    generation = failed_generation + 1,
                    "replaced the producer's client after a failed send"
                );
                old.producer.shutdown().await;
            }
            Err(err) => tracing::warn!("cannot start a fresh producer client: {err}"),
        }
    }

    pub fn topic(&self) -> &TopicName {
        &self.settings.topic
    }

    /// Creates the topic with `queues` queues on every broker, if it does not
    /// exist. A consumer that subscribes before its topic exists waits for
    /// the client's 30 s route refresh before it sees anything.
    pub async fn create_topic(&mut self, queues: i32) -> Result<(), MqError> {
        let topic = self.settings.topic.clone();
        self.create(&topic, queues).await
    }

    /// Creates any topic, as [`Publisher::create_topic`] does its own (for
    /// the topics plugins publish follow-ups to).
    pub async fn create(&mut self, topic: &TopicName, queues: i32) -> Result<(), MqError> {
        let wire = topic.wire().to_string();
        self.current
            .get_mut()
            .producer
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
        let topic = self.settings.topic.clone();
        self.publish_to(&topic, body, tags, keys, None).await
    }

    /// Publishes to any topic; `id` fixes the message id (`UNIQ_KEY`), for
    /// a message that must keep its id when it is published again.
    pub async fn publish_to(
        &self,
        topic: &TopicName,
        body: Vec<u8>,
        tags: Option<&str>,
        keys: Vec<String>,
        id: Option<String>,
    ) -> Result<PublishReceipt, MqError> {
        self.publish_traced(topic, body, tags, keys, id, &TraceContext::default())
            .await
    }

    /// [`Publisher::publish_to`], the message carrying `trace` in its
    /// `traceparent` and `tracestate` properties.
    pub async fn publish_traced(
        &self,
        topic: &TopicName,
        body: Vec<u8>,
        tags: Option<&str>,
        keys: Vec<String>,
        id: Option<String>,
        trace: &TraceContext,
    ) -> Result<PublishReceipt, MqError> {
        let mut message = build_message(topic.wire(), body, tags, keys, id, None)?;
        for (name, value) in trace.pairs() {
            message.put_property(name.into(), value.into());
        }
        self.send_one(topic.wire(), message).await
    }

    /// Sends `message` to `wire` with the retries, and its receipt.
    async fn send_one(&self, wire: &str, message: Message) -> Result<PublishReceipt, MqError> {
        let (result, attempts) = self.send_with_retries(wire, Outgoing::One(message)).await?;
        Ok(PublishReceipt {
            message_id: result.msg_id.map(|id| id.to_string()).unwrap_or_default(),
            queue_id: result.message_queue.as_ref().map(|mq| mq.queue_id()),
            queue_offset: result.queue_offset,
            attempts,
        })
    }

    /// Hands a consumed message back to consumer group `group` through its
    /// retry topic `%RETRY%<group>`, which every consumer of the group reads
    /// besides its topic: whichever host holds that queue runs it (with
    /// its own state store), as a redelivery would. The message keeps its
    /// id, tag and keys, and names `topic` (wire) as where it came from.
    pub async fn hand_back(
        &self,
        group: &str,
        topic: &str,
        body: Vec<u8>,
        tags: Option<&str>,
        keys: Vec<String>,
        id: String,
    ) -> Result<PublishReceipt, MqError> {
        let retry = format!("%RETRY%{group}");
        let message = build_message(&retry, body, tags, keys, Some(id), Some(topic))?;
        self.send_one(&retry, message).await
    }

    /// Publishes `events` as one RocketMQ batch: one synchronous send that
    /// the broker stores or refuses as a whole, in one queue, each event
    /// still its own message with its own tag, key and id. Retried as
    /// [`Publisher::publish`] is, the whole batch with the same ids. Returns
    /// one receipt per event, in order.
    ///
    /// The broker takes at most 4 MiB in one send (`maxMessageSize`), the
    /// whole batch counted: keep batches well below it.
    pub async fn publish_batch(
        &self,
        events: &[TaskEvent],
    ) -> Result<Vec<PublishReceipt>, MqError> {
        let wire = self.settings.topic.wire();
        let mut messages = Vec::with_capacity(events.len());
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            let tags = (!event.event_type.is_empty()).then_some(event.event_type.as_str());
            let message = build_message(wire, event.encode(), tags, vec![event.key()], None, None)?;
            ids.push(
                MessageClientIDSetter::get_uniq_id(&message)
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
            );
            messages.push(message);
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let (result, attempts) = self
            .send_with_retries(wire, Outgoing::Batch(messages))
            .await?;
        let queue_id = result.message_queue.as_ref().map(|mq| mq.queue_id());
        // The broker puts a batch's messages one after the other in its
        // queue and answers with the first one's offset.
        Ok(ids
            .into_iter()
            .zip(0..)
            .map(|(message_id, n)| PublishReceipt {
                message_id,
                queue_id,
                queue_offset: result.queue_offset + n,
                attempts,
            })
            .collect())
    }

    /// Sends `outgoing` until it is stored: the client's own retries, then
    /// the host's with backoff, each on a fresh client (see [`Publisher`]).
    /// Returns the broker's answer and the sends it took.
    async fn send_with_retries(
        &self,
        wire: &str,
        outgoing: Outgoing,
    ) -> Result<(SendResult, u32), MqError> {
        let mut attempt = 0;
        // The first failure usually says the most (later ones can be the
        // client's generic "connection failed"): report it with the last.
        let mut first_cause: Option<String> = None;
        let mut failed_generation = None;
        loop {
            attempt += 1;
            if let Some(generation) = failed_generation {
                self.renew(generation).await;
            }
            let (result, generation) = {
                let client = self.current.read().await;
                let result = self
                    .send_once(&client.producer, wire, outgoing.clone())
                    .await;
                (result, client.generation)
            };
            match result {
                Ok(result) => return Ok((result, attempt)),
                // A message no retry can mend is reported at once, and the
                // client every other send shares is kept.
                Err(SendFailure {
                    error,
                    permanent: true,
                }) => {
                    return Err(MqError {
                        action: format!("{} (refused as it is: not retried)", error.action),
                        cause: error.cause,
                    });
                }
                Err(SendFailure { error: err, .. }) if attempt > self.settings.backoff.attempts => {
                    let cause = match first_cause {
                        Some(first) if first != err.cause => {
                            format!("{first} (first attempt); {} (last attempt)", err.cause)
                        }
                        _ => err.cause,
                    };
                    return Err(MqError {
                        action: format!("{} (gave up after {attempt} attempts)", err.action),
                        cause,
                    });
                }
                Err(SendFailure { error: err, .. }) => {
                    let pause = self.settings.backoff.pause(attempt);
                    tracing::warn!(
                        attempt,
                        pause_ms = pause.as_millis() as u64,
                        "send failed, retrying after a pause: {err}"
                    );
                    first_cause.get_or_insert(err.cause);
                    failed_generation = Some(generation);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    async fn send_once(
        &self,
        producer: &DefaultMQProducer,
        wire: &str,
        outgoing: Outgoing,
    ) -> Result<SendResult, SendFailure> {
        let timeout = u64::try_from(self.settings.send_timeout.as_millis()).unwrap_or(u64::MAX);
        let failure = |action: String, err: ClientError| {
            let mut error = MqError::new(action, &err);
            // The client drops the broker's remark: say what its code means.
            match err.broker_response_code() {
                Some(NO_PERMISSION) => {
                    error.cause = format!(
                        "the broker refused it: no permission (code 16): the credentials' user may not publish to {wire}, or the credentials are wrong or missing; {}",
                        error.cause
                    );
                }
                Some(code) => {
                    error.cause = format!("{}: {}", broker_code_meaning(code), error.cause);
                }
                None => {}
            }
            SendFailure {
                permanent: permanent(&err),
                error,
            }
        };
        match outgoing {
            Outgoing::One(message) => {
                let action = || format!("send to {wire}");
                producer
                    .send_with_timeout(message, timeout)
                    .await
                    .map_err(|err| failure(action(), err))?
                    .ok_or_else(|| SendFailure {
                        error: MqError {
                            action: action(),
                            cause: "the client returned no send result".into(),
                        },
                        permanent: false,
                    })
            }
            Outgoing::Batch(messages) => {
                let action = format!("send a batch of {} to {wire}", messages.len());
                producer
                    .send_batch_with_timeout(messages, timeout)
                    .await
                    .map_err(|err| failure(action, err))
            }
        }
    }

    pub async fn shutdown(self) {
        self.current.into_inner().producer.shutdown().await;
    }
}

async fn start_client(
    runtime: &Arc<ClientRuntime>,
    rpc_hook: Option<Arc<ClientRpcHook>>,
    settings: &ProducerSettings,
) -> Result<DefaultMQProducer, MqError> {
    let mut builder = DefaultMQProducer::builder(runtime.clone())
        .name_server_addr(settings.name_server.clone())
        .producer_group(settings.group.clone())
        .retry_times_when_send_failed(settings.retries)
        .send_msg_timeout(u32::try_from(settings.send_timeout.as_millis()).unwrap_or(u32::MAX));
    if let Some(hook) = rpc_hook {
        builder = builder.rpc_hook(hook);
    }
    let mut producer = builder.build();
    producer
        .start()
        .await
        .map_err(|err| MqError::new(format!("start producer group {}", settings.group), &err))?;
    Ok(producer)
}

/// What one send carries: a message, or a batch of messages for one topic.
#[derive(Clone)]
enum Outgoing {
    One(Message),
    Batch(Vec<Message>),
}

/// A message for `wire` with its id (`UNIQ_KEY`) fixed: `id`, or a new one;
/// `retry_topic`, for a message sent to a retry topic, names the topic it
/// came from (which the consumer shows instead of the retry topic).
///
/// The id is fixed before the first attempt: the client only assigns one
/// when the message has none, so every retry, a clone sent on a fresh
/// client, carries the same id. A send the broker stored but whose answer
/// was lost then comes back as a duplicate with the same id, which is what
/// consumers dedupe on.
fn build_message(
    wire: &str,
    body: Vec<u8>,
    tags: Option<&str>,
    keys: Vec<String>,
    id: Option<String>,
    retry_topic: Option<&str>,
) -> Result<Message, MqError> {
    let mut builder = Message::builder().topic(wire).keys(keys).body(body);
    if let Some(tags) = tags {
        builder = builder.tags(tags);
    }
    if let Some(id) = id {
        builder = builder.property(MessagePropertyKey::UniqueClientMsgId, id);
    }
    if let Some(topic) = retry_topic {
        builder = builder.property(MessagePropertyKey::RetryTopic, topic.to_string());
    }
    let mut message = builder
        .build()
        .map_err(|err| MqError::new(format!("build a message for {wire}"), &err))?;
    MessageClientIDSetter::set_uniq_id(&mut message);
    Ok(message)
}

/// A send that failed, and whether another attempt could succeed.
struct SendFailure {
    error: MqError,
    permanent: bool,
}

/// RocketMQ's `MESSAGE_ILLEGAL` and `NO_PERMISSION` response codes.
const MESSAGE_ILLEGAL: i32 = 13;
const NO_PERMISSION: i32 = 16;

/// What a broker's response code to a send means, for an operator.
fn broker_code_meaning(code: i32) -> String {
    let meaning = match code {
        1 => Some(
            "a system error: the broker could not store it (its store busy, or a commit log file it could not create)",
        ),
        2 => Some("the broker is busy and sheds load"),
        14 => Some(
            "the broker's store takes no messages: its disk is more than 90 % used (it refuses sends past its diskSpaceWarningLevelRatio), or it is a slave or shutting down",
        ),
        17 => Some(
            "the topic does not exist and the broker does not create topics (autoCreateTopicEnable)",
        ),
        _ => None,
    };
    match meaning {
        Some(meaning) => format!("the broker answered code {code}, {meaning}"),
        None => format!("the broker answered code {code}"),
    }
}

/// Whether no retry can mend `err`: the client refused the message itself
/// (an empty or oversized body, an illegal property), or the broker refused
/// it as illegal or not permitted. Anything else (a timeout, a refused
/// connection, a busy or restarting broker, a route not known yet) may
/// pass on the next attempt.
fn permanent(err: &ClientError) -> bool {
    err.source_ref::<rocketmq_client_rust::MQClientException>()
        .is_some_and(|refused| refused.response_code() == MESSAGE_ILLEGAL)
        || matches!(
            err.broker_response_code(),
            Some(MESSAGE_ILLEGAL | NO_PERMISSION)
        )
}

/// Sends accepted events' follow-up messages through the built-in producer,
/// from the client's listener threads.
pub struct PublisherOutbox {
    publisher: Arc<Publisher>,
    runtime: tokio::runtime::Handle,
}

/// The most an event's follow-up messages may take, however much of the
/// listener timeout is left (the dispatcher's budget may be less).
const OUTBOX_BUDGET: Duration = Duration::from_secs(10);

impl PublisherOutbox {
    pub fn new(publisher: Arc<Publisher>, runtime: tokio::runtime::Handle) -> Self {
        PublisherOutbox { publisher, runtime }
    }
}

impl crate::dispatch::OutboxSender for PublisherOutbox {
    fn send(
        &self,
        plugin: &str,
        delivery: &crate::delivery::Delivery,
        messages: &[crate::wasm::OutgoingMessage],
        budget: Duration,
    ) -> Result<(), String> {
        let budget = budget.min(OUTBOX_BUDGET);
        let send_all = async {
            for (index, message) in messages.iter().enumerate() {
                let mut keys = vec![crate::wasm::follow_up_key(&delivery.message_id, index)];
                keys.extend(message.keys.iter().cloned());
                let id = crate::wasm::follow_up_id(plugin, &delivery.message_id, index, message);
                // Each follow-up is its own span, under the plugin's.
                let span =
                    delivery.trace.parent.is_some().then(|| {
                        SendSpan::start(&delivery.trace, plugin, message.topic.wire(), &id)
                    });
                let trace = span.as_ref().map(SendSpan::properties).unwrap_or_default();
                let sent = self
                    .publisher
                    .publish_traced(
                        &message.topic,
                        message.body.clone(),
                        message.tag.as_deref(),
                        keys,
                        Some(id),
                        &trace,
                    )
                    .await
                    .map_err(|err| {
                        format!(
                            "message {} of {} to {}: {err}",
                            index + 1,
                            messages.len(),
                            message.topic.wire()
                        )
                    });
                if let Some(span) = span {
                    span.end(sent.as_ref().err().map(String::as_str));
                }
                sent?;
            }
            Ok(())
        };
        // A listener thread is a blocking one: it may wait on the runtime.
        self.runtime.block_on(async {
            tokio::time::timeout(budget, send_all)
                .await
                .unwrap_or_else(|_| Err(format!("not sent within {budget:?}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let backoff = Backoff {
            attempts: 6,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
        };
        let pauses: Vec<u128> = (1..=5).map(|n| backoff.pause(n).as_millis()).collect();
        assert_eq!(pauses, [200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn a_refused_send_names_the_brokers_code_and_what_it_means() {
        let full = broker_code_meaning(14);
        assert!(full.contains("code 14") && full.contains("disk"), "{full}");
        assert!(broker_code_meaning(17).contains("autoCreateTopicEnable"));
        assert_eq!(broker_code_meaning(215), "the broker answered code 215");
    }
}
