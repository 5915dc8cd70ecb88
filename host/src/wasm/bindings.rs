//! Host bindings generated from `wit/plugin.wit`, and conversions from the
//! event model.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
});

pub use self::mqplug::plugin::types::{Delivery, TaskEvent};

impl From<&crate::event::TaskEvent> for TaskEvent {
    fn from(event: &crate::event::TaskEvent) -> Self {
        TaskEvent {
            event_type: event.event_type.clone(),
            user_id: event.user_id,
            tenant_id: event.tenant_id.clone(),
            app_id: event.app_id.clone(),
            campaign_id: event.campaign_id.clone(),
            campaign_name: event.campaign_name.clone(),
            event_data: event.event_data_json(),
            timestamp: event.timestamp.clone(),
        }
    }
}

impl From<&crate::delivery::Delivery> for Delivery {
    fn from(delivery: &crate::delivery::Delivery) -> Self {
        Delivery {
            message_id: delivery.message_id.clone(),
            topic: delivery.topic.clone(),
            tags: delivery.tags.clone(),
            keys: delivery.keys.clone(),
            reconsume_times: delivery.reconsume_times,
            queue_id: delivery.queue_id,
            queue_offset: delivery.queue_offset,
            born_timestamp: delivery.born_timestamp,
        }
    }
}
