//! `wasi:keyvalue` (store and atomics) and mqplug's `dedupe` for one plugin:
//! the buckets its entry grants, its limits, and the store behind them.
//!
//! A bucket the entry does not name is `access-denied`. A key or value over
//! its limit, or a write past the plugin's total, is `other` with the limit
//! named: an error the guest handles, never a trap. Each refusal and each
//! store failure is counted ([`HostEvent::KeyValue`]) and logged once per
//! call, with the key escaped and cut.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::observe::{HostEvent, KeyValueResult, Observers};
use crate::store::{Backend, Embedded, Namespace, RedisStore, StoreError, Write, Written};
use crate::text::inert_owned;
use crate::wasm::bindings::v0_2::mqplug::plugin::dedupe;
use crate::wasm::bindings::v0_2::wasi::keyvalue::store::{Error, KeyResponse};
use crate::wasm::bindings::v0_2::wasi::keyvalue::{atomics, store};

/// An open bucket, as the guest's `bucket` resource.
pub struct Bucket {
    pub(crate) name: String,
}

/// Per-plugin limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyValueLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Keys and values over all the plugin's buckets.
    pub max_total_bytes: u64,
}

impl Default for KeyValueLimits {
    fn default() -> Self {
        KeyValueLimits {
            max_key_bytes: 512,
            max_value_bytes: 64 * 1024,
            max_total_bytes: 16 * 1024 * 1024,
        }
    }
}

/// The longest expiry a key may have: 30 days.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where the host keeps plugins' state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSettings {
    /// In memory, gone when the host stops (the library's default and the
    /// conformance kit's).
    Memory,
    /// One redb file.
    Embedded { path: std::path::PathBuf },
    /// A Redis shared by hosts.
    Redis {
        url: String,
        prefix: String,
        timeout: Duration,
    },
}

/// The store, opened the first time a plugin with a bucket loads (a
/// failure is reported to that load and tried again at the next).
pub struct StoreOpener {
    settings: StoreSettings,
    opened: Mutex<Option<Arc<dyn Backend>>>,
}

impl StoreOpener {
    pub fn new(settings: StoreSettings) -> Self {
        StoreOpener {
            settings,
            opened: Mutex::default(),
        }
    }

    /// A store opened already (tests, the kit).
    pub fn with(store: Arc<dyn Backend>) -> Self {
        StoreOpener {
            settings: StoreSettings::Memory,
            opened: Mutex::new(Some(store)),
        }
    }

    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// The store's kind and state as its last call found it, once open.
    pub fn health(&self) -> Option<(&'static str, Result<(), String>)> {
        let opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.as_ref().map(|store| (store.kind(), store.health()))
    }

    pub fn open(&self) -> Result<Arc<dyn Backend>, StoreError> {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = opened.as_ref() {
            return Ok(store.clone());
        }
        let store: Arc<dyn Backend> = match &self.settings {
            StoreSettings::Memory => Arc::new(Embedded::in_memory()),
            StoreSettings::Embedded { path } => Arc::new(Embedded::open(path)?),
            StoreSettings::Redis {
                url,
                prefix,
                timeout,
            } => Arc::new(RedisStore::lazy(url, prefix, *timeout)?),
        };
        tracing::info!(store = store.kind(), "plugin state store open");
        *opened = Some(store.clone());
        Ok(store)
    }
}

/// What one plugin may keep, and where.
#[derive(Default)]
pub struct KeyValueGrants {
    buckets: BTreeSet<String>,
    limits: KeyValueLimits,
    /// Set when the plugin loads, if it has buckets.
    store: Option<Arc<dyn Backend>>,
    /// Buckets the plugin tried to open and is not granted (at most 32).
    refused: super::noted::Noted,
}

impl KeyValueGrants {
    pub fn new(buckets: impl IntoIterator<Item = String>, limits: KeyValueLimits) -> Self {
        KeyValueGrants {
            buckets: buckets.into_iter().collect(),
            limits,
            store: None,
            refused: Default::default(),
        }
    }

    /// Nothing granted.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn buckets(&self) -> &BTreeSet<String> {
        &self.buckets
    }

    pub fn limits(&self) -> KeyValueLimits {
        self.limits
    }

    /// These grants with `store` behind them.
    pub fn backed_by(&self, store: Arc<dyn Backend>) -> Self {
        KeyValueGrants {
            buckets: self.buckets.clone(),
            limits: self.limits,
            store: Some(store),
            refused: Default::default(),
        }
    }

    /// Buckets the plugin tried to open and is not granted (escaped, cut).
    pub fn refused(&self) -> Vec<String> {
        self.refused.list()
    }

    pub fn store(&self) -> Option<&Arc<dyn Backend>> {
        self.store.as_ref()
    }
}

impl std::fmt::Debug for KeyValueGrants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValueGrants")
            .field("buckets", &self.buckets)
            .field("limits", &self.limits)
            .field("store", &self.store.as_ref().map(|store| store.kind()))
            .finish()
    }
}

/// Why a call was not done, before the guest's error type.
#[derive(Debug)]
pub(crate) enum KvError {
    NotGranted,
    Other(String),
}

/// One plugin's view of the store, in its `HostState`.
pub(crate) struct KeyValue {
    plugin: Arc<str>,
    grants: Arc<KeyValueGrants>,
    observers: Observers,
}

impl KeyValue {
    pub(crate) fn new(plugin: Arc<str>, grants: Arc<KeyValueGrants>, observers: Observers) -> Self {
        KeyValue {
            plugin,
            grants,
            observers,
        }
    }

    pub(crate) fn open(&self, bucket: &str) -> Result<Bucket, KvError> {
        if !self.grants.buckets.contains(bucket) {
            let bucket = inert_owned(bucket.to_string(), 128);
            if self.grants.refused.note(&bucket) {
                tracing::warn!(target: "mqplug::plugin", "opened bucket {bucket:?}, which its entry does not grant (key_value.buckets)");
            }
            self.count(KeyValueResult::Refused);
            return Err(KvError::NotGranted);
        }
        Ok(Bucket {
            name: bucket.to_string(),
        })
    }

    /// Runs one operation on `bucket` after checking the key (and value),
    /// and the event's deadline; counts and logs what failed.
    pub(crate) fn call<T>(
        &self,
        bucket: &Bucket,
        key: &str,
        value_len: Option<usize>,
        deadline: Option<Instant>,
        op: impl FnOnce(&dyn Backend, &Namespace, u64) -> Result<T, StoreError>,
    ) -> Result<T, KvError> {
        let limits = self.grants.limits;
        let refused = |why: String| {
            let key = inert_owned(key.chars().take(64).collect(), 256);
            tracing::warn!(target: "mqplug::plugin", bucket = %bucket.name, "key-value call refused for key {key:?}: {why}");
            self.count(KeyValueResult::Refused);
            Err(KvError::Other(why))
        };
        if key.len() > limits.max_key_bytes {
            return refused(format!(
                "limit: the key is {} bytes, over the limit of {} bytes",
                key.len(),
                limits.max_key_bytes
            ));
        }
        if let Some(len) = value_len.filter(|len| *len > limits.max_value_bytes) {
            return refused(format!(
                "limit: the value is {len} bytes, over the limit of {} bytes",
                limits.max_value_bytes
            ));
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return refused("the event's deadline has passed".into());
        }
        let Some(store) = self.grants.store.as_deref() else {
            self.count(KeyValueResult::Failed);
            return Err(KvError::Other("no store is open for this plugin".into()));
        };
        let ns = Namespace::new(&*self.plugin, &bucket.name);
        // Every wait on the store ends by the event's deadline.
        match crate::store::within(deadline, || op(store, &ns, limits.max_total_bytes)) {
            Ok(value) => {
                self.count(KeyValueResult::Ok);
                Ok(value)
            }
            Err(err @ StoreError::Quota { .. }) => refused(err.to_string()),
            Err(err) => {
                tracing::warn!(target: "mqplug::plugin", bucket = %bucket.name, store = store.kind(), "key-value call failed: {err}");
                self.count(KeyValueResult::Failed);
                Err(KvError::Other(err.to_string()))
            }
        }
    }

    fn count(&self, result: KeyValueResult) {
        self.observers.emit(|| HostEvent::KeyValue {
            plugin: self.plugin.clone(),
            result,
        });
    }
}

/// What a key-value call sees of one instance: its buckets, the table that
/// holds their handles, and the event's deadline.
pub(crate) struct KeyValueView<'a> {
    pub kv: &'a KeyValue,
    pub table: &'a mut ResourceTable,
    pub deadline: Option<Instant>,
    /// What the current event read, when the plugin records failures.
    pub tape: &'a super::recording::Tape,
}

/// [`HasData`] for the key-value interfaces: their host side is a
/// [`KeyValueView`].
struct KeyValueCalls;

impl HasData for KeyValueCalls {
    type Data<'a> = KeyValueView<'a>;
}

impl KeyValue {
    /// Links `wasi:keyvalue/store`, `wasi:keyvalue/atomics` and `dedupe`;
    /// `get` makes the instance's view out of the store's data.
    pub(crate) fn add_to_linker<T: Send + 'static>(
        linker: &mut Linker<T>,
        get: fn(&mut T) -> KeyValueView<'_>,
    ) -> wasmtime::Result<()> {
        store::add_to_linker::<T, KeyValueCalls>(linker, get)?;
        atomics::add_to_linker::<T, KeyValueCalls>(linker, get)?;
        dedupe::add_to_linker::<T, KeyValueCalls>(linker, get)
    }
}

fn error(err: KvError) -> Error {
    match err {
        KvError::NotGranted => Error::AccessDenied,
        KvError::Other(why) => Error::Other(why),
    }
}

impl KeyValueView<'_> {
    fn bucket(&self, bucket: &Resource<Bucket>) -> Result<&Bucket, Error> {
        self.table
            .get(bucket)
            .map_err(|err| Error::Other(format!("bucket: {err}")))
    }

    /// A read's answer on the tape.
    fn record(&self, bucket: &Resource<Bucket>, key: &str, value: Option<&[u8]>) {
        if let Ok(bucket) = self.bucket(bucket) {
            self.tape.read(&bucket.name, key, value);
        }
    }

    /// One call on `bucket`, with the checks [`KeyValue::call`] makes.
    fn call<T>(
        &self,
        bucket: &Resource<Bucket>,
        key: &str,
        value_len: Option<usize>,
        op: impl FnOnce(&dyn Backend, &Namespace, u64) -> Result<T, StoreError>,
    ) -> Result<T, Error> {
        let bucket = self.bucket(bucket)?;
        self.kv
            .call(bucket, key, value_len, self.deadline, op)
            .map_err(error)
    }
}

impl store::Host for KeyValueView<'_> {
    fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, Error> {
        let bucket = self.kv.open(&identifier).map_err(error)?;
        self.table
            .push(bucket)
            .map_err(|err| Error::Other(format!("bucket: {err}")))
    }
}

impl store::HostBucket for KeyValueView<'_> {
    fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, Error> {
        let value = self.call(&bucket, &key, None, |store, ns, _| store.get(ns, &key))?;
        self.record(&bucket, &key, value.as_deref());
        Ok(value)
    }

    fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> Result<(), Error> {
        self.call(&bucket, &key, Some(value.len()), |store, ns, quota| {
            store
                .write(ns, &key, &value, None, Write::Set, quota)
                .map(drop)
        })
    }

    fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), Error> {
        self.call(&bucket, &key, None, |store, ns, _| store.delete(ns, &key))
    }

    fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, Error> {
        self.call(&bucket, &key, None, |store, ns, _| store.exists(ns, &key))
    }

    fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<KeyResponse, Error> {
        self.call(&bucket, "", None, |store, ns, _| {
            store.list_keys(ns, cursor)
        })
        .map(|(keys, cursor)| KeyResponse { keys, cursor })
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KeyValueView<'_> {
    fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, Error> {
        self.call(&bucket, &key, None, |store, ns, quota| {
            store.increment(ns, &key, delta, quota)
        })
    }
}

impl dedupe::Host for KeyValueView<'_> {
    fn claim(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<Option<Vec<u8>>, Error> {
        let ttl = ttl(ttl_ms).map_err(error)?;
        let held = self
            .call(&bucket, &key, Some(value.len()), |store, ns, quota| {
                store.write(ns, &key, &value, Some(ttl), Write::Claim, quota)
            })
            .map(|written| match written {
                Written::Stored => None,
                Written::Held(value) => Some(value),
            })?;
        // What the key held before: replayed, a claim meets the same answer.
        self.record(&bucket, &key, held.as_deref());
        Ok(held)
    }

    fn set_expiring(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<(), Error> {
        let ttl = ttl(ttl_ms).map_err(error)?;
        self.call(&bucket, &key, Some(value.len()), |store, ns, quota| {
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
        self.call(&bucket, &key, Some(value.len()), |store, ns, _| {
            store.delete_if(ns, &key, &value)
        })
    }
}

/// `ttl-ms` as a duration the store takes (1 ms to [`MAX_TTL`]).
pub(crate) fn ttl(ms: u64) -> Result<Duration, KvError> {
    let ttl = Duration::from_millis(ms);
    if ms == 0 || ttl > MAX_TTL {
        return Err(KvError::Other(format!(
            "ttl-ms must be between 1 and {} (30 days)",
            MAX_TTL.as_millis()
        )));
    }
    Ok(ttl)
}
