//! What changes while the host runs: starting, stopping and restarting a
//! plugin's consumer, and applying a changed config's plugin list as a
//! [`plan`](crate::plan) (a changed entry loads before anything stops).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{error, info};

use super::HostError;
use crate::admin::AdminView;
use crate::config::{HostConfig, PluginConfig};
use crate::dispatch::{Dispatcher, OutboxSender};
use crate::metrics::Metrics;
use crate::mq::{MqRuntime, PluginConsumer};
use crate::observe::{HostEvent, Observers};
use crate::plan::{Step, plan};
use crate::slot::{PluginSlot, SlotState, load_unreported};
use crate::topic::TopicName;
use crate::wasm::{Plugin, PoolUsage, WasmRuntime};

/// A plugin with its consumer.
pub(super) struct Running {
    pub(super) config: PluginConfig,
    pub(super) slot: Arc<PluginSlot>,
    pub(super) consumer: PluginConsumer,
}

/// What the watcher and the admin listener share with the host.
pub(super) struct Shared {
    pub(super) topic: TopicName,
    pub(super) config: Mutex<HostConfig>,
    pub(super) wasm: Arc<WasmRuntime>,
    pub(super) mq: MqRuntime,
    /// Listener threads the client runtime was sized for at start.
    pub(super) listener_capacity: usize,
    pub(super) observers: Observers,
    pub(super) metrics: Arc<Metrics>,
    /// Changed only by start-up, the watcher and shutdown, one at a time.
    pub(super) running: tokio::sync::Mutex<BTreeMap<String, Running>>,
    /// The slots, for readers that must not wait for a consumer to drain.
    pub(super) slots: RwLock<Vec<Arc<PluginSlot>>>,
    pub(super) ready: AtomicBool,
    pub(super) config_error: Mutex<Option<String>>,
    /// Sends plugins' follow-up messages, while the producer runs.
    pub(super) outbox: Mutex<Option<Arc<dyn OutboxSender>>>,
}

impl Running {
    pub(super) async fn stop(self, observers: Observers) {
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
    pub(super) fn slots(&self) -> Vec<Arc<PluginSlot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn publish_slots(&self, running: &BTreeMap<String, Running>) {
        *self.slots.write().unwrap_or_else(|e| e.into_inner()) =
            running.values().map(|r| r.slot.clone()).collect();
    }

    pub(super) async fn start_consumer(
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
        let mut dispatcher = Dispatcher::new(
            slot.name(),
            slot.clone(),
            on_undecodable,
            max_body_bytes,
            self.observers.clone(),
        );
        if let Some(outbox) = self
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            dispatcher = dispatcher.with_outbox(outbox);
        }
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
    pub(super) async fn apply_config(&self, new: HostConfig) {
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
        // Restarts whose new group another plugin still held when they came
        // up (two plugins swapping groups in one change): all of a host's
        // consumers share one client instance, which cannot hold a group
        // twice, so these start once every other step is done.
        let mut deferred = Vec::new();
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
                            if self.held_by_another(&name, &config.group()).await {
                                deferred.push((config.clone(), plugin));
                            } else {
                                self.serve(config, plugin).await;
                            }
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
        for (config, plugin) in deferred {
            info!(plugin = %config.name, group = %config.group(), "its new group is free now: starting its consumer");
            self.serve(&config, plugin).await;
        }
    }

    /// Whether a running plugin other than `name` consumes in `group`.
    async fn held_by_another(&self, name: &str, group: &str) -> bool {
        self.running
            .lock()
            .await
            .iter()
            .any(|(other, running)| other != name && running.config.group() == group)
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

    fn store_health(&self) -> Option<(&'static str, Result<(), String>)> {
        self.wasm.store_health()
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
