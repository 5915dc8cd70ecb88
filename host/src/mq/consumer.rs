//! One RocketMQ push consumer per plugin, in the plugin's own group.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rocketmq_client_rust::{
    ClientConfig, ClientResult, ConsumeConcurrentlyContext, ConsumeConcurrentlyStatus,
    DefaultMQPushConsumer, MQPushConsumer, MessageListenerConcurrently,
};
use rocketmq_model::common::consumer::consume_from_where::ConsumeFromWhere;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_protocol::protocol::heartbeat::message_model::MessageModel;
use serde::Deserialize;
use tracing::warn;

use super::client::MqRuntime;
use super::error::MqError;
use crate::delivery::Delivery;
use crate::outcome::DeliveryOutcome;
use crate::topic::TopicName;

/// Whatever handles a message; the dispatcher in mqplug, a closure in tests.
pub trait MessageHandler: Send + Sync + 'static {
    fn on_message(&self, delivery: &Delivery, body: &[u8]) -> DeliveryOutcome;

    /// [`MessageHandler::on_message`] as a future: a listener call with
    /// several messages awaits them all at once on its thread. The default
    /// runs the blocking call.
    fn on_message_async<'a>(&'a self, delivery: &'a Delivery, body: &'a [u8]) -> OutcomeFuture<'a> {
        Box::pin(async move { self.on_message(delivery, body) })
    }
}

/// What [`MessageHandler::on_message_async`] returns.
pub type OutcomeFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = DeliveryOutcome> + Send + 'a>>;

/// Where a consumer group that has no stored offset starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsumeFrom {
    /// Only messages published from now on: a new plugin does not replay
    /// the topic's history. (The host sets a new group's offsets to the
    /// queues' ends before it starts: see `RouteClient::start_new_group_at_end`.)
    #[default]
    Last,
    /// Everything still on the broker.
    First,
}

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Name server addresses, `;`-separated.
    pub name_server: String,
    pub group: String,
    pub topic: TopicName,
    /// RocketMQ tag expression, e.g. `*` or `USER_REGISTER || TASK_DONE`.
    pub tags: String,
    /// Messages handled at once.
    pub concurrency: u32,
    /// Messages one listener call takes, handled at once on its thread.
    pub batch: u32,
    /// Redeliveries before the broker dead-letters a message; -1 is
    /// RocketMQ's default (16).
    pub max_reconsume_times: i32,
    /// Messages held ahead of the handler over all queues; `None` is the
    /// client's default (1,000 per queue).
    pub prefetch: Option<u32>,
    pub consume_from: ConsumeFrom,
    /// How long shutdown waits for in-flight handlers.
    pub drain_timeout: Duration,
}

/// A started push consumer; [`PluginConsumer::shutdown`] drains it.
pub struct PluginConsumer {
    consumer: SharedConsumer,
    group: String,
    /// Listener calls running now.
    in_flight: Arc<InFlight>,
    drain_timeout: Duration,
}

/// The consumer, shared with its listener, which sends messages back to the
/// broker through it (a handler's retry-after or dead-letter). The client
/// takes `&mut` to send back; [`PluginConsumer::shutdown`] takes the
/// consumer out first, so a listener still running then falls back to
/// ConsumeRetryLater instead of waiting on the drain that waits on it.
type SharedConsumer = Arc<tokio::sync::Mutex<Option<DefaultMQPushConsumer>>>;

/// How long a listener waits to send a message back (for the lock, which
/// start holds, and for the broker) before falling back to ConsumeRetryLater.
const SEND_BACK_BUDGET: Duration = Duration::from_secs(10);

/// What one listener call may take before the client counts it failed
/// (its 30 s listener timeout), less a second for the answer.
const LISTENER_BUDGET: Duration = Duration::from_secs(29);

impl PluginConsumer {
    /// Subscribes and starts consuming. Every message is handed to `handler`
    /// on its own and gets its own outcome, also when a listener call takes
    /// several (`settings.batch`): a message of a batch that is not
    /// acknowledged is sent back to the broker alone.
    pub async fn start(
        runtime: &MqRuntime,
        settings: &ConsumerSettings,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<PluginConsumer, MqError> {
        let concurrency = settings.concurrency.max(1);
        let drain_millis = u64::try_from(settings.drain_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut client = ClientConfig::default();
        client.set_instance_name(runtime.instance_name().into());
        let consumer = DefaultMQPushConsumer::builder(runtime.client())
            .client_config(client)
            .name_server_addr(settings.name_server.clone())
            .consumer_group(settings.group.clone())
            .message_model(MessageModel::Clustering)
            .consume_from_where(match settings.consume_from {
                ConsumeFrom::Last => ConsumeFromWhere::ConsumeFromLastOffset,
                ConsumeFrom::First => ConsumeFromWhere::ConsumeFromFirstOffset,
            })
            .consume_thread_min(concurrency)
            .consume_thread_max(concurrency)
            .consume_message_batch_max_size(settings.batch.max(1))
            .max_reconsume_times(settings.max_reconsume_times)
            .await_termination_millis_when_shutdown(drain_millis)
            .rpc_hook(runtime.rpc_hook());
        let consumer = match settings.prefetch {
            // The config bounds it far below i32::MAX.
            Some(prefetch) => consumer
                .pull_threshold_for_topic(i32::try_from(prefetch).unwrap_or(i32::MAX))
                .build(),
            None => consumer.build(),
        };
        let shared: SharedConsumer = Arc::new(tokio::sync::Mutex::new(Some(consumer)));
        // Held until the consumer has started: a message that comes in
        // sooner and must be sent back waits for it.
        let mut guard = shared.clone().lock_owned().await;
        let consumer = guard.as_mut().expect("just built");
        let wire = settings.topic.wire();
        consumer
            .subscribe(wire, normalize_tags(&settings.tags))
            .await
            .map_err(|err| {
                MqError::new(
                    format!("group {} subscribe to {wire}", settings.group),
                    &err,
                )
            })?;
        let in_flight = Arc::new(InFlight::default());
        consumer.register_message_listener_concurrently(Listener {
            handler,
            in_flight: in_flight.clone(),
            consumer: shared.clone(),
            runtime: tokio::runtime::Handle::current(),
            group: settings.group.clone(),
        });
        if let Err(err) = consumer.start().await {
            // The listener holds the consumer's mutex, which holds the
            // consumer, which holds the listener: break the cycle, or the
            // half-started consumer and its handler are never freed.
            if let Some(mut consumer) = guard.take() {
                consumer.shutdown().await;
            }
            return Err(MqError::new(
                format!("start consumer group {}", settings.group),
                &err,
            ));
        }
        drop(guard);
        Ok(PluginConsumer {
            consumer: shared,
            group: settings.group.clone(),
            in_flight,
            drain_timeout: settings.drain_timeout,
        })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Asks the name server for `wire`'s route now and rebalances, so a
    /// topic created after the consumer started is read at once instead of
    /// at the client's next route refresh (30 s) and rebalance (20 s).
    /// Returns how many queues the topic has.
    pub async fn pick_up_topic(&self, wire: &str) -> Result<usize, MqError> {
        let mut guard = self.consumer.lock().await;
        let Some(consumer) = guard.as_mut() else {
            return Ok(0);
        };
        let queues = consumer
            .fetch_subscribe_message_queues(wire)
            .await
            .map_err(|err| {
                MqError::new(
                    format!("group {} read the route of {wire}", self.group),
                    &err,
                )
            })?;
        // Resuming a consumer that is not suspended only rebalances it.
        consumer.resume().await;
        Ok(queues.len())
    }

    /// Stops pulling, waits for in-flight handlers (up to the drain timeout)
    /// so their outcomes reach the broker, and leaves the group.
    pub async fn shutdown(self) {
        // Stop pulling first and let the handlers running at this moment
        // finish with the consumer in place, so one that asks for a
        // retry-after or the dead-letter queue can still send its message
        // back; only then is the consumer taken out and shut down (which
        // drains what started since; messages pulled but not started are
        // redelivered later, as before).
        if let Some(consumer) = self.consumer.lock().await.as_ref() {
            consumer.suspend().await;
        }
        let running = self.in_flight.running();
        let until = Instant::now() + self.drain_timeout;
        while Instant::now() < until && self.in_flight.any_of(&running) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let consumer = self.consumer.lock().await.take();
        if let Some(mut consumer) = consumer {
            consumer.shutdown().await;
        }
    }
}

/// Writes a tag expression as `A||B`, without spaces. rocketmq-client-rust
/// 1.0.0 trims each tag but hashes it untrimmed, so `A || B` sends the broker
/// hash codes of `A ` and ` B`, and the broker filters out every message.
fn normalize_tags(expression: &str) -> String {
    let tags: Vec<&str> = expression
        .split("||")
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .collect();
    if tags.is_empty() || tags.contains(&"*") {
        "*".to_string()
    } else {
        tags.join("||")
    }
}

/// The listener calls running, by a number each gets as it starts.
#[derive(Default)]
struct InFlight {
    next: AtomicU64,
    running: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl InFlight {
    fn begin(&self) -> Running<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id);
        Running { calls: self, id }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The calls running now.
    fn running(&self) -> Vec<u64> {
        self.lock().iter().copied().collect()
    }

    /// Whether any of `calls` still runs.
    fn any_of(&self, calls: &[u64]) -> bool {
        let running = self.lock();
        calls.iter().any(|id| running.contains(id))
    }
}

struct Listener {
    handler: Arc<dyn MessageHandler>,
    in_flight: Arc<InFlight>,
    consumer: SharedConsumer,
    /// The runtime the consumer was started on; a listener thread is a
    /// blocking one and may wait on it.
    runtime: tokio::runtime::Handle,
    group: String,
}

impl Listener {
    /// Sends `msg` back to the broker with `delay_level` (-1: the
    /// dead-letter queue), as the Java client does with a context's
    /// `delayLevelWhenNextConsume`, which rocketmq-client-rust 1.0.0 does
    /// not let a listener set. `true` once the broker has it.
    /// Within what is left of the listener timeout since `started`, at most
    /// [`SEND_BACK_BUDGET`].
    fn send_back(&self, msg: &MessageExt, delay_level: i32, started: Instant) -> bool {
        let budget = SEND_BACK_BUDGET.min(LISTENER_BUDGET.saturating_sub(started.elapsed()));
        let sent = self.runtime.block_on(async {
            tokio::time::timeout(budget, async {
                let mut consumer = self.consumer.lock().await;
                let Some(consumer) = consumer.as_mut() else {
                    return Err("the consumer is shutting down".to_string());
                };
                consumer
                    .send_message_back_to_origin_broker(msg.clone(), delay_level)
                    .await
                    .map_err(|err| err.to_string())
            })
            .await
            .unwrap_or_else(|_| Err(format!("not done within {budget:?}")))
        });
        match sent {
            Ok(()) => true,
            Err(why) => {
                warn!(
                    group = %self.group,
                    delay_level,
                    "could not send the message back ({why}); retrying it on the broker's schedule"
                );
                false
            }
        }
    }
}

impl MessageListenerConcurrently for Listener {
    fn consume_message(
        &self,
        msgs: &[&MessageExt],
        _context: &ConsumeConcurrentlyContext,
    ) -> ClientResult<ConsumeConcurrentlyStatus> {
        let _running = self.in_flight.begin();
        let started = Instant::now();
        let alone = msgs.len() == 1;
        let outcomes = if alone {
            let body = msgs[0].body();
            vec![
                self.handler
                    .on_message(&delivery_of(msgs[0]), body.as_deref().unwrap_or_default()),
            ]
        } else {
            // A batch is handled at once on this thread: while one handler
            // waits (a response, a sleep), the others run.
            let deliveries: Vec<Delivery> = msgs.iter().map(|msg| delivery_of(msg)).collect();
            let bodies: Vec<_> = msgs.iter().map(|msg| msg.body()).collect();
            let handling = deliveries.iter().zip(&bodies).map(|(delivery, body)| {
                self.handler
                    .on_message_async(delivery, body.as_deref().unwrap_or_default())
            });
            self.runtime.block_on(join_all(handling.collect()))
        };
        let mut status = ConsumeConcurrentlyStatus::ConsumeSuccess;
        for (msg, outcome) in msgs.iter().zip(outcomes) {
            let delay_level = match outcome {
                DeliveryOutcome::ConsumeSuccess => continue,
                // Alone, the client sends it back on the broker's schedule.
                DeliveryOutcome::ConsumeRetryLater if alone => None,
                // In a batch, ReconsumeLater would send back the batch's
                // successes too: this one goes back alone, on the broker's
                // schedule (delay level 0, as the client's own send-back).
                DeliveryOutcome::ConsumeRetryLater => Some(0),
                DeliveryOutcome::RetryAfter { delay_level } => Some(i32::from(delay_level)),
                DeliveryOutcome::DeadLetter => Some(-1),
            };
            // Sent back, the message is the broker's again: acknowledged here.
            // If it could not be, the whole call is retried: its successes
            // are delivered again (at least once).
            if !delay_level.is_some_and(|level| self.send_back(msg, level, started)) {
                status = ConsumeConcurrentlyStatus::ReconsumeLater;
            }
        }
        Ok(status)
    }
}

/// Awaits every future at once, polling each that is not done yet; their
/// outputs in order.
async fn join_all(mut futures: Vec<OutcomeFuture<'_>>) -> Vec<DeliveryOutcome> {
    let mut outputs: Vec<Option<DeliveryOutcome>> = vec![None; futures.len()];
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(outcome) => *output = Some(outcome),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Marks a listener call ended when it ends, however it ends.
struct Running<'a> {
    calls: &'a InFlight,
    id: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.calls.lock().remove(&self.id);
    }
}

/// The producer's id survives redeliveries; the broker's offset id does not.
const UNIQ_KEY: &str = "UNIQ_KEY";

pub(super) fn delivery_of(msg: &MessageExt) -> Delivery {
    let message_id = msg
        .properties()
        .get(UNIQ_KEY)
        .map(|id| id.to_string())
        .unwrap_or_else(|| msg.msg_id().to_string());
    Delivery {
        message_id,
        topic: msg.topic().to_string(),
        tags: msg.get_tags().map(|tags| tags.to_string()),
        keys: msg.keys().unwrap_or_default(),
        reconsume_times: u32::try_from(msg.reconsume_times()).unwrap_or(0),
        queue_id: u32::try_from(msg.queue_id()).unwrap_or(0),
        queue_offset: msg.queue_offset(),
        born_timestamp: msg.born_timestamp(),
        trace: crate::traces::TraceContext::from_properties(|name| {
            msg.properties().get(name).map(|value| value.as_str())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_tags;

    #[test]
    fn tag_expressions_lose_their_spaces() {
        assert_eq!(
            normalize_tags("USER_REGISTER || INVITE_FRIEND"),
            "USER_REGISTER||INVITE_FRIEND"
        );
        assert_eq!(normalize_tags(" A "), "A");
        assert_eq!(normalize_tags("*"), "*");
        assert_eq!(normalize_tags(""), "*");
        assert_eq!(normalize_tags(" || "), "*");
    }
}
