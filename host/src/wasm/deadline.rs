//! An event's time: the epoch tick that interrupts running wasm, and the
//! wait limit that ends a plugin's blocking waits (clock subscriptions, and
//! outbound requests the host runs off the store) at the event's deadline.
//! A leaf: the engine, the clocks, the state and the capabilities all read
//! it, and it reads none of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the epoch advances; deadlines are whole ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How long one store's waits may last.
#[derive(Debug, Default)]
pub(crate) struct WaitLimit {
    deadline: Option<Instant>,
    cut_short: bool,
    /// Set by I/O the host runs off the store (an outbound HTTP request)
    /// that was still waiting at the deadline.
    io_cut: Arc<AtomicBool>,
}

impl WaitLimit {
    /// Starts a new event (or instantiation) that may run for `limit`.
    pub(crate) fn start(&mut self, limit: Duration) {
        self.deadline = Instant::now().checked_add(limit);
        self.cut_short = false;
        self.io_cut.store(false, Ordering::Release);
    }

    /// Whether a wait since [`WaitLimit::start`] asked to go past the deadline.
    pub(crate) fn cut_short(&self) -> bool {
        self.cut_short || self.io_cut.load(Ordering::Acquire)
    }

    /// The current event's deadline, if one has started.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The flag off-store I/O sets when the deadline ends its wait.
    pub(crate) fn io_cut(&self) -> Arc<AtomicBool> {
        self.io_cut.clone()
    }

    /// `wait`, or what is left until the deadline (plus two ticks) when
    /// that is shorter: then the wait is remembered as cut short.
    pub(crate) fn clamp(&mut self, wait: Duration) -> Duration {
        let Some(deadline) = self.deadline else {
            return wait;
        };
        let left = deadline.saturating_duration_since(Instant::now()) + 2 * EPOCH_TICK;
        if wait > left {
            self.cut_short = true;
            left
        } else {
            wait
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_within_the_limit_is_left_alone() {
        let mut limit = WaitLimit::default();
        limit.start(Duration::from_secs(3600));
        assert_eq!(
            limit.clamp(Duration::from_millis(5)),
            Duration::from_millis(5)
        );
        assert!(!limit.cut_short());
    }

    #[test]
    fn a_wait_past_the_limit_ends_at_it_and_is_remembered() {
        let mut limit = WaitLimit::default();
        limit.start(Duration::from_millis(100));
        assert!(
            limit.clamp(Duration::from_secs(60)) <= Duration::from_millis(100) + 2 * EPOCH_TICK
        );
        assert!(limit.cut_short());
        limit.start(Duration::from_millis(100));
        assert!(!limit.cut_short(), "each event starts afresh");
    }

    #[test]
    fn without_a_limit_nothing_is_cut() {
        let mut limit = WaitLimit::default();
        assert_eq!(limit.clamp(Duration::MAX), Duration::MAX);
        assert!(!limit.cut_short());
    }
}
