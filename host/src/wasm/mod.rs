//! The wasm runtime: compiles plugins, runs their handlers in a sandbox.
//!
//! Knows the event model, nothing about RocketMQ.

mod bindings;
mod cache;
mod clocks;
mod config_store;
mod deadline;
mod engine;
mod keyvalue;
mod log_budget;
mod noted;
mod outbound;
mod outbox;
mod plugin;
mod state;

pub use bindings::CONTRACT_VERSIONS;
pub use cache::{CacheError, CompileCache, Compiled, DEFAULT_CACHE_MAX_BYTES, Version};
pub use config_store::{ConfigValues, REDACTED};
pub use deadline::EPOCH_TICK;
pub use engine::{PoolUsage, RuntimeSettings, WasmRuntime};
pub use keyvalue::{KeyValueGrants, KeyValueLimits, MAX_TTL, StoreOpener, StoreSettings};
pub use outbound::{
    CannedResponse, Network, Origin, OutboundGrants, OutboundLimits, Responder, SentRequest,
    is_internal, read_ca_file,
};
pub use outbox::{
    MAX_OUTBOX_BODY_BYTES, MAX_OUTBOX_MESSAGES, OutgoingMessage, PublishGrants, follow_up_id,
    follow_up_key,
};
pub use plugin::{InstanceMode, Plugin, PluginLoadError, PluginSettings};
pub use state::{MAX_HEADER_SET_BYTES, max_host_resources};
