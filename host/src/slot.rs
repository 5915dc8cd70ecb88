//! A plugin that can be swapped while it serves: the consumer's handler.
//!
//! The slot holds the current build behind a lock taken only to clone an
//! `Arc`. A handler call keeps the build it started with until it returns, so
//! a swap never interrupts a message: messages already in a handler finish on
//! the old build, the next message gets the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use crate::canary::{Canary, CanaryState, CanaryStatus, Side};
use crate::config::PluginConfig;
use crate::delivery::Delivery;
use crate::dispatch::{EventHandler, Handled};
use crate::event::TaskEvent;
use crate::observe::{HostEvent, Observers};
use crate::outcome::HandlerOutcome;
use crate::wasm::{Compiled, Plugin, PluginLoadError, Version, WasmRuntime};

/// What a slot is doing, for `/plugins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    Serving,
    /// The last reload was refused; the previous build keeps serving.
    ReloadFailed {
        version: String,
        error: String,
    },
    /// Removed from the config: finishing in-flight messages, then stopping.
    Draining,
}

/// One build of a plugin.
#[derive(Clone)]
struct Build {
    plugin: Arc<Plugin>,
    version: Arc<str>,
    loaded_at: SystemTime,
    from_cache: bool,
}

/// A snapshot of a slot for status reports.
#[derive(Debug, Clone)]
pub struct SlotStatus {
    pub name: String,
    pub path: PathBuf,
    pub group: String,
    pub version: String,
    pub loaded_at: SystemTime,
    pub from_cache: bool,
    pub state: SlotState,
    /// The contract version the serving build was built against.
    pub contract: &'static str,
    /// The config keys and secret names it is granted (never values).
    pub config_keys: Vec<String>,
    pub secret_keys: Vec<String>,
    /// The entry's candidate build, if it names one.
    pub canary: Option<CandidateStatus>,
}

/// A candidate build beside the current one, for status reports.
#[derive(Debug, Clone)]
pub struct CandidateStatus {
    pub path: PathBuf,
    /// `Err` when the candidate did not load: the current build serves all.
    pub loaded: Result<CandidateBuild, String>,
}

/// A loaded candidate: its build and how it compares.
#[derive(Debug, Clone)]
pub struct CandidateBuild {
    pub version: String,
    pub loaded_at: SystemTime,
    pub canary: CanaryStatus,
}

pub struct PluginSlot {
    name: Arc<str>,
    path: PathBuf,
    group: String,
    current: RwLock<Build>,
    state: Mutex<SlotState>,
    /// The entry's candidate build and its canary, if the entry names one.
    candidate: RwLock<Option<Candidate>>,
    /// Where failed events are written down, if the entry records them.
    failures: Option<crate::recorded::FailureLog>,
}

/// A candidate build, or why it did not load.
struct Candidate {
    path: PathBuf,
    loaded: Result<Loaded, String>,
}

/// A candidate that loaded, and its canary.
struct Loaded {
    version: Arc<str>,
    loaded_at: SystemTime,
    /// The build while the canary runs; let go of (with its instances)
    /// once it ends.
    build: Option<Build>,
    canary: Arc<Canary>,
}

/// Reads, compiles (or takes from the cache) and instantiates the plugin a
/// config entry names, and reports the attempt as a [`HostEvent::Loaded`].
pub fn load_plugin(
    runtime: &Arc<WasmRuntime>,
    config: &PluginConfig,
    observers: &Observers,
) -> Result<Plugin, PluginLoadError> {
    let (result, report) = load_unreported(runtime, config, observers);
    observers.emit(|| report);
    result
}

/// [`load_plugin`] without the report, for a caller that must change its own
/// state before anyone hears of the load.
pub(crate) fn load_unreported(
    runtime: &Arc<WasmRuntime>,
    config: &PluginConfig,
    observers: &Observers,
) -> (Result<Plugin, PluginLoadError>, HostEvent) {
    let started = Instant::now();
    let (result, version) = match std::fs::read(&config.path) {
        Ok(wasm) => {
            let result = config
                .plugin_settings()
                .map_err(|err| PluginLoadError::Settings {
                    name: config.name.clone(),
                    problem: err.to_string(),
                })
                .and_then(|settings| Plugin::load(runtime, settings, &wasm, observers.clone()));
            // A loaded plugin carries the digest its compile computed; hash
            // the bytes again only for a build that did not load.
            let version = match &result {
                Ok(plugin) => plugin.version().clone(),
                Err(_) => Version::of(&wasm),
            };
            (result, version)
        }
        Err(cause) => (
            Err(PluginLoadError::Read {
                name: config.name.clone(),
                path: config.path.clone(),
                cause,
            }),
            Version(String::new()),
        ),
    };
    let report = HostEvent::Loaded {
        plugin: Arc::from(config.name.as_str()),
        version: Arc::from(version.0.as_str()),
        result: result.as_ref().map(|_| ()).map_err(ToString::to_string),
        from_cache: result
            .as_ref()
            .is_ok_and(|plugin| plugin.compiled() == Compiled::FromCache),
        took: started.elapsed(),
    };
    (result, report)
}

/// Loads the candidate build an entry names (its `canary`), with the
/// entry's grants and limits; `None` when it names none.
pub fn load_candidate(
    runtime: &Arc<WasmRuntime>,
    config: &PluginConfig,
    observers: &Observers,
) -> Option<Result<Plugin, String>> {
    let canary = config.canary.as_ref()?;
    let mut entry = config.clone();
    entry.path = canary.path.clone();
    entry.canary = None;
    // Not reported as a load of the plugin: the current build serves on.
    let (loaded, _) = load_unreported(runtime, &entry, observers);
    Some(loaded.map_err(|err| err.to_string()))
}

impl PluginSlot {
    pub fn new(config: &PluginConfig, plugin: Plugin) -> Self {
        PluginSlot {
            name: Arc::from(config.name.as_str()),
            path: config.path.clone(),
            group: config.group(),
            current: RwLock::new(Build::of(plugin)),
            state: Mutex::new(SlotState::Serving),
            candidate: RwLock::new(None),
            failures: config
                .record_failures
                .as_ref()
                .map(|record| crate::recorded::FailureLog::new(record, &config.name)),
        }
    }

    /// Puts the entry's candidate beside the current build: from the next
    /// message its share of users goes to it ([`load_candidate`] loaded it).
    pub fn with_candidate(
        self,
        config: &PluginConfig,
        loaded: Option<Result<Plugin, String>>,
    ) -> Self {
        let (Some(canary), Some(loaded)) = (&config.canary, loaded) else {
            return self;
        };
        let loaded = match loaded {
            Ok(plugin) => {
                let build = Build::of(plugin);
                tracing::info!(
                    plugin = %self.name,
                    current = short(&self.version()),
                    candidate = short(&build.version),
                    percent = canary.percent,
                    "canary started: the candidate build handles {}% of users",
                    canary.percent
                );
                Ok(Loaded {
                    version: build.version.clone(),
                    loaded_at: build.loaded_at,
                    build: Some(build),
                    canary: Arc::new(Canary::new(canary)),
                })
            }
            Err(error) => {
                tracing::error!(
                    plugin = %self.name,
                    path = %canary.path.display(),
                    "the canary's candidate did not load; the current build handles every message: {error}"
                );
                Err(error)
            }
        };
        *self.candidate.write().unwrap_or_else(|e| e.into_inner()) = Some(Candidate {
            path: canary.path.clone(),
            loaded,
        });
        self
    }

    fn candidate(&self) -> std::sync::RwLockWriteGuard<'_, Option<Candidate>> {
        self.candidate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The running canary, if there is one: its candidate build and canary.
    fn running_canary(&self) -> Option<(Build, Arc<Canary>)> {
        let candidate = self.candidate.read().unwrap_or_else(|e| e.into_inner());
        let loaded = candidate.as_ref()?.loaded.as_ref().ok()?;
        let build = loaded.build.as_ref()?;
        (loaded.canary.state() == CanaryState::Running)
            .then(|| (build.clone(), loaded.canary.clone()))
    }

    /// Whether a promotion put the candidate in the entry's place: then the
    /// entry's own file is not reloaded until the entry changes.
    pub fn promoted(&self) -> bool {
        let candidate = self.candidate.read().unwrap_or_else(|e| e.into_inner());
        candidate
            .as_ref()
            .and_then(|candidate| candidate.loaded.as_ref().ok())
            .is_some_and(|loaded| loaded.canary.state() == CanaryState::Promoted)
    }

    /// Ends the running canary in `state`, taking its build out of the
    /// slot: the build, for a promotion; `Err` says why not.
    fn end_canary(&self, state: CanaryState) -> Result<Build, String> {
        let mut candidate = self.candidate();
        let loaded = match candidate.as_mut().map(|candidate| &mut candidate.loaded) {
            None => return Err("it has no canary".into()),
            Some(Err(error)) => return Err(format!("its candidate did not load: {error}")),
            Some(Ok(loaded)) => loaded,
        };
        loaded
            .canary
            .end(state)
            .map_err(|state| format!("its canary is {}", state.name()))?;
        loaded
            .build
            .take()
            .ok_or_else(|| "its candidate is gone".to_string())
    }

    /// Makes the running canary's candidate the current build; returns its
    /// version. `Err` says why not (no canary, or it is not running).
    pub fn promote(&self) -> Result<Arc<str>, String> {
        let build = self.end_canary(CanaryState::Promoted)?;
        let version = build.version.clone();
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            build,
        );
        tracing::info!(
            plugin = %self.name,
            from = short(&old.version),
            to = short(&version),
            "canary promoted: the candidate handles every message from the next one, until the \
             entry changes or the host restarts (point the entry's path at the candidate's file \
             to keep it); the entry's own file is not reloaded meanwhile"
        );
        Ok(version)
    }

    /// Stops the running canary: the current build handles every message.
    pub fn abort_canary(&self) -> Result<(), String> {
        let build = self.end_canary(CanaryState::Aborted)?;
        tracing::info!(
            plugin = %self.name,
            candidate = short(&build.version),
            "canary aborted: the current build handles every message from the next one"
        );
        Ok(())
    }

    /// Writes a failed event down with what the plugin saw; a write that
    /// fails is logged, the message's outcome stays as it is.
    fn write_down(
        &self,
        version: &str,
        event: &TaskEvent,
        delivery: &Delivery,
        outcome: &HandlerOutcome,
        recorded: (crate::wasm::Seen, Vec<crate::wasm::OutgoingMessage>),
        plugin: &Plugin,
    ) {
        let Some(failures) = &self.failures else {
            return;
        };
        let Some(recording) = crate::recorded::Recording::of(
            &self.name,
            version,
            event,
            delivery,
            outcome,
            recorded,
            &plugin.settings().config,
        ) else {
            return;
        };
        match failures.write(&recording) {
            Ok(path) => tracing::info!(
                plugin = %self.name,
                file = %path.display(),
                "failure recorded: mqplug dlq export --plugin {} --id {} makes it a fixture",
                self.name,
                crate::text::inert(&delivery.message_id, 128)
            ),
            Err(err) => tracing::warn!(plugin = %self.name, "failure not recorded: {err}"),
        }
    }

    /// After a rollback: the candidate's build (and its idle instances)
    /// let go of.
    fn release_candidate(&self) {
        if let Some(Ok(loaded)) = self.candidate().as_mut().map(|c| &mut c.loaded) {
            loaded.build = None;
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The serving build's digest.
    pub fn version(&self) -> Arc<str> {
        self.read().version.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Build> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the plugin's file again and, if it loads, serves it from the
    /// next message on. A build that fails to read, compile, link or
    /// instantiate is refused and the current one keeps serving.
    pub fn reload(
        &self,
        runtime: &Arc<WasmRuntime>,
        config: &PluginConfig,
        observers: &Observers,
    ) -> Result<Arc<str>, PluginLoadError> {
        let (result, report) = load_unreported(runtime, config, observers);
        // The swap or the refusal is in place before the load is reported, so
        // whoever hears of it sees the slot as it now is.
        let outcome = match result {
            Ok(plugin) => {
                let build = Build::of(plugin);
                let version = build.version.clone();
                let old = std::mem::replace(
                    &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
                    build,
                );
                self.set_state(SlotState::Serving);
                // A running canary compares the candidate with this build
                // from now on, not with the one it replaced.
                if let Some((_, canary)) = self.running_canary() {
                    canary.forget_current();
                }
                tracing::info!(
                    plugin = %self.name,
                    from = &old.version[..12.min(old.version.len())],
                    to = &version[..12.min(version.len())],
                    "plugin reloaded: the next message uses the new build"
                );
                Ok(version)
            }
            Err(err) => {
                self.refuse(&report, err.to_string());
                Err(err)
            }
        };
        observers.emit(|| report);
        outcome
    }

    /// Records a build that did not load (its load `report` names its
    /// version): the current build keeps serving, the slot shows why.
    pub fn refuse(&self, report: &HostEvent, error: String) {
        let version = match report {
            HostEvent::Loaded { version, .. } => version.to_string(),
            _ => String::new(),
        };
        tracing::error!(
            plugin = %self.name,
            serving = &self.version()[..12.min(self.version().len())],
            "reload refused, the current build keeps serving: {error}"
        );
        self.set_state(SlotState::ReloadFailed { version, error });
    }

    pub fn set_state(&self, state: SlotState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    pub fn status(&self) -> SlotStatus {
        let build = self.read();
        let candidate = self.candidate.read().unwrap_or_else(|e| e.into_inner());
        // After a promotion the candidate's file serves, not the entry's.
        let path = match candidate.as_ref() {
            Some(promoted)
                if promoted
                    .loaded
                    .as_ref()
                    .is_ok_and(|loaded| loaded.canary.state() == CanaryState::Promoted) =>
            {
                promoted.path.clone()
            }
            _ => self.path.clone(),
        };
        SlotStatus {
            name: self.name.to_string(),
            path,
            group: self.group.clone(),
            version: build.version.to_string(),
            loaded_at: build.loaded_at,
            from_cache: build.from_cache,
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            contract: build.plugin.contract(),
            config_keys: build.plugin.settings().config.keys().0.to_vec(),
            secret_keys: build.plugin.settings().config.keys().1.to_vec(),
            canary: candidate.as_ref().map(|candidate| CandidateStatus {
                path: candidate.path.clone(),
                loaded: candidate
                    .loaded
                    .as_ref()
                    .map(|loaded| CandidateBuild {
                        version: loaded.version.to_string(),
                        loaded_at: loaded.loaded_at,
                        canary: loaded.canary.status(),
                    })
                    .map_err(Clone::clone),
            }),
        }
    }
}

/// A build's digest as logs show it.
fn short(version: &str) -> &str {
    &version[..12.min(version.len())]
}

impl Build {
    fn of(plugin: Plugin) -> Build {
        Build {
            version: Arc::from(plugin.version().0.as_str()),
            from_cache: plugin.compiled() == Compiled::FromCache,
            plugin: Arc::new(plugin),
            loaded_at: SystemTime::now(),
        }
    }
}

impl EventHandler for PluginSlot {
    fn handle(&self, event: &TaskEvent, delivery: &Delivery) -> HandlerOutcome {
        self.handle_full(event, delivery).outcome
    }

    fn handle_versioned(
        &self,
        event: &TaskEvent,
        delivery: &Delivery,
    ) -> (HandlerOutcome, Option<Arc<str>>) {
        let handled = self.handle_full(event, delivery);
        (handled.outcome, handled.version)
    }

    fn handle_full(&self, event: &TaskEvent, delivery: &Delivery) -> Handled {
        wasmtime_wasi::runtime::in_tokio(self.handle_full_async(event, delivery))
    }

    fn handle_full_async<'a>(
        &'a self,
        event: &'a TaskEvent,
        delivery: &'a Delivery,
    ) -> crate::dispatch::HandledFuture<'a> {
        Box::pin(self.handle_in_build(event, delivery))
    }
}

impl PluginSlot {
    /// Runs the event in the build that takes it (the canary's candidate
    /// or the current one), and judges the canary.
    async fn handle_in_build(&self, event: &TaskEvent, delivery: &Delivery) -> Handled {
        // Clone the build and let go of the lock: a reload may swap while
        // this message is in the handler; it finishes on this build.
        // A running canary's candidate takes its share of users; the
        // current build the rest.
        let canary = self.running_canary();
        let (plugin, version, side) = match &canary {
            Some((candidate, canary)) if canary.takes(event.user_id) => (
                candidate.plugin.clone(),
                candidate.version.clone(),
                Side::Candidate,
            ),
            _ => {
                let build = self.read();
                (build.plugin.clone(), build.version.clone(), Side::Current)
            }
        };
        // Into the dispatcher's `message` span before the call, so the
        // plugin's own log lines carry the build too.
        tracing::Span::current().record("version", short(&version));
        let started = Instant::now();
        let handling = plugin.handle_async(event, delivery).await;
        let took = started.elapsed();
        let (mut outcome, outbox) = (handling.outcome, handling.outbox);
        if let Some((candidate, canary)) = canary {
            // First deliveries only: a message retried again and again
            // would count against one build many times.
            let verdict = (delivery.reconsume_times == 0)
                .then(|| {
                    let failed = !matches!(outcome, HandlerOutcome::Accepted);
                    canary.record(side, failed, took)
                })
                .flatten();
            if let Some(reason) = verdict {
                tracing::warn!(
                    plugin = %self.name,
                    candidate = short(&candidate.version),
                    "canary rolled back: {reason}; the current build handles every message \
                     from the next one, redeliveries of what the candidate failed included"
                );
                self.release_candidate();
            }
            // A candidate's dead letter is retried instead, so that the
            // current build gets the message if the candidate is rolled back.
            if side == Side::Candidate
                && let HandlerOutcome::Rejected {
                    reason,
                    disposition: crate::outcome::Disposition::DeadLetter,
                } = &outcome
            {
                outcome = HandlerOutcome::Rejected {
                    reason: format!(
                        "{reason} (a canary candidate's dead letter is retried instead)"
                    ),
                    disposition: crate::outcome::Disposition::Retry,
                };
            }
        }
        if let Some(recorded) = handling.recorded {
            self.write_down(&version, event, delivery, &outcome, recorded, &plugin);
        }
        Handled {
            outcome,
            version: Some(version),
            outbox,
        }
    }
}
