//! One wasmtime engine for the whole host, its linker, and its epoch ticker.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::component::Linker;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ProfilingStrategy,
};

use super::cache::{CompileCache, DEFAULT_CACHE_MAX_BYTES};
use super::capability::config::ConfigStore;
use super::capability::keyvalue::KeyValue;
use super::capability::keyvalue::{StoreOpener, StoreSettings};
use super::capability::log::Log;
use super::capability::log_budget::LogBudget;
use super::capability::publish::Publish;
use super::clocks;
use super::deadline::EPOCH_TICK;
use super::state::HostState;

/// Linear memory a pool slot keeps resident after its instance is gone,
/// reset in place for the next one.
const KEEP_RESIDENT_BYTES: usize = 1024 * 1024;
/// Table bytes likewise.
const KEEP_RESIDENT_TABLE_BYTES: usize = 64 * 1024;

/// Whether the kernel has the `PAGEMAP_SCAN` ioctl (Linux 6.7 and later),
/// with which a slot's reset touches only the pages its instance used.
fn pagemap_scan_likely() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 7)
}

/// Engine-wide limits. The pooling allocator reserves its slots up front.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Plugin instances alive at once, over all plugins.
    pub max_instances: u32,
    /// The largest linear memory any plugin may have.
    pub max_memory_bytes: usize,
    /// Where compiled components are cached; `None` compiles every load.
    pub cache_dir: Option<PathBuf>,
    /// The most bytes of cached components kept; the least recently used
    /// go first.
    pub cache_max_bytes: u64,
    /// Count fuel (instructions) so plugins can have a deterministic
    /// per-event budget. Costs every plugin 15-36 % per event; off by default.
    pub fuel: bool,
    /// Where plugins' `wasi:keyvalue` buckets live; opened when the first
    /// plugin with a bucket loads. The library's default keeps them in
    /// memory; a host's config defaults to the embedded file.
    pub store: StoreSettings,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            max_instances: 256,
            max_memory_bytes: 256 * 1024 * 1024,
            cache_dir: None,
            cache_max_bytes: DEFAULT_CACHE_MAX_BYTES,
            fuel: false,
            store: StoreSettings::Memory,
        }
    }
}

/// The engine, the linker every plugin is linked with, and the epoch ticker
/// that makes deadlines work. Cheap to share behind an `Arc`.
pub struct WasmRuntime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    pub(crate) cache: CompileCache,
    /// Plugins' key-value store.
    pub(crate) store: StoreOpener,
    settings: RuntimeSettings,
    /// Every plugin's log budget, flushed by the ticker each second.
    log_budgets: LogBudgets,
    _ticker: EpochTicker,
}

type LogBudgets = Arc<Mutex<Vec<Weak<LogBudget>>>>;

/// `MQPLUG_WASM_PERFMAP=1`: write a perf map of the plugins' code.
pub const PERFMAP_VARIABLE: &str = "MQPLUG_WASM_PERFMAP";

impl WasmRuntime {
    pub fn new(settings: RuntimeSettings) -> wasmtime::Result<Arc<Self>> {
        let mut pooling = PoolingAllocationConfig::default();
        // A wasip2 Rust component has a handful of core instances and tables.
        pooling
            .total_component_instances(settings.max_instances)
            .total_core_instances(settings.max_instances * 8)
            .total_memories(settings.max_instances * 2)
            .total_tables(settings.max_instances * 4)
            // A call runs on a fiber stack of its own, one per instance in use.
            .total_stacks(settings.max_instances)
            .max_memory_size(settings.max_memory_bytes)
            // A slot going back to the pool: reset the pages the instance
            // touched in place (found with PAGEMAP_SCAN on Linux 6.7+, else
            // the lowest bytes) and keep them resident, instead of
            // `madvise` and a page fault per page on the next instance.
            // Pages swapped out count as touched: wasmtime 48.0.8 skipped
            // them, leaving the previous instance's (maybe another team's)
            // data for the next; 48.0.9 and 50 reset them.
            .pagemap_scan(wasmtime::Enabled::Auto);
        if pagemap_scan_likely() {
            // Without PAGEMAP_SCAN the reset would `memset` the whole
            // megabyte: slower than the `madvise` it replaces.
            pooling
                .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
                .table_keep_resident(KEEP_RESIDENT_TABLE_BYTES);
        }

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        if std::env::var_os(PERFMAP_VARIABLE).is_some_and(|on| on == "1") {
            // Names the plugins' compiled functions for `perf` in
            // /tmp/perf-<pid>.map (docs/operating.md, "Profiling a plugin").
            config.profiler(ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        // WASI is linked because Rust's wasm32-wasip2 std imports it, but the
        // context grants nothing: no preopens, env, args, stdio or sockets.
        // Linked async: a plugin's wait (a sleep, a response) suspends its
        // call and frees the thread, instead of parking it.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // A blocking wait (a sleep) ends at the event's deadline.
        clocks::add_to_linker(&mut linker)?;
        // The capabilities (capability/), each picked out of the store's
        // data. `log` serves both contract versions.
        Log::add_to_linker(&mut linker, |state: &mut HostState| &mut state.log)?;
        Publish::add_to_linker(&mut linker, |state: &mut HostState| &mut state.publish)?;
        // Outbound HTTP: wasmtime's wasi:http, with mqplug's grant checks
        // in its hooks (capability/http.rs).
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        // The plugin's own config and secrets, nobody else's.
        ConfigStore::add_to_linker(&mut linker, |state: &mut HostState| &mut state.config)?;
        // The plugin's own buckets, and keys that expire.
        KeyValue::add_to_linker(&mut linker, HostState::key_value)?;

        let log_budgets = LogBudgets::default();
        let ticker = EpochTicker::start(engine.clone(), log_budgets.clone());
        Ok(Arc::new(WasmRuntime {
            engine,
            log_budgets,
            linker,
            cache: CompileCache::new(settings.cache_dir.clone())
                .with_max_bytes(settings.cache_max_bytes),
            store: StoreOpener::new(settings.store.clone()),
            settings,
            _ticker: ticker,
        }))
    }

    pub fn settings(&self) -> &RuntimeSettings {
        &self.settings
    }

    /// Has the ticker report what `budget` dropped once each window ends,
    /// also when the plugin has gone quiet.
    pub(crate) fn watch_log_budget(&self, budget: &Arc<LogBudget>) {
        let mut budgets = self.log_budgets.lock().unwrap_or_else(|e| e.into_inner());
        budgets.retain(|budget| budget.strong_count() > 0);
        budgets.push(Arc::downgrade(budget));
    }

    /// The state store's kind and state as its last call found it, once a
    /// plugin with buckets has opened it.
    pub fn store_health(&self) -> Option<(&'static str, Result<(), String>)> {
        self.store.health()
    }

    /// What the pooling allocator has handed out right now. A slot goes back
    /// to the pool when its `Store` is dropped, so after a burst of traps
    /// this returns to what the idle instances hold.
    pub fn pool_usage(&self) -> PoolUsage {
        let live = self.engine.pooling_allocator_metrics();
        PoolUsage {
            component_instances: live.as_ref().map_or(0, |m| m.component_instances()),
            core_instances: live.as_ref().map_or(0, |m| m.core_instances()),
            memories: live.as_ref().map_or(0, |m| m.memories()),
            tables: live.as_ref().map_or(0, |m| m.tables()),
            max_component_instances: self.settings.max_instances,
        }
    }
}

/// Live slots of the engine's pooling allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub component_instances: u64,
    pub core_instances: u64,
    pub memories: usize,
    pub tables: usize,
    /// The pool's capacity for component instances (`runtime.max_instances`).
    pub max_component_instances: u32,
}

/// Advances the engine's epoch every [`EPOCH_TICK`], and flushes the log
/// budgets every second, until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, log_budgets: LogBudgets) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("mqplug-epoch".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    // Ticks keep to the wall clock (a late wake-up is caught
                    // up), so a deadline of N ticks ends within one tick of
                    // N x EPOCH_TICK: the wait limit relies on it.
                    let mut next = Instant::now();
                    let mut next_flush = next + Duration::from_secs(1);
                    while !stop.load(Ordering::Relaxed) {
                        next += EPOCH_TICK;
                        if let Some(early) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(early);
                        }
                        engine.increment_epoch();
                        if next >= next_flush {
                            next_flush += Duration::from_secs(1);
                            flush_log_budgets(&log_budgets);
                        }
                    }
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }
}

/// Reports what each live plugin's log budget dropped in its last window.
fn flush_log_budgets(budgets: &LogBudgets) {
    let live: Vec<Arc<LogBudget>> = budgets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for budget in live {
        budget.flush();
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
