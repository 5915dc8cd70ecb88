use mqplug_plugin::{Delivery, Event, Failure, Handler, log};

struct MyPlugin;

impl Handler for MyPlugin {
    fn handle(event: Event, delivery: Delivery) -> Result<(), Failure> {
        log::info(&format!(
            "{} by user {}, attempt {}",
            event.event_type,
            event.user_id,
            delivery.reconsume_times + 1
        ));
        if event.tenant_id.is_empty() {
            return Err("no tenant".into()); // retried later, then dead-lettered
        }
        Ok(())
    }
}

mqplug_plugin::export_handler!(MyPlugin);
