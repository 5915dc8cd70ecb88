//! What happened to an event in a plugin, and what RocketMQ is told.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// The result of running one event through one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// The handler returned `ok`.
    Accepted,
    /// The handler returned `err` with this reason, and said what should
    /// become of the message.
    Rejected {
        reason: String,
        disposition: Disposition,
    },
    /// The handler did not finish: it trapped, ran out of time or memory, or
    /// the host failed around the call. The instance and its `Store` are gone.
    Failed(HandlerFailure),
}

/// What a handler that returned `err` asks for the message (contract 0.2;
/// a 0.1 plugin's `err` is always [`Disposition::Retry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Redeliver on the broker's schedule (ConsumeRetryLater).
    Retry,
    /// Redeliver no sooner than this: the smallest of RocketMQ's delay
    /// levels that is at least as long (see [`delay_level`]).
    RetryAfter(Duration),
    /// No retry can help (a poison event): to the dead-letter queue now.
    DeadLetter,
}

impl HandlerOutcome {
    /// `err` with the broker's retry schedule, as 0.1 plugins return it.
    pub fn rejected(reason: impl Into<String>) -> Self {
        HandlerOutcome::Rejected {
            reason: reason.into(),
            disposition: Disposition::Retry,
        }
    }
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
    /// Send the message back to the broker with this delay level (its
    /// redelivery counts as a retry), then acknowledge it. If it cannot be
    /// sent back, ConsumeRetryLater.
    RetryAfter { delay_level: u8 },
    /// Send the message back with delay level -1, which the broker moves to
    /// `%DLQ%<group>` with its properties, then acknowledge it. If it cannot
    /// be sent back, ConsumeRetryLater.
    DeadLetter,
}

impl DeliveryOutcome {
    /// The outcome's name on `/metrics` and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::ConsumeSuccess => "success",
            DeliveryOutcome::ConsumeRetryLater => "retry_later",
            DeliveryOutcome::RetryAfter { .. } => "retry_after",
            DeliveryOutcome::DeadLetter => "dead_letter",
        }
    }
}

/// RocketMQ's delay levels as its brokers ship them (`messageDelayLevel`):
/// level N waits `DELAY_LEVELS[N - 1]`.
pub const DELAY_LEVELS: [Duration; 18] = {
    const fn s(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }
    [
        s(1),
        s(5),
        s(10),
        s(30),
        s(60),
        s(120),
        s(180),
        s(240),
        s(300),
        s(360),
        s(420),
        s(480),
        s(540),
        s(600),
        s(1200),
        s(1800),
        s(3600),
        s(7200),
    ]
};

/// The delay level for "no sooner than `delay`": the smallest level that
/// waits at least that long, or the longest (2 h) for anything longer.
pub fn delay_level(delay: Duration) -> u8 {
    let index = DELAY_LEVELS
        .iter()
        .position(|level| *level >= delay)
        .unwrap_or(DELAY_LEVELS.len() - 1);
    u8::try_from(index + 1).unwrap_or(u8::MAX)
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

/// The outcome rule, in one place (the table in docs/plugins.md, "What
/// becomes of a rejected message", mirrors it).
pub fn delivery_outcome(handled: &HandlerOutcome) -> DeliveryOutcome {
    match handled {
        HandlerOutcome::Accepted => DeliveryOutcome::ConsumeSuccess,
        HandlerOutcome::Rejected { disposition, .. } => match disposition {
            Disposition::Retry => DeliveryOutcome::ConsumeRetryLater,
            Disposition::RetryAfter(delay) => DeliveryOutcome::RetryAfter {
                delay_level: delay_level(*delay),
            },
            Disposition::DeadLetter => DeliveryOutcome::DeadLetter,
        },
        HandlerOutcome::Failed(_) => DeliveryOutcome::ConsumeRetryLater,
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
            delivery_outcome(&HandlerOutcome::rejected("no stock")),
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
    fn a_handler_chooses_a_later_retry_or_the_dead_letter_queue() {
        let after = |delay| {
            delivery_outcome(&HandlerOutcome::Rejected {
                reason: "busy".into(),
                disposition: Disposition::RetryAfter(delay),
            })
        };
        assert_eq!(
            after(Duration::from_secs(30)),
            DeliveryOutcome::RetryAfter { delay_level: 4 }
        );
        assert_eq!(
            delivery_outcome(&HandlerOutcome::Rejected {
                reason: "poison".into(),
                disposition: Disposition::DeadLetter,
            }),
            DeliveryOutcome::DeadLetter
        );
    }

    #[test]
    fn a_delay_maps_to_the_first_level_no_shorter() {
        let ms = Duration::from_millis;
        assert_eq!(delay_level(ms(0)), 1);
        assert_eq!(delay_level(ms(1_000)), 1);
        assert_eq!(delay_level(ms(1_001)), 2, "no sooner than asked");
        assert_eq!(delay_level(ms(5_000)), 2);
        assert_eq!(delay_level(ms(45_000)), 5);
        assert_eq!(delay_level(ms(7_200_000)), 18);
        assert_eq!(delay_level(Duration::MAX), 18, "capped at 2 h");
        for (index, level) in DELAY_LEVELS.iter().enumerate() {
            assert_eq!(usize::from(delay_level(*level)), index + 1);
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
