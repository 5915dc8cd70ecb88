//! Example plugin: decides the reward a completed task earns and logs it.
//!
//! Rejects (for redelivery) an event whose `count` in the event data is not a
//! number, to show how a handler reports an error.

use mqplug_plugin::{Delivery, Event, Failure, Handler, log};

struct RewardLogger;

impl Handler for RewardLogger {
    fn handle(event: Event, delivery: Delivery) -> Result<(), Failure> {
        let count = match event.event_data.get("count") {
            None => 1,
            Some(value) => value.as_u64().ok_or_else(|| {
                format!("event_data.count must be a non-negative integer, got {value}")
            })?,
        };
        let points = 10 * count;
        log::info(&format!(
            "{} by user {} in campaign {} ({}): granting {points} points [tenant {}, app {}, attempt {}]",
            event.event_type,
            event.user_id,
            event.campaign_id,
            event.campaign_name,
            event.tenant_id,
            event.app_id,
            delivery.reconsume_times + 1,
        ));
        Ok(())
    }
}

mqplug_plugin::export_handler!(RewardLogger);
