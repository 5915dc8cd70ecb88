//! What a plugin can be granted, one room each: `log`, `config` (settings
//! and secrets, `wasi:config/store`), `http` (outbound `wasi:http`),
//! `keyvalue` (`wasi:keyvalue` buckets and `dedupe`) and `publish`
//! (follow-up messages).
//!
//! Each has the same shape:
//! - its grant, read from the plugin's entry and shared by every instance
//!   of the plugin (`ConfigValues`, `OutboundGrants`, `KeyValueGrants`,
//!   `PublishGrants`; the log's is its budget);
//! - what one instance keeps, a struct built from the grant (`Log`,
//!   `ConfigStore`, `HttpHooks`, `KeyValue`, `Publish`), held in the instance's
//!   store by the runtime core (`super::state::HostState`);
//! - the host side of its WIT interface, implemented on that struct, and an
//!   `add_to_linker` generic over the store's data, given a function that
//!   picks the struct out of it.
//!
//! HTTP is wasmtime's own `wasi:http`; what mqplug adds are the hooks that
//! check the grant on each request (`HttpHooks`), linked by the core.
//!
//! A capability knows nothing of the store around it: none imports the
//! runtime core (engine, plugin, state), only the bindings and `deadline`.

pub(crate) mod config;
pub(crate) mod http;
pub(crate) mod keyvalue;
pub(crate) mod log;
pub(crate) mod log_budget;
mod noted;
pub(crate) mod publish;
pub(crate) mod recording;
