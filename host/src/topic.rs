//! The topic name users see and the one RocketMQ accepts.

use std::fmt;

/// The marketing platform's event stream, as users know it.
pub const DEFAULT_TOPIC: &str = "marketing.task.completed";

/// A topic's name as configured and its legal name on the wire.
///
/// RocketMQ (Java and Rust, broker and client) only accepts topic names
/// matching `^[%|a-zA-Z0-9_-]+$`, so `marketing.task.completed` cannot be
/// used as is. mqplug maps each `.` to `_`: the consumer and the producer
/// both use the mapped name, so they always meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicName {
    configured: String,
    wire: String,
}

/// The longest topic name RocketMQ accepts.
const MAX_TOPIC_LEN: usize = 127;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicNameError {
    #[error("topic name is empty")]
    Empty,
    #[error(
        "topic {configured:?} maps to {wire:?}, which RocketMQ rejects: character {bad:?} is not allowed (only letters, digits, '_', '-', '%' and '|')"
    )]
    IllegalCharacter {
        configured: String,
        wire: String,
        bad: char,
    },
    #[error("topic {0:?} is longer than {MAX_TOPIC_LEN} characters")]
    TooLong(String),
}

/// Checks a topic or group name against RocketMQ's rule; returns the first
/// character it rejects.
pub fn check_resource_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '%' | '|')))
    {
        Some(bad) => Err(format!(
            "character {bad:?} is not allowed (only letters, digits, '_', '-', '%' and '|')"
        )),
        None => Ok(()),
    }
}

impl TopicName {
    pub fn new(configured: &str) -> Result<Self, TopicNameError> {
        if configured.is_empty() {
            return Err(TopicNameError::Empty);
        }
        let wire = configured.replace('.', "_");
        if let Some(bad) = wire
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '%' | '|')))
        {
            return Err(TopicNameError::IllegalCharacter {
                configured: configured.to_string(),
                wire,
                bad,
            });
        }
        if wire.len() > MAX_TOPIC_LEN {
            return Err(TopicNameError::TooLong(configured.to_string()));
        }
        Ok(TopicName {
            configured: configured.to_string(),
            wire,
        })
    }

    /// The name as users configure and see it, e.g. `marketing.task.completed`.
    pub fn configured(&self) -> &str {
        &self.configured
    }

    /// The name on the broker, e.g. `marketing_task_completed`.
    pub fn wire(&self) -> &str {
        &self.wire
    }

    /// Why RocketMQ keeps this topic for itself, if it does: a consumer
    /// group's retry or dead-letter topic, a light message queue, or one of
    /// the broker's system topics (Apache RocketMQ's `TopicValidator`).
    /// Publishing there would redeliver, dead-letter or schedule messages
    /// for other groups, or speak for the broker.
    pub fn reserved(&self) -> Option<&'static str> {
        const SYSTEM_TOPICS: [&str; 10] = [
            "TBW102",
            "SCHEDULE_TOPIC_XXXX",
            "BenchmarkTest",
            "RMQ_SYS_TRANS_HALF_TOPIC",
            "RMQ_SYS_TRACE_TOPIC",
            "RMQ_SYS_TRANS_OP_HALF_TOPIC",
            "TRANS_CHECK_MAX_TIME_TOPIC",
            "SELF_TEST_TOPIC",
            "OFFSET_MOVED_EVENT",
            "rmq_sys_offset_commit_event",
        ];
        let wire = self.wire.as_str();
        if wire.starts_with("%RETRY%") {
            Some("it is a consumer group's retry topic")
        } else if wire.starts_with("%DLQ%") {
            Some("it is a consumer group's dead-letter queue")
        } else if wire.starts_with('%') {
            Some("names starting with '%' are RocketMQ's own (%RETRY%, %DLQ%, %LMQ%, %SYS%)")
        } else if wire.starts_with("rmq_sys_") || SYSTEM_TOPICS.contains(&wire) {
            Some("it is one of the broker's system topics")
        } else {
            None
        }
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.configured == self.wire {
            write!(f, "{}", self.wire)
        } else {
            write!(f, "{} (on the wire: {})", self.configured, self.wire)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_map_to_underscores() {
        let topic = TopicName::new(DEFAULT_TOPIC).unwrap();
        assert_eq!(topic.wire(), "marketing_task_completed");
        assert_eq!(topic.configured(), "marketing.task.completed");
        assert_eq!(
            topic.to_string(),
            "marketing.task.completed (on the wire: marketing_task_completed)"
        );
    }

    #[test]
    fn retry_dead_letter_and_system_topics_are_reserved() {
        for reserved in [
            "%RETRY%rewards",
            "%DLQ%rewards",
            "%LMQ%x",
            "SCHEDULE_TOPIC_XXXX",
            "RMQ_SYS_TRANS_HALF_TOPIC",
            "rmq_sys_REVIVE_LOG_DefaultCluster",
            "TBW102",
        ] {
            assert!(
                TopicName::new(reserved).unwrap().reserved().is_some(),
                "{reserved}"
            );
        }
        for ordinary in ["marketing.reward.granted", "RETRY_rewards", "dlq"] {
            assert_eq!(TopicName::new(ordinary).unwrap().reserved(), None);
        }
    }

    #[test]
    fn legal_names_are_kept() {
        assert_eq!(TopicName::new("Orders-1|%x").unwrap().wire(), "Orders-1|%x");
    }

    #[test]
    fn names_still_illegal_after_mapping_are_rejected() {
        let err = TopicName::new("marketing task").unwrap_err();
        assert!(matches!(
            err,
            TopicNameError::IllegalCharacter { bad: ' ', .. }
        ));
        assert!(TopicName::new("活动").is_err());
        assert_eq!(TopicName::new(""), Err(TopicNameError::Empty));
        assert!(TopicName::new(&"a".repeat(128)).is_err());
    }
}
