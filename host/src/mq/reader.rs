//! Reading a topic without consuming it: a pull consumer walks every queue
//! from its first to its last offset and commits nothing, so no consumer
//! group's progress moves (the dead-letter tools use it).

// Classic Pull is deprecated in favour of the lite pull consumer, which
// tracks and commits offsets for its group; reading a topic without moving
// anything is exactly what the classic one's explicit offsets are for.
#[allow(deprecated)]
use rocketmq_client_rust::{DefaultMQPullConsumer, PullStatus};

use super::client::MqRuntime;
use super::consumer::delivery_of;
use super::error::{MqError, error_chain};
use crate::delivery::Delivery;
use crate::topic::TopicName;

/// Most messages one pull asks for.
const BATCH: i32 = 32;

/// Every message in `topic` as (delivery, body), queue by queue in offset
/// order, at most `limit` of them. `Ok(None)` when the topic does not exist.
#[allow(deprecated)]
pub async fn read_topic(
    mq: &MqRuntime,
    name_server: &str,
    topic: &TopicName,
    limit: usize,
) -> Result<Option<Vec<(Delivery, Vec<u8>)>>, MqError> {
    let wire = topic.wire();
    let mut builder = DefaultMQPullConsumer::builder(mq.client())
        .name_server_addr(name_server.to_string())
        // Never used to commit: a pull consumer moves no offset by itself.
        .consumer_group("mqplug-topic-reader");
    if let Some(hook) = mq.rpc_hook() {
        builder = builder.rpc_hook(hook);
    }
    let consumer = builder
        .build()
        .map_err(|err| MqError::new(format!("build a reader of {wire}"), &err))?;
    consumer
        .start()
        .await
        .map_err(|err| MqError::new(format!("start a reader of {wire}"), &err))?;
    let result = async {
        let queues = match consumer.fetch_subscribe_message_queues(wire).await {
            Ok(queues) => queues,
            // No such topic, or one the name server does not know yet: a
            // topic the broker just created is routed after its next
            // registration with the name server.
            Err(err)
                if {
                    let text = format!("{err} {}", error_chain(&err)).to_ascii_lowercase();
                    ["not exist", "no route data"]
                        .iter()
                        .any(|what| text.contains(what))
                } =>
            {
                return Ok(None);
            }
            Err(err) => return Err(MqError::new(format!("find the queues of {wire}"), &err)),
        };
        let mut messages = Vec::new();
        for queue in &queues {
            let first = consumer
                .min_offset(queue)
                .await
                .map_err(|err| MqError::new(format!("read the first offset of {wire}"), &err))?;
            let end = consumer
                .max_offset(queue)
                .await
                .map_err(|err| MqError::new(format!("read the last offset of {wire}"), &err))?;
            let mut offset = first;
            while offset < end && messages.len() < limit {
                let pulled = consumer
                    .pull(queue, "*", offset, BATCH)
                    .await
                    .map_err(|err| MqError::new(format!("pull from {wire}"), &err))?;
                if *pulled.pull_status() == PullStatus::Found {
                    for message in pulled.msg_found_list().unwrap_or_default() {
                        let body = message.body();
                        let body = body.as_deref().unwrap_or_default().to_vec();
                        messages.push((delivery_of(message), body));
                    }
                }
                let next = i64::try_from(pulled.next_begin_offset()).unwrap_or(end);
                if next <= offset {
                    break;
                }
                offset = next;
            }
        }
        messages.truncate(limit);
        Ok(Some(messages))
    }
    .await;
    let _ = consumer.shutdown().await;
    result
}
