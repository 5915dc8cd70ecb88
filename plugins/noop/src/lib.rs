//! Benchmark plugin: accepts every event, so a benchmark measures the host.

use mqplug_plugin::{Delivery, Event, Failure, Handler};

struct Noop;

impl Handler for Noop {
    fn handle(_event: Event, _delivery: Delivery) -> Result<(), Failure> {
        Ok(())
    }
}

mqplug_plugin::export_handler!(Noop);
