//! Test plugin: not deterministic. Every second call fails, whatever the event,
//! so the conformance kit's determinism check must catch it.

use std::sync::atomic::{AtomicU32, Ordering};

use mqplug_plugin::{Delivery, Event, Failure, Handler};

static CALLS: AtomicU32 = AtomicU32::new(0);

struct Flaky;

impl Handler for Flaky {
    fn handle(_event: Event, _delivery: Delivery) -> Result<(), Failure> {
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        if call % 2 == 1 {
            Err(format!("flaky: call {call} fails").into())
        } else {
            Ok(())
        }
    }
}

mqplug_plugin::export_handler!(Flaky);
