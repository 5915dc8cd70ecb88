//! The wasm runtime: compiles plugins, runs their handlers in a sandbox.
//!
//! Knows the event model, nothing about RocketMQ. Two parts: the runtime
//! core (`engine`, `plugin`, `cache`, `bindings`, `state`, `clocks`,
//! `deadline`) and what a plugin can be granted (`capability/`: log,
//! config, http, key-value, publish), which imports nothing of the core
//! but the bindings and `deadline`.

mod bindings;
mod cache;
mod capability;
mod clocks;
mod deadline;
mod engine;
mod plugin;
mod state;

pub use bindings::CONTRACT_VERSIONS;
pub use cache::{CacheError, CompileCache, Compiled, DEFAULT_CACHE_MAX_BYTES, Version};
pub use capability::config::{ConfigValues, REDACTED};
pub use capability::http::{
    CannedResponse, Network, Origin, OutboundGrants, OutboundLimits, Responder, SentRequest,
    is_internal, read_ca_file,
};
pub use capability::keyvalue::{
    KeyValueGrants, KeyValueLimits, MAX_TTL, StoreOpener, StoreSettings,
};
pub use capability::publish::{
    MAX_OUTBOX_BODY_BYTES, MAX_OUTBOX_MESSAGES, OutgoingMessage, PublishGrants, follow_up_id,
    follow_up_key,
};
pub use capability::recording::{Exchange, Read, Seen};
pub use deadline::EPOCH_TICK;
pub use engine::{PoolUsage, RuntimeSettings, WasmRuntime};
pub use plugin::{Handling, InstanceMode, Plugin, PluginLoadError, PluginSettings};
pub use state::{MAX_HEADER_SET_BYTES, max_host_resources};
