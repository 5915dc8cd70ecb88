//! The host: loads the plugins, then starts one consumer per plugin, the
//! built-in producer if configured, the admin listener, and the watcher that
//! hot-reloads plugin files and the config's plugin list.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, AdminView};
use crate::config::{ConfigError, HostConfig, PluginConfig};
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::mq::{MqError, MqRuntime, PluginConsumer, Publisher};
use crate::observe::{HostEvent, Observers};
use crate::plan::{Step, plan};
use crate::slot::{PluginSlot, SlotState, load_plugin, load_unreported};
use crate::topic::TopicName;
use crate::wasm::{Plugin, PluginLoadError, PoolUsage, WasmRuntime};

/// Listener threads kept free for plugins added to the config at run time.
const SPARE_LISTENER_THREADS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Plugin(#[from] PluginLoadError),
    #[error(transparent)]
    Mq(#[from] MqError),
    #[error("cannot start the wasm engine: {0:#}")]
    Engine(wasmtime::Error),
    #[error("the task loading the plugins failed: {0}")]
    LoadTask(String),
    #[error("admin listener on {listen}: {cause}")]
    Admin {
        listen: String,
        cause: std::io::Error,
    },
}

/// A plugin with its consumer.
struct Running {
    config: PluginConfig,
    slot: Arc<PluginSlot>,
    consumer: PluginConsumer,
}

/// What the watcher and the admin listener share with the host.
struct Shared {
    topic: TopicName,
    config: Mutex<HostConfig>,
    wasm: Arc<WasmRuntime>,
    mq: MqRuntime,
    /// Listener threads the client runtime was sized for at start.
    listener_capacity: usize,
    observers: Observers,
    metrics: Arc<Metrics>,
    /// Changed only by start-up, the watcher and shutdown, one at a time.
    running: tokio::sync::Mutex<BTreeMap<String, Running>>,
    /// The slots, for readers that must not wait for a consumer to drain.
    slots: RwLock<Vec<Arc<PluginSlot>>>,
    ready: AtomicBool,
    config_error: Mutex<Option<String>>,
}

/// A running mqplug host. Dropping it without [`Host::shutdown`] abandons
/// in-flight handlers; their messages are redelivered later.
pub struct Host {
    shared: Arc<Shared>,
    publisher: Option<Publisher>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    admin_addr: Option<SocketAddr>,
}

impl Host {
    /// Validates the config and loads every plugin before connecting to
    /// anything, so a bad config or plugin fails fast with nothing started.
    pub async fn start(config: &HostConfig, observers: Observers) -> Result<Host, HostError> {
        config.validate()?;
        let topic = config.topic().map_err(ConfigError::from)?;
        info!(
            topic = topic.configured(),
            wire_topic = topic.wire(),
            name_server = %config.name_server,
            "starting mqplug"
        );
        let metrics = Metrics::new();
        let observers = observers.with(metrics.observer());

        let wasm = WasmRuntime::new(config.runtime_settings()).map_err(HostError::Engine)?;
        // Compiling and instantiating run off the async threads: they take
        // up to seconds, and a plugin's start-up may call WASI functions that
        // block on a Tokio runtime, which panics on an async thread.
        let loaded = {
            let (wasm, plugins, observers) =
                (wasm.clone(), config.plugins.clone(), observers.clone());
            tokio::task::spawn_blocking(move || {
                plugins
                    .iter()
                    .map(|plugin| {
                        let started = Instant::now();
                        let instance = load_plugin(&wasm, plugin, &observers)?;
                        info!(
                            plugin = %plugin.name,
                            path = %plugin.path.display(),
                            version = instance.version().short(),
                            compiled = ?instance.compiled(),
                            took_ms = started.elapsed().as_millis() as u64,
                            "plugin loaded"
                        );
                        Ok(Arc::new(PluginSlot::new(plugin, instance)))
                    })
                    .collect::<Result<Vec<_>, PluginLoadError>>()
            })
            .await
            .map_err(|err| HostError::LoadTask(err.to_string()))??
        };

        let listener_capacity = config.listener_threads() + SPARE_LISTENER_THREADS;
        let mq = MqRuntime::new(listener_capacity)?;
        let (stop, _) = watch::channel(false);
        let mut host = Host {
            shared: Arc::new(Shared {
                topic,
                config: Mutex::new(config.clone()),
                wasm,
                mq,
                listener_capacity,
                observers,
                metrics,
                running: tokio::sync::Mutex::new(BTreeMap::new()),
                slots: RwLock::new(Vec::new()),
                ready: AtomicBool::new(false),
                config_error: Mutex::new(None),
            }),
            publisher: None,
            stop,
            tasks: Vec::new(),
            admin_addr: None,
        };
        if let Err(err) = host.connect(config, loaded).await {
            host.shutdown().await;
            return Err(err);
        }
        Ok(host)
    }

    async fn connect(
        &mut self,
        config: &HostConfig,
        loaded: Vec<Arc<PluginSlot>>,
    ) -> Result<(), HostError> {
        if config.admin.enabled {
            let view: Arc<dyn AdminView> = self.shared.clone();
            let (addr, task) = admin::serve(
                &config.admin.listen,
                admin::Limits::new(config.admin.max_connections),
                view,
                self.stop.subscribe(),
            )
            .await
            .map_err(|cause| HostError::Admin {
                listen: config.admin.listen.clone(),
                cause,
            })?;
            self.admin_addr = Some(addr);
            self.tasks.push(task);
        }
        if config.producer.enabled {
            let mut publisher =
                Publisher::start(&self.shared.mq, config.producer_settings()?).await?;
            if let Some(queues) = config.producer.create_topic_queues {
                publisher.create_topic(queues).await?;
                info!(
                    wire_topic = self.shared.topic.wire(),
                    queues, "topic created"
                );
            }
            info!(group = %config.producer.group, "producer started");
            self.publisher = Some(publisher);
        }
        for (plugin_config, slot) in config.plugins.iter().zip(loaded) {
            self.shared.start_consumer(plugin_config, slot).await?;
        }
        self.shared.ready.store(true, Ordering::Release);
        if config.reload.watch {
            let watcher = Watcher::new(self.shared.clone(), config);
            self.tasks
                .push(tokio::spawn(watcher.run(self.stop.subscribe())));
        }
        Ok(())
    }

    pub fn topic(&self) -> &TopicName {
        &self.shared.topic
    }

    /// The built-in producer, if the config enabled it.
    pub fn publisher(&self) -> Option<&Publisher> {
        self.publisher.as_ref()
    }

    /// The plugins being served, by name.
    pub fn plugins(&self) -> Vec<Arc<PluginSlot>> {
        self.shared.slots()
    }

    /// Where the admin listener is, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The wasm pool's live slots (also on `/metrics`).
    pub fn pool_usage(&self) -> PoolUsage {
        self.shared.wasm.pool_usage()
    }

    /// Stops watching, stops pulling, lets in-flight handlers finish and
    /// their outcomes reach the broker, then closes the producer and the
    /// client runtime.
    pub async fn shutdown(self) {
        info!("shutting down: draining in-flight handlers");
        self.shared.ready.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        // Every consumer stops pulling at once and they drain together: the
        // whole stop takes the longest plugin's drain, not the sum.
        let running = std::mem::take(&mut *self.shared.running.lock().await);
        let mut stopping = tokio::task::JoinSet::new();
        for (_, plugin) in running {
            stopping.spawn(plugin.stop(self.shared.observers.clone()));
        }
        while stopping.join_next().await.is_some() {}
        if let Some(publisher) = self.publisher {
            publisher.shutdown().await;
        }
        // Also while an admin connection still holds the shared state.
        self.shared.mq.shutdown().await;
        info!("mqplug stopped");
    }
}

impl Running {
    async fn stop(self, observers: Observers) {
        self.slot.set_state(SlotState::Draining);
        let plugin: Arc<str> = self.slot.name().into();
        observers.emit(|| HostEvent::Draining {
            plugin: plugin.clone(),
        });
        let group = self.consumer.group().to_string();
        self.consumer.shutdown().await;
        info!(plugin = %plugin, %group, "consumer stopped");
        observers.emit(|| HostEvent::Stopped { plugin });
    }
}

impl Shared {
    fn slots(&self) -> Vec<Arc<PluginSlot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn publish_slots(&self, running: &BTreeMap<String, Running>) {
        *self.slots.write().unwrap_or_else(|e| e.into_inner()) =
            running.values().map(|r| r.slot.clone()).collect();
    }

    async fn start_consumer(
        &self,
        plugin_config: &PluginConfig,
        slot: Arc<PluginSlot>,
    ) -> Result<(), HostError> {
        let (on_undecodable, max_body_bytes, name_server) = {
            let config = self.config.lock().unwrap_or_else(|e| e.into_inner());
            (
                config.on_undecodable,
                config.max_body_bytes,
                config.name_server.clone(),
            )
        };
        let dispatcher = Dispatcher::new(
            slot.name(),
            slot.clone(),
            on_undecodable,
            max_body_bytes,
            self.observers.clone(),
        );
        let settings = plugin_config.consumer_settings(&name_server, &self.topic);
        let consumer = PluginConsumer::start(&self.mq, &settings, Arc::new(dispatcher)).await?;
        info!(
            plugin = slot.name(),
            version = &slot.version()[..12],
            group = consumer.group(),
            tags = %settings.tags,
            concurrency = settings.concurrency,
            "consumer started"
        );
        let mut running = self.running.lock().await;
        running.insert(
            plugin_config.name.clone(),
            Running {
                config: plugin_config.clone(),
                slot,
                consumer,
            },
        );
        self.publish_slots(&running);
        Ok(())
    }

    /// Drains and stops a plugin's consumer. The plugin stays listed (as
    /// `draining`) until its consumer has stopped.
    async fn stop_consumer(&self, name: &str) {
        let removed = self.running.lock().await.remove(name);
        if let Some(plugin) = removed {
            plugin.stop(self.observers.clone()).await;
        }
        let running = self.running.lock().await;
        self.publish_slots(&running);
    }

    /// Applies a changed config: plugins added start consuming, plugins
    /// removed drain and stop, plugins whose entry changed are restarted.
    async fn apply_config(&self, new: HostConfig) {
        let old: BTreeMap<String, PluginConfig> = {
            let running = self.running.lock().await;
            running
                .iter()
                .map(|(name, r)| (name.clone(), r.config.clone()))
                .collect()
        };
        let wanted: BTreeMap<String, PluginConfig> = new
            .plugins
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        for step in plan(&old, &wanted) {
            match step {
                Step::Stop(name) => {
                    info!(plugin = %name, "removed from the config: draining");
                    self.stop_consumer(&name).await;
                }
                Step::Start(name) => {
                    let config = &wanted[&name];
                    let (loaded, report) = self.load(config).await;
                    self.report(report);
                    match loaded {
                        Ok(plugin) => {
                            if self.serve(config, plugin).await {
                                info!(plugin = %name, "plugin added from the config");
                            }
                        }
                        Err(err) => {
                            error!(plugin = %name, "plugin in the config not started: {err}")
                        }
                    }
                }
                Step::Restart(name) => {
                    // The new build loads before anything stops: a build
                    // that fails leaves the running one serving.
                    let config = &wanted[&name];
                    let (loaded, report) = self.load(config).await;
                    match loaded {
                        Ok(plugin) => {
                            self.report(report);
                            info!(plugin = %name, "changed in the config: the new entry loaded, restarting its consumer");
                            self.stop_consumer(&name).await;
                            self.serve(config, plugin).await;
                        }
                        Err(err) => {
                            // The refusal is in place before the load is reported.
                            if let (Some(plugin), Some(report)) =
                                (self.running.lock().await.get(&name), &report)
                            {
                                plugin.slot.refuse(report, err);
                            }
                            self.report(report);
                        }
                    }
                }
            }
        }
    }

    /// Loads a plugin entry off the async threads. Its load report comes
    /// back unsent, so the caller can put its own state in place first.
    async fn load(&self, config: &PluginConfig) -> (Result<Plugin, String>, Option<HostEvent>) {
        let wasm = self.wasm.clone();
        let observers = self.observers.clone();
        let entry = config.clone();
        match tokio::task::spawn_blocking(move || load_unreported(&wasm, &entry, &observers)).await
        {
            Ok((loaded, report)) => (loaded.map_err(|err| err.to_string()), Some(report)),
            Err(err) => (Err(format!("loading the plugin panicked: {err}")), None),
        }
    }

    fn report(&self, report: Option<HostEvent>) {
        if let Some(report) = report {
            self.observers.emit(|| report);
        }
    }

    /// Starts consuming for a freshly loaded plugin, in a new slot; whether
    /// its consumer started (a failure is logged).
    async fn serve(&self, config: &PluginConfig, plugin: Plugin) -> bool {
        let slot = Arc::new(PluginSlot::new(config, plugin));
        let started = self.start_consumer(config, slot).await;
        if let Err(err) = &started {
            error!(plugin = %config.name, "cannot start the consumer of a plugin from the config: {err}");
        }
        started.is_ok()
    }
}

impl AdminView for Shared {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn slots(&self) -> Vec<Arc<PluginSlot>> {
        Shared::slots(self)
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn pool_usage(&self) -> PoolUsage {
        self.wasm.pool_usage()
    }

    fn config_error(&self) -> Option<String> {
        self.config_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A file's size and modification time: what a poll compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        modified: meta.modified().ok()?,
    })
}

/// One watched file: what was applied, and what was last seen since when.
struct Watched {
    applied: Option<Stamp>,
    seen: Option<Stamp>,
    seen_since: Instant,
}

impl Watched {
    fn new(path: &std::path::Path) -> Self {
        let now = stamp(path);
        Watched {
            applied: now,
            seen: now,
            seen_since: Instant::now(),
        }
    }

    /// Whether the file changed since it was last applied and has stayed
    /// unchanged for `settle` (so it is not still being written).
    fn settled_change(&mut self, path: &std::path::Path, settle: Duration) -> Option<Stamp> {
        let now = stamp(path);
        if now != self.seen {
            self.seen = now;
            self.seen_since = Instant::now();
            return None;
        }
        if now.is_some() && now != self.applied && self.seen_since.elapsed() >= settle {
            return now;
        }
        None
    }
}

/// Polls the plugin files and the config file.
struct Watcher {
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    config_file: Option<Watched>,
    files: BTreeMap<String, Watched>,
    poll: Duration,
    settle: Duration,
}

impl Watcher {
    fn new(shared: Arc<Shared>, config: &HostConfig) -> Self {
        Watcher {
            config_file: config.source.as_deref().map(Watched::new),
            config_path: config.source.clone(),
            files: config
                .plugins
                .iter()
                .map(|p| (p.name.clone(), Watched::new(&p.path)))
                .collect(),
            poll: Duration::from_millis(config.reload.poll_ms.max(10)),
            settle: Duration::from_millis(config.reload.settle_ms),
            shared,
        }
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        info!(
            poll_ms = self.poll.as_millis() as u64,
            settle_ms = self.settle.as_millis() as u64,
            "watching plugin files{}",
            if self.config_path.is_some() {
                " and the config file"
            } else {
                ""
            }
        );
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(self.poll) => {}
            }
            self.check_config().await;
            self.check_plugins().await;
        }
    }

    async fn check_config(&mut self) {
        let (Some(path), Some(watched)) = (&self.config_path, &mut self.config_file) else {
            return;
        };
        let Some(stamp) = watched.settled_change(path, self.settle) else {
            return;
        };
        watched.applied = Some(stamp);
        let overrides = self
            .shared
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overrides
            .clone();
        let parsed = HostConfig::from_file(path).and_then(|mut config| {
            // What the command line said still beats the file.
            config.apply(overrides);
            config.validate()?;
            // The pools were sized at start; a plugin list that outgrows
            // them would fail its events at run time, so it is refused now.
            config.fits_pools(
                self.shared.listener_capacity,
                self.shared.wasm.settings().max_instances,
            )?;
            Ok(config)
        });
        let new = match parsed {
            Ok(new) => new,
            Err(err) => {
                error!("config change refused, nothing changed: {err}");
                *self
                    .shared
                    .config_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
                return;
            }
        };
        info!(path = %path.display(), "config changed: applying its plugin list");
        {
            let current = self.shared.config.lock().unwrap_or_else(|e| e.into_inner());
            if current.name_server != new.name_server
                || current.topic != new.topic
                || current.producer.enabled != new.producer.enabled
                || current.admin.listen != new.admin.listen
            {
                warn!(
                    "only the plugin list changes at run time; restart mqplug to apply the other changed settings"
                );
            }
        }
        *self
            .shared
            .config_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.shared.apply_config(new.clone()).await;
        self.files = new
            .plugins
            .iter()
            .map(|p| (p.name.clone(), Watched::new(&p.path)))
            .collect();
        *self.shared.config.lock().unwrap_or_else(|e| e.into_inner()) = new;
    }

    async fn check_plugins(&mut self) {
        let running: Vec<(PluginConfig, Arc<PluginSlot>)> = {
            let running = self.shared.running.lock().await;
            running
                .values()
                .map(|r| (r.config.clone(), r.slot.clone()))
                .collect()
        };
        for (config, slot) in running {
            let watched = self
                .files
                .entry(config.name.clone())
                .or_insert_with(|| Watched::new(&config.path));
            let Some(stamp) = watched.settled_change(&config.path, self.settle) else {
                continue;
            };
            // Taken whatever the result: a refused build is not retried
            // until the file changes again.
            watched.applied = Some(stamp);
            info!(plugin = %config.name, path = %config.path.display(), "plugin file changed: reloading");
            let wasm = self.shared.wasm.clone();
            let observers = self.shared.observers.clone();
            // Compiling takes up to seconds: off the async threads, and off
            // the message path (handlers keep using the current build).
            let _ =
                tokio::task::spawn_blocking(move || slot.reload(&wasm, &config, &observers)).await;
        }
    }
}
