//! {{name}}: an mqplug plugin. It handles the marketing platform's task
//! events (`TaskEventMessage` on `marketing.task.completed`).
//!
//! `Ok(())` acknowledges the message. `Err(reason.into())` retries it on
//! the broker's schedule; `Failure::retry_after` retries it no sooner than a
//! delay; `Failure::dead_letter` sends it to the dead-letter queue now.

use mqplug_plugin::{Delivery, Event, Failure, Handler, log};

struct Plugin;

impl Handler for Plugin {
    fn handle(event: Event, delivery: Delivery) -> Result<(), Failure> {
        if event.tenant_id.is_empty() {
            // No retry will give the event a tenant.
            return Err(Failure::dead_letter("no tenant"));
        }
        log::info(&format!(
            "{} by user {} in campaign {}, attempt {}",
            event.event_type,
            event.user_id,
            event.campaign_id,
            delivery.reconsume_times + 1
        ));
        Ok(())
    }
}

mqplug_plugin::export_handler!(Plugin);
