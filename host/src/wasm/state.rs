//! The per-`Store` state: the (empty) WASI context, limits, and the log import.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::{v0_1, v0_2};
use super::config_store::ConfigValues;
use super::deadline::WaitLimit;
use super::keyvalue::{self, Bucket, KeyValue, KeyValueGrants, KvError};
use super::log_budget::LogBudget;
use super::outbound::{HttpHooks, OutboundGrants};
use super::outbox::{OutgoingMessage, PublishGrants, Refusal};
use crate::observe::{HostEvent, LogLevel, Observers};
use crate::text::{MAX_UNTRUSTED_BYTES, inert_owned};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// A plugin's log line is cut to this many bytes.
pub const MAX_LOG_LINE_BYTES: usize = MAX_UNTRUSTED_BYTES;

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
    plugin: Arc<str>,
    /// The message being handled, for log lines.
    pub(crate) message_id: String,
    wasi: WasiCtx,
    table: ResourceTable,
    memory_limit_bytes: usize,
    /// Set when the plugin tried to grow memory past its limit.
    pub(crate) memory_denied: Option<usize>,
    /// Linear memory granted so far (the largest memory, if several).
    pub(crate) memory_bytes: usize,
    observers: Observers,
    log_budget: Arc<LogBudget>,
    /// Every wait the plugin makes ends at the current event's deadline.
    pub(crate) wait_limit: WaitLimit,
    /// What `wasi:config/store` answers.
    pub(crate) config: Arc<ConfigValues>,
    http: WasiHttpCtx,
    http_hooks: HttpHooks,
    publish: Arc<PublishGrants>,
    /// The current event's follow-up messages, sent after `ok`.
    pub(crate) outbox: Vec<OutgoingMessage>,
    /// The plugin's buckets.
    key_value: KeyValue,
}

impl HostState {
    pub fn new(
        plugin: Arc<str>,
        memory_limit_bytes: usize,
        inherit_stdio: bool,
        grants: Grants,
        observers: Observers,
        log_budget: Arc<LogBudget>,
    ) -> Self {
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
            plugin,
            message_id: String::new(),
            wasi,
            table,
            memory_limit_bytes,
            memory_denied: None,
            memory_bytes: 0,
            observers,
            log_budget,
            http_hooks: HttpHooks {
                grants: outbound,
                deadline: None,
                cut: wait_limit.io_cut(),
                trace: Default::default(),
            },
            wait_limit,
            config,
            http,
            publish,
            outbox: Vec::new(),
        }
    }
}

impl HostState {
    /// Readies the store for the event of `delivery`: its id for log
    /// lines, its trace context for outbound requests, an empty outbox.
    pub(crate) fn begin_event(&mut self, delivery: &crate::delivery::Delivery) {
        self.message_id.clone_from(&delivery.message_id);
        self.http_hooks.trace.clone_from(&delivery.trace);
        self.outbox.clear();
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

impl v0_1::mqplug::plugin::types::Host for HostState {}
impl v0_2::mqplug::plugin::types::Host for HostState {}

/// The `log` import of each contract version: the same levels, one writer.
macro_rules! log_host {
    ($($version:ident),*) => {$(
        impl $version::mqplug::plugin::log::Host for HostState {
            fn log(&mut self, level: $version::mqplug::plugin::log::Level, message: String) {
                use $version::mqplug::plugin::log::Level;
                let level = match level {
                    Level::Trace => LogLevel::Trace,
                    Level::Debug => LogLevel::Debug,
                    Level::Info => LogLevel::Info,
                    Level::Warn => LogLevel::Warn,
                    Level::Error => LogLevel::Error,
                };
                self.write_log(level, message);
            }
        }
    )*};
}

log_host!(v0_1, v0_2);

impl v0_2::mqplug::plugin::publish::Host for HostState {
    fn send(
        &mut self,
        message: v0_2::mqplug::plugin::publish::Message,
    ) -> wasmtime::Result<Result<(), v0_2::mqplug::plugin::publish::PublishError>> {
        use v0_2::mqplug::plugin::publish::PublishError;
        let admitted = self.publish.admit(
            &self.outbox,
            &message.topic,
            message.tag,
            message.keys,
            message.body,
        );
        match admitted {
            Ok(message) => {
                self.outbox.push(message);
                Ok(Ok(()))
            }
            Err(refusal) => {
                tracing::warn!(target: "mqplug::plugin", "publish refused: {refusal}");
                Ok(Err(match refusal {
                    Refusal::TopicNotAllowed(topic) => PublishError::TopicNotAllowed(topic),
                    Refusal::TooLarge(limit) => PublishError::TooLarge(limit),
                    Refusal::TooMany(limit) => PublishError::TooMany(limit),
                    Refusal::Invalid(why) => {
                        return Err(wasmtime::format_err!("publish refused: {why}"));
                    }
                }))
            }
        }
    }
}

impl v0_2::wasi::config::store::Host for HostState {
    fn get(&mut self, key: String) -> Result<Option<String>, v0_2::wasi::config::store::Error> {
        Ok(self.config.get(&key).map(str::to_string))
    }

    fn get_all(&mut self) -> Result<Vec<(String, String)>, v0_2::wasi::config::store::Error> {
        Ok(self.config.all())
    }
}

mod kv {
    //! `wasi:keyvalue/store`, `wasi:keyvalue/atomics` and `dedupe`.
    use super::*;
    use crate::store::{Write, Written};
    use v0_2::wasi::keyvalue::store::{Error, KeyResponse};
    use wasmtime::component::Resource;

    fn error(err: KvError) -> Error {
        match err {
            KvError::NotGranted => Error::AccessDenied,
            KvError::Other(why) => Error::Other(why),
        }
    }

    impl HostState {
        fn bucket(&self, bucket: &Resource<Bucket>) -> Result<&Bucket, Error> {
            self.table
                .get(bucket)
                .map_err(|err| Error::Other(format!("bucket: {err}")))
        }

        /// One call on `bucket`, with the checks `KeyValue::call` makes.
        fn kv<T>(
            &self,
            bucket: &Resource<Bucket>,
            key: &str,
            value_len: Option<usize>,
            op: impl FnOnce(
                &dyn crate::store::Backend,
                &crate::store::Namespace,
                u64,
            ) -> Result<T, crate::store::StoreError>,
        ) -> Result<T, Error> {
            let bucket = self.bucket(bucket)?;
            self.key_value
                .call(bucket, key, value_len, self.wait_limit.deadline(), op)
                .map_err(error)
        }
    }

    impl v0_2::wasi::keyvalue::store::Host for HostState {
        fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, Error> {
            let bucket = self.key_value.open(&identifier).map_err(error)?;
            self.table
                .push(bucket)
                .map_err(|err| Error::Other(format!("bucket: {err}")))
        }
    }

    impl v0_2::wasi::keyvalue::store::HostBucket for HostState {
        fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, Error> {
            self.kv(&bucket, &key, None, |store, ns, _| store.get(ns, &key))
        }

        fn set(
            &mut self,
            bucket: Resource<Bucket>,
            key: String,
            value: Vec<u8>,
        ) -> Result<(), Error> {
            self.kv(&bucket, &key, Some(value.len()), |store, ns, quota| {
                store
                    .write(ns, &key, &value, None, Write::Set, quota)
                    .map(drop)
            })
        }

        fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), Error> {
            self.kv(&bucket, &key, None, |store, ns, _| store.delete(ns, &key))
        }

        fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, Error> {
            self.kv(&bucket, &key, None, |store, ns, _| store.exists(ns, &key))
        }

        fn list_keys(
            &mut self,
            bucket: Resource<Bucket>,
            cursor: Option<u64>,
        ) -> Result<KeyResponse, Error> {
            self.kv(&bucket, "", None, |store, ns, _| {
                store.list_keys(ns, cursor)
            })
            .map(|(keys, cursor)| KeyResponse { keys, cursor })
        }

        fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
            self.table.delete(bucket)?;
            Ok(())
        }
    }

    impl v0_2::wasi::keyvalue::atomics::Host for HostState {
        fn increment(
            &mut self,
            bucket: Resource<Bucket>,
            key: String,
            delta: u64,
        ) -> Result<u64, Error> {
            self.kv(&bucket, &key, None, |store, ns, quota| {
                store.increment(ns, &key, delta, quota)
            })
        }
    }

    impl v0_2::mqplug::plugin::dedupe::Host for HostState {
        fn claim(
            &mut self,
            bucket: Resource<Bucket>,
            key: String,
            value: Vec<u8>,
            ttl_ms: u64,
        ) -> Result<Option<Vec<u8>>, Error> {
            let ttl = keyvalue::ttl(ttl_ms).map_err(error)?;
            self.kv(&bucket, &key, Some(value.len()), |store, ns, quota| {
                store.write(ns, &key, &value, Some(ttl), Write::Claim, quota)
            })
            .map(|written| match written {
                Written::Stored => None,
                Written::Held(value) => Some(value),
            })
        }

        fn set_expiring(
            &mut self,
            bucket: Resource<Bucket>,
            key: String,
            value: Vec<u8>,
            ttl_ms: u64,
        ) -> Result<(), Error> {
            let ttl = keyvalue::ttl(ttl_ms).map_err(error)?;
            self.kv(&bucket, &key, Some(value.len()), |store, ns, quota| {
                store
                    .write(ns, &key, &value, Some(ttl), Write::Set, quota)
                    .map(drop)
            })
        }

        fn release(
            &mut self,
            bucket: Resource<Bucket>,
            key: String,
            value: Vec<u8>,
        ) -> Result<bool, Error> {
            self.kv(&bucket, &key, Some(value.len()), |store, ns, _| {
                store.delete_if(ns, &key, &value)
            })
        }
    }
}

impl HostState {
    /// One line of the plugin's `log` import, of any contract version.
    fn write_log(&mut self, level: LogLevel, message: String) {
        if !self.log_budget.admit(message.len()) {
            return;
        }
        // A secret the plugin was given never reaches the host's log.
        let message = self.config.redact(message);
        // Plugin-controlled: escaped (no forged host lines) and cut.
        let message = inert_owned(message, MAX_LOG_LINE_BYTES);
        // The dispatcher's `message` span already carries plugin and message id.
        match level {
            LogLevel::Trace => tracing::trace!(target: "mqplug::plugin", "{message}"),
            LogLevel::Debug => tracing::debug!(target: "mqplug::plugin", "{message}"),
            LogLevel::Info => tracing::info!(target: "mqplug::plugin", "{message}"),
            LogLevel::Warn => tracing::warn!(target: "mqplug::plugin", "{message}"),
            LogLevel::Error => tracing::error!(target: "mqplug::plugin", "{message}"),
        }
        self.observers.emit(|| HostEvent::PluginLog {
            plugin: self.plugin.clone(),
            message_id: self.message_id.clone(),
            level,
            message,
        });
    }
}
