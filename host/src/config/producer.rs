//! `[producer]`: the built-in producer.

use serde::Deserialize;

use crate::mq::DEFAULT_PRODUCER_GROUP;

/// The built-in producer: off unless `enabled`, like the platform's nil producer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    pub enabled: bool,
    pub group: String,
    pub retries: u32,
    pub send_timeout_ms: u64,
    /// Create the topic with this many queues at start-up (for local brokers;
    /// leave unset against a managed cluster).
    pub create_topic_queues: Option<i32>,
    /// After the client's own immediate retries fail, try again this many
    /// times, pausing `backoff_initial_ms`, doubling, at most `backoff_max_ms`.
    pub backoff_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            enabled: false,
            group: DEFAULT_PRODUCER_GROUP.to_string(),
            retries: 2,
            send_timeout_ms: 3000,
            create_topic_queues: None,
            backoff_attempts: 4,
            backoff_initial_ms: 200,
            backoff_max_ms: 5000,
        }
    }
}
