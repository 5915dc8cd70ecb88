//! What happened to an event in a plugin, and what RocketMQ is told.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// The result of running one event through one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// The handler returned `ok`.
    Accepted,
    /// The handler returned `err` with this reason.
    Rejected { reason: String },
    /// The handler did not finish: it trapped, ran out of time or memory, or
    /// the host failed around the call. The instance and its `Store` are gone.
    Failed(HandlerFailure),
}

/// Why a handler did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerFailure {
    /// A trap: a Rust panic, `unreachable`, a stack overflow, a bad access...
    Trap { detail: String },
    /// The handler ran past its deadline and was interrupted.
    Deadline { limit: Duration },
    /// The plugin tried to grow its memory past its limit.
    MemoryLimit { detail: String },
    /// The handler used up its fuel (instructions) for the event.
    OutOfFuel { limit: u64 },
    /// The host could not run the handler (e.g. could not instantiate it).
    Host { detail: String },
}

impl fmt::Display for HandlerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerFailure::Trap { detail } => write!(f, "trap: {detail}"),
            HandlerFailure::Deadline { limit } => {
                write!(f, "deadline: interrupted after {} ms", limit.as_millis())
            }
            HandlerFailure::MemoryLimit { detail } => write!(f, "memory limit: {detail}"),
            HandlerFailure::OutOfFuel { limit } => {
                write!(
                    f,
                    "out of fuel: used all {limit} units of fuel for this event"
                )
            }
            HandlerFailure::Host { detail } => write!(f, "host failure: {detail}"),
        }
    }
}

/// What the consumer tells the broker about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Acknowledge: the message is done for this consumer group.
    ConsumeSuccess,
    /// Redeliver later through `%RETRY%<group>`; after the group's maximum
    /// reconsume times the broker moves it to `%DLQ%<group>`.
    ConsumeRetryLater,
}

/// What to do with a body that is not a task event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UndecodablePolicy {
    /// Redeliver, as the platform's reference consumer does: after the
    /// retries the message lands in the dead-letter queue, where it can be
    /// inspected. The default.
    #[default]
    Retry,
    /// Acknowledge and drop it (logged); nothing reaches the dead-letter queue.
    Drop,
}

/// The outcome rule, in one place (the README's table mirrors it).
pub fn delivery_outcome(handled: &HandlerOutcome) -> DeliveryOutcome {
    match handled {
        HandlerOutcome::Accepted => DeliveryOutcome::ConsumeSuccess,
        HandlerOutcome::Rejected { .. } | HandlerOutcome::Failed(_) => {
            DeliveryOutcome::ConsumeRetryLater
        }
    }
}

/// The outcome for a body that could not be decoded.
pub fn undecodable_outcome(policy: UndecodablePolicy) -> DeliveryOutcome {
    match policy {
        UndecodablePolicy::Retry => DeliveryOutcome::ConsumeRetryLater,
        UndecodablePolicy::Drop => DeliveryOutcome::ConsumeSuccess,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_accepted_event_is_acknowledged() {
        let failures = [
            HandlerFailure::Trap {
                detail: "wasm trap: unreachable".into(),
            },
            HandlerFailure::Deadline {
                limit: Duration::from_secs(5),
            },
            HandlerFailure::MemoryLimit {
                detail: "grow".into(),
            },
            HandlerFailure::Host {
                detail: "instantiate".into(),
            },
        ];
        assert_eq!(
            delivery_outcome(&HandlerOutcome::Accepted),
            DeliveryOutcome::ConsumeSuccess
        );
        assert_eq!(
            delivery_outcome(&HandlerOutcome::Rejected {
                reason: "no stock".into()
            }),
            DeliveryOutcome::ConsumeRetryLater
        );
        for failure in failures {
            assert_eq!(
                delivery_outcome(&HandlerOutcome::Failed(failure)),
                DeliveryOutcome::ConsumeRetryLater
            );
        }
    }

    #[test]
    fn undecodable_bodies_are_retried_unless_configured_to_drop() {
        assert_eq!(
            undecodable_outcome(UndecodablePolicy::default()),
            DeliveryOutcome::ConsumeRetryLater
        );
        assert_eq!(
            undecodable_outcome(UndecodablePolicy::Drop),
            DeliveryOutcome::ConsumeSuccess
        );
    }

    #[test]
    fn failures_name_their_kind() {
        let text = HandlerFailure::Deadline {
            limit: Duration::from_millis(250),
        }
        .to_string();
        assert_eq!(text, "deadline: interrupted after 250 ms");
        let text = HandlerFailure::MemoryLimit { detail: "x".into() }.to_string();
        assert!(text.starts_with("memory limit"));
    }
}
