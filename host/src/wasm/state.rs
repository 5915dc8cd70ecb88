//! The runtime core's per-`Store` state: the (empty) WASI context, the
//! resource table, the memory limits, the wait limit, and each capability's
//! state (`capability/`), which the linker picks out of it.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::capability::config::{ConfigStore, ConfigValues};
use super::capability::http::{HttpHooks, OutboundGrants};
use super::capability::keyvalue::{KeyValue, KeyValueGrants, KeyValueView};
use super::capability::log::Log;
use super::capability::log_budget::LogBudget;
use super::capability::publish::{Publish, PublishGrants};
use super::capability::recording::{Seen, Tape};
use super::deadline::WaitLimit;
use crate::observe::Observers;

/// Most table elements a plugin may have; generous for any real plugin.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The largest in-memory size of one `wasi:http` header set: twice the
/// 8 KiB that HTTP proxies allow on the wire, room for hyper's own
/// structures (wasmtime's default is 128 KiB).
pub const MAX_HEADER_SET_BYTES: usize = 16 * 1024;

/// The most host resources (header sets, requests, responses, bodies,
/// streams, pollables, buckets) one instance may hold at once: as many
/// header sets of [`MAX_HEADER_SET_BYTES`] as its memory limit holds, so
/// what the host keeps for a plugin grows with its own limit, not without
/// bound; at least 256, at most 65,536. wasmtime's default is a million.
pub fn max_host_resources(memory_limit_bytes: usize) -> usize {
    (memory_limit_bytes / MAX_HEADER_SET_BYTES).clamp(256, 65_536)
}

/// What a plugin's entry grants it, for each of its stores.
pub(crate) struct Grants {
    pub config: Arc<ConfigValues>,
    pub outbound: Arc<OutboundGrants>,
    pub publish: Arc<PublishGrants>,
    pub key_value: Arc<KeyValueGrants>,
}

pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory_limit_bytes: usize,
    /// Set when the plugin tried to grow memory past its limit.
    pub(crate) memory_denied: Option<usize>,
    /// Linear memory granted so far (the largest memory, if several).
    pub(crate) memory_bytes: usize,
    /// Every wait the plugin makes ends at the current event's deadline.
    pub(crate) wait_limit: WaitLimit,
    // The capabilities, each linked by the engine with a function that
    // picks it out of here.
    pub(crate) log: Log,
    pub(crate) config: ConfigStore,
    http: WasiHttpCtx,
    http_hooks: HttpHooks,
    pub(crate) publish: Publish,
    key_value: KeyValue,
    /// What the current event saw, when the plugin records failures; the
    /// capabilities write on clones of it.
    tape: Tape,
}

impl HostState {
    pub fn new(
        plugin: Arc<str>,
        memory_limit_bytes: usize,
        inherit_stdio: bool,
        grants: Grants,
        observers: Observers,
        log_budget: Arc<LogBudget>,
        recording: bool,
    ) -> Self {
        let tape = if recording {
            Tape::recording()
        } else {
            Tape::default()
        };
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        if inherit_stdio {
            // Granted in the plugin's config. Never stdin: the host's input
            // is not the plugin's.
            wasi.inherit_stdout().inherit_stderr();
        }
        let wasi = wasi.build();
        let wait_limit = WaitLimit::default();
        let Grants {
            config,
            outbound,
            publish,
            key_value,
        } = grants;
        let mut table = ResourceTable::new();
        table.set_max_capacity(max_host_resources(memory_limit_bytes));
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(MAX_HEADER_SET_BYTES);
        HostState {
            key_value: KeyValue::new(plugin.clone(), key_value, observers.clone()),
            log: Log::new(plugin, log_budget, config.clone(), observers),
            wasi,
            table,
            memory_limit_bytes,
            memory_denied: None,
            memory_bytes: 0,
            http_hooks: HttpHooks {
                grants: outbound,
                deadline: None,
                cut: wait_limit.io_cut(),
                trace: Default::default(),
                tape: tape.clone(),
            },
            wait_limit,
            config: ConfigStore {
                values: config,
                tape: tape.clone(),
            },
            http,
            publish: Publish::new(publish),
            tape,
        }
    }

    /// Readies the store for the event of `delivery`: its id for log
    /// lines, its trace context for outbound requests, an empty outbox.
    pub(crate) fn begin_event(&mut self, delivery: &crate::delivery::Delivery) {
        self.log.begin_event(&delivery.message_id);
        self.http_hooks.trace.clone_from(&delivery.trace);
        self.publish.begin_event();
        self.tape.start();
    }

    /// What the event just handled saw, when the plugin records failures.
    pub(crate) fn take_tape(&self) -> Option<Seen> {
        self.tape.take()
    }

    /// The key-value capability's view: its buckets live in the instance's
    /// table, and every call ends by the event's deadline.
    pub(crate) fn key_value(&mut self) -> KeyValueView<'_> {
        KeyValueView {
            kv: &self.key_value,
            table: &mut self.table,
            deadline: self.wait_limit.deadline(),
            tape: &self.tape,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        // The deadline of the event being handled, for requests it makes.
        self.http_hooks.deadline = self.wait_limit.deadline();
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit_bytes {
            self.memory_denied = Some(desired);
            wasmtime::bail!(
                "memory limit: plugin tried to grow its memory to {desired} bytes, over its limit of {} bytes",
                self.memory_limit_bytes
            );
        }
        self.memory_bytes = self.memory_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
