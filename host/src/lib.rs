//! mqplug: a WebAssembly plugin host for consumer-side business handlers on
//! Apache RocketMQ.
//!
//! One message's path: [`mq`] (push consumer) -> [`dispatch`] (decode with
//! [`event`], call the handler, map with [`outcome`]) -> [`wasm`] (plugin
//! instance) -> back to [`mq`] as ConsumeSuccess or ConsumeRetryLater.
//! See ARCHITECTURE.md for the invariants.

// The watcher task's future holds the RocketMQ client's deeply nested types;
// proving it `Send` needs more than the default 128 levels.
#![recursion_limit = "256"]

pub mod admin;
pub mod canary;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod delivery;
pub mod dispatch;
pub mod dlq;
pub mod event;
pub mod host;
pub mod metrics;
pub mod mq;
pub mod observe;
pub mod outcome;
pub mod page;
pub mod plan;
pub mod publish;
pub mod recorded;
pub mod replay;
pub mod scaffold;
pub mod shutdown;
pub mod slot;
pub mod store;
pub mod text;
pub mod topic;
pub mod traces;
pub mod wasm;

/// Generated cases per fuzz property: 10,000 in the suite;
/// `MQPLUG_FUZZ_CASES` sets more for a long run outside CI (RELIABILITY.md
/// has the commands).
#[cfg(test)]
pub(crate) fn fuzz_cases() -> u32 {
    std::env::var("MQPLUG_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(10_000)
}

/// `base` with the byte at `position` (modulo its length) replaced by
/// `byte`, or cut there: the near misses the fuzzers try.
#[cfg(test)]
pub(crate) fn mutated(base: &[u8], position: usize, byte: u8, cut: bool) -> Vec<u8> {
    let mut mutated = base.to_vec();
    let at = position % mutated.len();
    if cut {
        mutated.truncate(at);
    } else {
        mutated[at] = byte;
    }
    mutated
}

pub use config::{HostConfig, PluginConfig};
pub use delivery::Delivery;
pub use event::TaskEvent;
pub use host::{Host, HostError};
pub use outcome::{DeliveryOutcome, HandlerOutcome};
