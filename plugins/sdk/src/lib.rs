//! Write an mqplug plugin in Rust.
//!
//! A plugin is a type that implements [`Handler`], exported with
//! [`export_handler!`], built as a `cdylib` for `wasm32-wasip2`:
//!
//! ```ignore
//! use mqplug_plugin::{Delivery, Event, Handler, log};
//!
//! struct Rewards;
//!
//! impl Handler for Rewards {
//!     fn handle(event: Event, delivery: Delivery) -> Result<(), String> {
//!         log::info(&format!("reward for user {}", event.user_id));
//!         Ok(())
//!     }
//! }
//!
//! mqplug_plugin::export_handler!(Rewards);
//! ```
//!
//! `Ok(())` acknowledges the message; `Err(reason)` logs the reason on the
//! host and asks the broker to redeliver the message later.

/// The raw bindings generated from `wit/plugin.wit`; [`Handler`] is the
/// friendlier way in.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        pub_export_macro: true,
        default_bindings_module: "mqplug_plugin::bindings",
        export_macro_name: "export_raw",
        // wasi:config too: the contract imports it.
        generate_all,
    });
}

pub use bindings::mqplug::plugin::types::Delivery;

/// The plugin's settings and secrets: its `[plugin.config]` table and the
/// secrets its `[plugin.secrets]` table names, through the standard
/// `wasi:config/store` interface.
///
/// ```ignore
/// let url = mqplug_plugin::config::get("rewards_url").ok_or("rewards_url is not set")?;
/// ```
pub mod config {
    use crate::bindings::wasi::config::store;

    /// The value of `key`; `None` when the plugin's entry does not set it.
    pub fn get(key: &str) -> Option<String> {
        // mqplug's store never fails; an error would mean no value either.
        store::get(key).ok().flatten()
    }

    /// Every key with its value, secrets included.
    pub fn all() -> Vec<(String, String)> {
        store::get_all().unwrap_or_default()
    }
}

use bindings::mqplug::plugin::types::{HandlerError, TaskEvent};

/// A task event with its free-form data parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_type: String,
    pub user_id: u64,
    pub tenant_id: String,
    pub app_id: String,
    pub campaign_id: String,
    pub campaign_name: String,
    /// The event's free-form data, a JSON object.
    pub event_data: serde_json::Value,
    /// RFC 3339 text; the host has checked that it parses.
    pub timestamp: String,
}

impl Event {
    fn from_wit(event: TaskEvent) -> Result<Self, String> {
        let event_data = serde_json::from_str(&event.event_data)
            .map_err(|err| format!("event-data is not valid JSON: {err}"))?;
        Ok(Event {
            event_type: event.event_type,
            user_id: event.user_id,
            tenant_id: event.tenant_id,
            app_id: event.app_id,
            campaign_id: event.campaign_id,
            campaign_name: event.campaign_name,
            event_data,
            timestamp: event.timestamp,
        })
    }
}

/// A plugin's business logic.
pub trait Handler {
    /// Handles one event: `Ok(())` acknowledges it, `Err(reason)` asks for
    /// redelivery and puts `reason` in the host's log.
    fn handle(event: Event, delivery: Delivery) -> Result<(), String>;
}

/// Adapts a [`Handler`] to the generated bindings; used by [`export_handler!`].
#[doc(hidden)]
pub fn dispatch<H: Handler>(event: TaskEvent, delivery: Delivery) -> Result<(), HandlerError> {
    let event = Event::from_wit(event).map_err(|reason| HandlerError { reason })?;
    H::handle(event, delivery).map_err(|reason| HandlerError { reason })
}

/// Exports a [`Handler`] as the plugin's `handle` function.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        struct __MqplugExport;

        impl $crate::bindings::exports::mqplug::plugin::handler::Guest for __MqplugExport {
            fn handle(
                event: $crate::bindings::mqplug::plugin::types::TaskEvent,
                delivery: $crate::bindings::mqplug::plugin::types::Delivery,
            ) -> ::core::result::Result<(), $crate::bindings::mqplug::plugin::types::HandlerError> {
                $crate::dispatch::<$handler>(event, delivery)
            }
        }

        $crate::bindings::export_raw!(__MqplugExport with_types_in $crate::bindings);
    };
}

/// Writes to the host's log, tagged with the plugin's name and the message id.
pub mod log {
    use crate::bindings::mqplug::plugin::log::{Level, log};

    pub fn trace(message: &str) {
        log(Level::Trace, message);
    }
    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }
    pub fn info(message: &str) {
        log(Level::Info, message);
    }
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}
