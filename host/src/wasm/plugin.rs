//! A loaded plugin: its compiled component, pre-linked, and its instances.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use wasmtime::component::Component;
use wasmtime::{Store, Trap};

use super::bindings::{self, PluginPre};
use super::cache::{Compiled, Version};
use super::capability::config::ConfigValues;
use super::capability::http::OutboundGrants;
use super::capability::keyvalue::KeyValueGrants;
use super::capability::log_budget::LogBudget;
use super::capability::publish::{OutgoingMessage, PublishGrants};
use super::capability::recording::Seen;
use super::deadline::EPOCH_TICK;
use super::engine::WasmRuntime;
use super::state::{Grants, HostState};
use crate::delivery::Delivery;
use crate::event::TaskEvent;
use crate::observe::Observers;
use crate::outcome::{HandlerFailure, HandlerOutcome};
use crate::text::{MAX_UNTRUSTED_BYTES, inert_owned};

/// What one call of a handler came to.
#[derive(Debug)]
pub struct Handling {
    pub outcome: HandlerOutcome,
    /// The follow-ups to send: some only when it returned `ok`.
    pub outbox: Vec<OutgoingMessage>,
    /// For a plugin that records failures, what a failed call saw and the
    /// follow-ups it had put in its outbox (never sent).
    pub recorded: Option<(Seen, Vec<OutgoingMessage>)>,
}

/// How instances are used across events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// Keep instances and call them again (about 1.5 us an event). A plugin
    /// may see state left by earlier events.
    #[default]
    Reuse,
    /// A new instance for every event (about 8 us an event on Linux 6.7+,
    /// 25 us before): no state survives between events.
    FreshPerEvent,
}

/// Per-plugin sandbox settings.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    pub name: String,
    /// A handler running longer is interrupted (ConsumeRetryLater). Keep it
    /// well under the RocketMQ client's 30 s listener timeout.
    pub deadline: Duration,
    /// Linear memory a plugin instance may grow to.
    pub memory_limit_bytes: usize,
    pub instance_mode: InstanceMode,
    /// Log lines per second the plugin may write; the rest are dropped and
    /// counted.
    pub log_lines_per_second: u32,
    /// Log bytes per second, besides the lines.
    pub log_bytes_per_second: u64,
    /// Fuel (about one unit per wasm instruction) per event, when the
    /// runtime counts fuel; `None` is unlimited. A deterministic limit,
    /// unlike the deadline.
    pub fuel_per_event: Option<u64>,
    /// Let the plugin write to the host's stdout and stderr (never read its
    /// stdin). Off: what it prints is discarded, and its only output is the
    /// rate-limited log import.
    pub inherit_stdio: bool,
    /// What `wasi:config/store` answers: the plugin's config values and
    /// secrets (nothing by default).
    pub config: Arc<ConfigValues>,
    /// Where `wasi:http/outgoing-handler` may go (nowhere by default).
    pub outbound: Arc<OutboundGrants>,
    /// The topics `publish` may send to (none by default).
    pub publish: Arc<PublishGrants>,
    /// The `wasi:keyvalue` buckets it may use, and its limits (none by
    /// default). The store behind them is the runtime's, unless these
    /// grants carry their own.
    pub key_value: Arc<KeyValueGrants>,
    /// Keep what each event saw (config keys, HTTP exchanges, key-value
    /// reads), so that a failed one can be written down.
    pub record_failures: bool,
}

impl PluginSettings {
    pub fn new(name: impl Into<String>) -> Self {
        PluginSettings {
            name: name.into(),
            deadline: Duration::from_secs(5),
            memory_limit_bytes: 64 * 1024 * 1024,
            instance_mode: InstanceMode::Reuse,
            log_lines_per_second: 1000,
            log_bytes_per_second: 1024 * 1024,
            fuel_per_event: None,
            inherit_stdio: false,
            config: Arc::default(),
            outbound: Arc::new(OutboundGrants::none("")),
            publish: Arc::default(),
            key_value: Arc::default(),
            record_failures: false,
        }
    }
}

/// Why a plugin could not be loaded. Each names the plugin and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum PluginLoadError {
    #[error("plugin {name}: cannot read {}: {cause}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{problem}")]
    Settings { name: String, problem: String },
    #[error("plugin {name}: not a valid wasm component: {cause:#}")]
    Compile {
        name: String,
        cause: wasmtime::Error,
    },
    #[error("plugin {name}: imports something mqplug does not provide: {cause:#}")]
    Link {
        name: String,
        cause: wasmtime::Error,
    },
    #[error(
        "plugin {name}: does not export the mqplug:plugin handler (build it against wit/plugin.wit): {cause:#}"
    )]
    WrongWorld {
        name: String,
        cause: wasmtime::Error,
    },
    #[error("plugin {name}: failed to instantiate: {cause}")]
    Instantiate { name: String, cause: HandlerFailure },
    #[error(
        "plugin {name}: its key_value buckets need the state store, which cannot be opened: {cause}"
    )]
    Store {
        name: String,
        cause: crate::store::StoreError,
    },
    #[error(
        "plugin {name}: fuel_per_event is set but the runtime does not count fuel (set runtime.fuel = true)"
    )]
    FuelNotEnabled { name: String },
    #[error("plugin {name}: memory limit {limit} bytes is over the host's maximum of {max} bytes")]
    MemoryLimitTooLarge {
        name: String,
        limit: usize,
        max: usize,
    },
}

struct Instance {
    store: Store<HostState>,
    bindings: bindings::Plugin,
}

/// A compiled, linked plugin ready to handle events from many threads.
pub struct Plugin {
    name: Arc<str>,
    runtime: Arc<WasmRuntime>,
    pre: PluginPre<HostState>,
    settings: PluginSettings,
    observers: Observers,
    log_budget: Arc<LogBudget>,
    outbound: Arc<OutboundGrants>,
    /// Healthy instances waiting for an event (reuse mode only).
    idle: Mutex<Vec<Instance>>,
    /// Linear memory of the first instance right after instantiation.
    memory_at_instantiation: usize,
    /// SHA-256 of the wasm bytes (empty for a component loaded from elsewhere).
    version: Version,
    compiled: Compiled,
}

impl Plugin {
    /// Reads and loads a component file.
    pub fn load_file(
        runtime: &Arc<WasmRuntime>,
        settings: PluginSettings,
        path: &Path,
        observers: Observers,
    ) -> Result<Plugin, PluginLoadError> {
        let bytes = std::fs::read(path).map_err(|cause| PluginLoadError::Read {
            name: settings.name.clone(),
            path: path.to_path_buf(),
            cause,
        })?;
        Plugin::load(runtime, settings, &bytes, observers)
    }

    /// Compiles, links and instantiates a component once, so a plugin that
    /// cannot run is rejected at load time rather than on its first message.
    pub fn load(
        runtime: &Arc<WasmRuntime>,
        settings: PluginSettings,
        wasm: &[u8],
        observers: Observers,
    ) -> Result<Plugin, PluginLoadError> {
        let name = settings.name.clone();
        if settings.fuel_per_event.is_some() && !runtime.settings().fuel {
            return Err(PluginLoadError::FuelNotEnabled { name });
        }
        let max = runtime.settings().max_memory_bytes;
        if settings.memory_limit_bytes > max {
            return Err(PluginLoadError::MemoryLimitTooLarge {
                name,
                limit: settings.memory_limit_bytes,
                max,
            });
        }
        let compiled = runtime
            .cache
            .compile(&runtime.engine, wasm)
            .map_err(|cause| PluginLoadError::Compile {
                name: name.clone(),
                cause,
            })?;
        tracing::info!(
            plugin = %name,
            version = compiled.version.short(),
            how = ?compiled.how,
            took_ms = compiled.took.as_millis() as u64,
            "component ready"
        );
        let mut plugin = Plugin::from_component(runtime, settings, &compiled.component, observers)?;
        plugin.version = compiled.version;
        plugin.compiled = compiled.how;
        Ok(plugin)
    }

    /// Links and instantiates a compiled component (see [`Plugin::load`]).
    pub fn from_component(
        runtime: &Arc<WasmRuntime>,
        mut settings: PluginSettings,
        component: &Component,
        observers: Observers,
    ) -> Result<Plugin, PluginLoadError> {
        let name = settings.name.clone();
        if !settings.key_value.buckets().is_empty() && settings.key_value.store().is_none() {
            let store = runtime
                .store
                .open()
                .map_err(|cause| PluginLoadError::Store {
                    name: name.clone(),
                    cause,
                })?;
            settings.key_value = Arc::new(settings.key_value.backed_by(store));
        }
        let instance_pre =
            runtime
                .linker
                .instantiate_pre(component)
                .map_err(|cause| PluginLoadError::Link {
                    name: name.clone(),
                    cause,
                })?;
        let pre = PluginPre::new(instance_pre).map_err(|cause| PluginLoadError::WrongWorld {
            name: name.clone(),
            cause,
        })?;
        let log_budget = Arc::new(LogBudget::new(
            Arc::from(name.as_str()),
            settings.log_lines_per_second,
            settings.log_bytes_per_second,
            observers.clone(),
        ));
        runtime.watch_log_budget(&log_budget);
        let outbound = Arc::new(
            settings
                .outbound
                .reporting_to(&Arc::from(name.as_str()), observers.clone()),
        );
        let mut plugin = Plugin {
            outbound,
            log_budget,
            name: Arc::from(name.as_str()),
            runtime: runtime.clone(),
            pre,
            settings,
            observers,
            idle: Mutex::new(Vec::new()),
            memory_at_instantiation: 0,
            version: Version(String::new()),
            compiled: Compiled::Fresh,
        };
        // Instantiated once to prove it can run, then dropped: an idle
        // plugin holds no instance (nor a pool slot), and its first message
        // instantiates again (microseconds).
        // A plugin may be loaded on a Tokio worker (a CLI command, a test):
        // the first instantiation blocks on a thread of its own, outside
        // any runtime's context.
        let first = std::thread::scope(|scope| {
            scope
                .spawn(|| wasmtime_wasi::runtime::in_tokio(plugin.instantiate()))
                .join()
                .unwrap_or_else(|_| {
                    Err(HandlerFailure::Host {
                        detail: "the host panicked while instantiating".into(),
                    })
                })
        })
        .map_err(|cause| PluginLoadError::Instantiate { name, cause })?;
        plugin.memory_at_instantiation = first.store.data().memory_bytes;
        Ok(plugin)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn settings(&self) -> &PluginSettings {
        &self.settings
    }

    /// The build's content digest.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// The contract version the plugin was built against: "0.2" or "0.1".
    pub fn contract(&self) -> &'static str {
        self.pre.contract()
    }

    /// Whether loading compiled the component or took it from the cache.
    pub fn compiled(&self) -> Compiled {
        self.compiled
    }

    /// Bytes of linear memory a fresh instance of this plugin holds.
    pub fn memory_at_instantiation(&self) -> usize {
        self.memory_at_instantiation
    }

    /// Runs one event through the handler. Never panics: every failure is a
    /// [`HandlerOutcome::Failed`], and an instance that failed is dropped with
    /// its `Store` (a trapped `Store` cannot be entered again).
    ///
    /// Call it from a thread that is not running async tasks (a plain thread
    /// or a blocking-pool one, as the consumers do): a plugin's WASI calls,
    /// such as printing with `inherit_stdio`, block on a Tokio runtime.
    pub fn handle(&self, event: &TaskEvent, delivery: &Delivery) -> HandlerOutcome {
        self.handle_with_outbox(event, delivery).0
    }

    /// [`Plugin::handle`], with the follow-up messages the handler put in
    /// its outbox: some only when it returned `ok`, none otherwise.
    pub fn handle_with_outbox(
        &self,
        event: &TaskEvent,
        delivery: &Delivery,
    ) -> (HandlerOutcome, Vec<OutgoingMessage>) {
        let handling = self.handle_recorded(event, delivery);
        (handling.outcome, handling.outbox)
    }

    /// [`Plugin::handle_with_outbox`], with what a failed call saw when the
    /// plugin records failures.
    pub fn handle_recorded(&self, event: &TaskEvent, delivery: &Delivery) -> Handling {
        wasmtime_wasi::runtime::in_tokio(self.handle_async(event, delivery))
    }

    /// [`Plugin::handle_recorded`] as a future, for a caller on a Tokio
    /// runtime: the handler runs on a fiber of its own, and while it waits
    /// (a sleep, an HTTP response) it holds no thread, so one thread can
    /// keep many handlers waiting. Every limit is the same as in the
    /// blocking call: the deadline's epoch interrupt and wait limit, fuel,
    /// memory, and the instance pool.
    pub async fn handle_async(&self, event: &TaskEvent, delivery: &Delivery) -> Handling {
        let failed = |outcome: HandlerFailure, recorded| Handling {
            outcome: HandlerOutcome::Failed(outcome),
            outbox: Vec::new(),
            recorded,
        };
        let mut instance = match self.acquire().await {
            Ok(instance) => instance,
            Err(failure) => return failed(failure, None),
        };
        instance.store.data_mut().begin_event(delivery);
        self.start_deadline(&mut instance.store);
        if let Err(failure) = self.refuel(&mut instance.store) {
            return failed(failure, None);
        }
        let result = instance
            .bindings
            .handle(&mut instance.store, event, delivery)
            .await;
        let recorded = |instance: &mut Instance| {
            let state = instance.store.data_mut();
            let seen = state.take_tape()?;
            Some((seen, std::mem::take(&mut state.publish.outbox)))
        };
        if result.is_ok() && instance.store.data().wait_limit.cut_short() {
            // It waited until its deadline and came back before the epoch
            // interrupt: still a deadline, and the instance is dropped.
            let deadline = HandlerFailure::Deadline {
                limit: self.settings.deadline,
            };
            return failed(deadline, recorded(&mut instance));
        }
        match result {
            Ok(Ok(())) => {
                let outbox = std::mem::take(&mut instance.store.data_mut().publish.outbox);
                // Nothing to keep of an event handled: an idle instance
                // holds no recording.
                instance.store.data().take_tape();
                self.release(instance);
                Handling {
                    outcome: HandlerOutcome::Accepted,
                    outbox,
                    recorded: None,
                }
            }
            Ok(Err((reason, disposition))) => {
                let recorded = recorded(&mut instance);
                self.release(instance);
                let reason = self.settings.config.redact(reason);
                Handling {
                    outcome: HandlerOutcome::Rejected {
                        // Logged and counted on every retry: bounded and escaped.
                        reason: inert_owned(reason, MAX_UNTRUSTED_BYTES),
                        disposition,
                    },
                    outbox: Vec::new(),
                    recorded,
                }
            }
            Err(err) => {
                let recorded = recorded(&mut instance);
                failed(self.classify(&instance.store, err), recorded)
            }
        }
    }

    /// Starts the deadline of one event (or of instantiation): the epoch
    /// interrupt for running wasm, the wait limit for blocking calls.
    fn start_deadline(&self, store: &mut Store<HostState>) {
        store.set_epoch_deadline(self.deadline_ticks());
        store.data_mut().wait_limit.start(self.settings.deadline);
    }

    fn deadline_ticks(&self) -> u64 {
        let ticks = self
            .settings
            .deadline
            .as_nanos()
            .div_ceil(EPOCH_TICK.as_nanos());
        u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
    }

    /// Fills the store's tank for one event (or the start-up), when the
    /// runtime counts fuel.
    fn refuel(&self, store: &mut Store<HostState>) -> Result<(), HandlerFailure> {
        if !self.runtime.settings().fuel {
            return Ok(());
        }
        let fuel = self.settings.fuel_per_event.unwrap_or(u64::MAX);
        store.set_fuel(fuel).map_err(|err| HandlerFailure::Host {
            detail: format!("cannot set fuel: {err:#}"),
        })
    }

    async fn acquire(&self) -> Result<Instance, HandlerFailure> {
        if self.settings.instance_mode == InstanceMode::Reuse
            && let Some(instance) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
        {
            return Ok(instance);
        }
        self.instantiate().await
    }

    fn release(&self, instance: Instance) {
        if self.settings.instance_mode == InstanceMode::Reuse {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(instance);
        }
    }

    async fn instantiate(&self) -> Result<Instance, HandlerFailure> {
        let span = tracing::debug_span!("instantiate", plugin = %self.name);
        let state = HostState::new(
            self.name.clone(),
            self.settings.memory_limit_bytes,
            self.settings.inherit_stdio,
            Grants {
                config: self.settings.config.clone(),
                outbound: self.outbound.clone(),
                publish: self.settings.publish.clone(),
                key_value: self.settings.key_value.clone(),
            },
            self.observers.clone(),
            self.log_budget.clone(),
            self.settings.record_failures,
        );
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|state| state);
        // The deadline must be set before instantiating: the default of 0
        // would interrupt the component's start at once.
        self.start_deadline(&mut store);
        self.refuel(&mut store)?;
        match tracing::Instrument::instrument(self.pre.instantiate(&mut store), span).await {
            Ok(bindings) => Ok(Instance { store, bindings }),
            Err(err) => Err(self.classify(&store, err)),
        }
    }

    fn classify(&self, store: &Store<HostState>, err: wasmtime::Error) -> HandlerFailure {
        if let Some(desired) = store.data().memory_denied {
            return HandlerFailure::MemoryLimit {
                detail: format!(
                    "tried to grow memory to {desired} bytes, limit {} bytes",
                    self.settings.memory_limit_bytes
                ),
            };
        }
        if err.chain().any(|cause| {
            matches!(
                cause.downcast_ref(),
                Some(wasmtime::component::ResourceTableError::Full)
            )
        }) {
            return HandlerFailure::MemoryLimit {
                detail: format!(
                    "holds more host resources (header sets, requests, streams, buckets) than \
                     the {} its memory limit of {} bytes allows",
                    super::state::max_host_resources(self.settings.memory_limit_bytes),
                    self.settings.memory_limit_bytes
                ),
            };
        }
        if err.chain().any(|cause| {
            matches!(
                cause.downcast_ref(),
                Some(
                    wasmtime_wasi_http::FieldMapError::TotalSizeTooBig
                        | wasmtime_wasi_http::FieldMapError::TooManyFields
                )
            )
        }) {
            return HandlerFailure::MemoryLimit {
                detail: format!(
                    "a header set past its limit of {} bytes",
                    super::state::MAX_HEADER_SET_BYTES
                ),
            };
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => HandlerFailure::Deadline {
                limit: self.settings.deadline,
            },
            Some(Trap::OutOfFuel) => HandlerFailure::OutOfFuel {
                limit: self.settings.fuel_per_event.unwrap_or(u64::MAX),
            },
            Some(Trap::UnreachableCodeReached) => HandlerFailure::Trap {
                detail: "unreachable instruction executed (a Rust panic or abort in the plugin)"
                    .into(),
            },
            // Rust guests keep their stack in linear memory: a deep recursion
            // usually ends here, below address 0, rather than as StackOverflow.
            Some(Trap::MemoryOutOfBounds) => HandlerFailure::Trap {
                detail: "out of bounds memory access (a bad pointer, or the plugin's stack \
                         in linear memory overflowing)"
                    .into(),
            },
            Some(Trap::StackOverflow) => HandlerFailure::Trap {
                detail: "call stack exhausted (recursion too deep)".into(),
            },
            Some(trap) => HandlerFailure::Trap {
                detail: trap.to_string(),
            },
            // The chain can carry the plugin's own function names.
            None => HandlerFailure::Host {
                detail: inert_owned(format!("{err:#}"), MAX_UNTRUSTED_BYTES),
            },
        }
    }
}
