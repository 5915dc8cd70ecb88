//! Host bindings for every contract version the host runs: `mqplug:plugin`
//! 0.2 (`wit/plugin.wit`) and 0.1 (`wit/v0.1/plugin.wit`, frozen), and
//! conversions from the event model.

use std::time::Duration;

use crate::outcome::Disposition;

/// `mqplug:plugin@0.1.x`: log, and the handler.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1",
        world: "plugin",
        // The handler is called async (on a fiber): see `Plugin::handle_async`.
        exports: { default: async },
    });
}

/// `mqplug:plugin@0.2.x`: 0.1 plus granted WASI capabilities
/// (`wasi:config/store`, linked by `wasmtime-wasi-config`).
pub mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit",
        // `plugin` and the state it may keep: the host serves both worlds.
        world: "plugin-with-state",
        // A message 0.2's `publish-error` has no case for traps (capability/publish.rs).
        imports: { "mqplug:plugin/publish.send": trappable },
        exports: { default: async },
        // wasi:http and what it uses are wasmtime's own implementations.
        with: {
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
            "wasi:keyvalue/store.bucket": crate::wasm::capability::keyvalue::Bucket,
        },
    });
}

/// The contract versions this host runs, newest first.
pub const CONTRACT_VERSIONS: [(u64, u64); 2] = [(0, 2), (0, 1)];

/// The same records in each contract version: one conversion each.
macro_rules! conversions {
    ($($version:ident),*) => {$(
        impl From<&crate::event::TaskEvent> for $version::mqplug::plugin::types::TaskEvent {
            fn from(event: &crate::event::TaskEvent) -> Self {
                Self {
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

        impl From<&crate::delivery::Delivery> for $version::mqplug::plugin::types::Delivery {
            fn from(delivery: &crate::delivery::Delivery) -> Self {
                Self {
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
    )*};
}

conversions!(v0_1, v0_2);

/// A pre-linked plugin of either contract version.
#[derive(Clone)]
pub enum PluginPre<T: 'static> {
    V0_1(v0_1::PluginPre<T>),
    V0_2(v0_2::PluginWithStatePre<T>),
}

/// An instance's handler export, of either contract version.
pub enum Plugin {
    V0_1(v0_1::Plugin),
    V0_2(v0_2::PluginWithState),
}

impl<T: Send + 'static> PluginPre<T> {
    /// The newest contract version whose handler the component exports;
    /// the error says what it exports instead.
    pub fn new(pre: wasmtime::component::InstancePre<T>) -> wasmtime::Result<Self> {
        match v0_2::PluginWithStatePre::new(pre.clone()) {
            Ok(pre) => Ok(PluginPre::V0_2(pre)),
            Err(newest) => v0_1::PluginPre::new(pre)
                .map(PluginPre::V0_1)
                .map_err(|_| newest),
        }
    }

    /// The contract version the plugin was built against.
    pub fn contract(&self) -> &'static str {
        match self {
            PluginPre::V0_1(_) => "0.1",
            PluginPre::V0_2(_) => "0.2",
        }
    }

    pub async fn instantiate(&self, store: &mut wasmtime::Store<T>) -> wasmtime::Result<Plugin> {
        Ok(match self {
            PluginPre::V0_1(pre) => Plugin::V0_1(pre.instantiate_async(&mut *store).await?),
            PluginPre::V0_2(pre) => Plugin::V0_2(pre.instantiate_async(&mut *store).await?),
        })
    }
}

impl Plugin {
    /// Calls `handle`: `Ok(Err((reason, disposition)))` when the handler
    /// returned `err`.
    pub async fn handle<T: Send + 'static>(
        &self,
        store: &mut wasmtime::Store<T>,
        event: &crate::event::TaskEvent,
        delivery: &crate::delivery::Delivery,
    ) -> wasmtime::Result<Result<(), (String, Disposition)>> {
        use v0_2::mqplug::plugin::types::HandlerError;
        Ok(match self {
            Plugin::V0_1(plugin) => plugin
                .mqplug_plugin_handler()
                .call_handle(store, &event.into(), &delivery.into())
                .await?
                .map_err(|err| (err.reason, Disposition::Retry)),
            Plugin::V0_2(plugin) => plugin
                .mqplug_plugin_handler()
                .call_handle(store, &event.into(), &delivery.into())
                .await?
                .map_err(|err| match err {
                    HandlerError::Retry(reason) => (reason, Disposition::Retry),
                    HandlerError::RetryAfter(after) => (
                        after.reason,
                        Disposition::RetryAfter(Duration::from_millis(after.delay_ms.into())),
                    ),
                    HandlerError::DeadLetter(reason) => (reason, Disposition::DeadLetter),
                }),
        })
    }
}
