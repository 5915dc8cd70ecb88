//! Waits a plugin makes end at its event's deadline.
//!
//! The epoch deadline interrupts running wasm, not a host call that blocks: a
//! plugin that sleeps (`std::thread::sleep` is a `wasi:clocks/monotonic-clock`
//! subscription, then a blocking `wasi:io/poll` wait) held its thread for as
//! long as it asked, past its deadline and past the client's 30 s listener
//! timeout. The sandbox grants no sockets, files or stdin, so clock
//! subscriptions are the pollables a plugin can wait on; mqplug shadows the two
//! functions that make them and caps every wait at the deadline of the event
//! being handled, plus two epoch ticks: by the time the wait ends the epoch
//! interrupt is due, so the plugin traps at its next call or loop instead of
//! acting after its deadline. A plugin whose wait was cut short has run into
//! its deadline either way: its outcome is "deadline" even if it manages to
//! return normally.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as MonotonicClock;

use super::engine::EPOCH_TICK;
use super::state::HostState;

/// The interface wasmtime-wasi links; plugins built against any 0.2.x find it
/// by semver.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

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

    fn clamp(&mut self, wait: Duration) -> Duration {
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

/// Replaces `subscribe-duration` and `subscribe-instant` in `linker` (which
/// already holds wasmtime-wasi's) with versions that end at the deadline.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: StoreContextMut<'_, HostState>, (nanos,): (u64,)| {
            let state = store.data_mut();
            let wait = state.wait_limit.clamp(Duration::from_nanos(nanos));
            subscribe(state, wait)
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: StoreContextMut<'_, HostState>, (when,): (u64,)| {
            let state = store.data_mut();
            let now = MonotonicClock::now(&mut state.clocks())?;
            let wait = state
                .wait_limit
                .clamp(Duration::from_nanos(when.saturating_sub(now)));
            subscribe(state, wait)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

fn subscribe(state: &mut HostState, wait: Duration) -> wasmtime::Result<(Resource<DynPollable>,)> {
    let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
    Ok((MonotonicClock::subscribe_duration(
        &mut state.clocks(),
        nanos,
    )?,))
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
