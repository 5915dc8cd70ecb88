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

use std::time::Duration;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as MonotonicClock;

use super::state::HostState;

/// The interface wasmtime-wasi links; plugins built against any 0.2.x find it
/// by semver.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

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
