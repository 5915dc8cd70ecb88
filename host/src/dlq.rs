//! Dead letters: what is in a plugin's `%DLQ%<group>`, read without
//! disturbing it, and sent back through the plugin's current build
//! (`mqplug dlq list`, `mqplug dlq redrive`).
//!
//! RocketMQ never deletes a message from a topic, the dead-letter queue
//! included, and reading it here moves no consumer group's offset: every
//! `read` sees everything still on the broker.

use crate::delivery::Delivery;
use crate::event::{DEFAULT_MAX_BODY_BYTES, TaskEvent};
use crate::mq::{MqError, MqRuntime, read_topic};
use crate::text::inert;
use crate::topic::TopicName;

/// Most dead letters one command reads.
pub const MAX_DEAD_LETTERS: usize = 10_000;

/// One message in a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// As the plugin saw it: the producer's message id (the same on every
    /// redelivery), its tag and keys, how often it was retried.
    pub delivery: Delivery,
    pub body: Vec<u8>,
}

impl DeadLetter {
    /// The event in a line: type, user, campaign and its data (what most
    /// often made the handler fail); or why the body is not an event.
    /// Untrusted: escaped and cut.
    pub fn summary(&self) -> String {
        match TaskEvent::decode(&self.body, DEFAULT_MAX_BODY_BYTES) {
            Ok(event) => format!(
                "{} by user {} in {} ({}) data {}",
                inert(&event.event_type, 64),
                event.user_id,
                inert(&event.campaign_id, 64),
                inert(&event.campaign_name, 64),
                inert(
                    &serde_json::Value::Object(event.event_data).to_string(),
                    256
                ),
            ),
            Err(err) => format!("not a task event: {}", inert(&err.to_string(), 160)),
        }
    }
}

/// The dead-letter topic of consumer group `group`.
pub fn topic_of(group: &str) -> Result<TopicName, String> {
    TopicName::new(&format!("%DLQ%{group}")).map_err(|err| err.to_string())
}

/// Every message in `%DLQ%<group>`, oldest first. `Ok(None)` when the
/// topic does not exist: nothing was ever dead-lettered in that group.
pub async fn read(
    mq: &MqRuntime,
    name_server: &str,
    group: &str,
) -> Result<Option<Vec<DeadLetter>>, MqError> {
    let topic = topic_of(group).map_err(|why| {
        MqError::new(
            format!("read the dead letters of group {group}"),
            &std::io::Error::other(why),
        )
    })?;
    let Some(messages) = read_topic(mq, name_server, &topic, MAX_DEAD_LETTERS).await? else {
        return Ok(None);
    };
    let mut letters: Vec<DeadLetter> = messages
        .into_iter()
        .map(|(delivery, body)| DeadLetter { delivery, body })
        .collect();
    letters.sort_by_key(|letter| (letter.delivery.born_timestamp, letter.delivery.queue_offset));
    Ok(Some(letters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_names_the_event_or_why_it_is_not_one() {
        let letter = |body: &[u8]| DeadLetter {
            delivery: Delivery::default(),
            body: body.to_vec(),
        };
        let event = br#"{"EventType":"USER_REGISTER","UserID":7,"TenantID":"t","AppID":"a","CampaignID":"c-1","CampaignName":"name\u001b[31m","EventData":{"count":"x\u001b"},"Timestamp":"2026-11-25T14:19:15+08:00"}"#;
        let summary = letter(event).summary();
        assert!(
            summary.starts_with("USER_REGISTER by user 7 in c-1"),
            "{summary}"
        );
        assert!(!summary.contains('\u{1b}'), "escaped: {summary}");
        assert!(summary.contains(r#"data {"count":"x"#), "{summary}");
        assert!(
            letter(b"not json")
                .summary()
                .starts_with("not a task event")
        );
        assert_eq!(
            topic_of("mqplug-rewards").unwrap().wire(),
            "%DLQ%mqplug-rewards"
        );
    }
}
