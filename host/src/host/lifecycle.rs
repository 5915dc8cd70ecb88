//! What changes while the host runs: starting, stopping and restarting a
//! plugin's consumer, and applying a changed config's plugin list as a
//! [`plan`](crate::plan) (a changed entry loads before anything stops).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{debug, error, info, warn};

use super::HostError;
use crate::admin::{AdminView, NotServing, Sample};
use crate::config::{HostConfig, PluginConfig};
use crate::dispatch::{Dispatcher, OutboxSender};
use crate::metrics::Metrics;
use crate::mq::{ConsumeFrom, MqRuntime, PluginConsumer, Probe, RouteClient};
use crate::observe::{HostEvent, Observers};
use crate::plan::{Step, plan};
use crate::slot::{PluginSlot, SlotState, load_candidate, load_unreported};
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
    /// Plugins in the config that serve no build, by name: their load or
    /// their consumer failed when the config added or changed them. Each
    /// config change tries them again.
    pub(super) not_serving: Mutex<BTreeMap<String, NotServing>>,
    /// Route and offset requests of the host's own (readiness, where a new
    /// group starts); set once the host connects.
    pub(super) route: tokio::sync::OnceCell<RouteClient>,
    /// The last probe of the name server and the brokers holding the topic.
    pub(super) broker: Mutex<Option<Result<Probe, String>>>,
    /// Whether the last probe that reached the name server found no broker
    /// holding the topic (a probe that did not reach it changes nothing).
    pub(super) topic_missing: std::sync::atomic::AtomicBool,
    /// Messages waiting in each plugin's group, by plugin, as last read.
    pub(super) lag: Mutex<BTreeMap<String, u64>>,
    /// Each plugin's messages handled (all outcomes) and lag at each probe,
    /// the last [`HISTORY`] of them, for the status page's chart.
    pub(super) history: Mutex<BTreeMap<String, std::collections::VecDeque<Sample>>>,
}

/// A plugin entry's build, and its canary's candidate (or why that did
/// not load) when it names one.
type Builds = (Plugin, Option<Result<Plugin, String>>);

/// Samples kept per plugin: 10 minutes at one per probe (5 s).
const HISTORY: usize = 120;

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

    /// Asks the name server and the brokers holding the topic whether they
    /// answer, keeps the answer for `/readyz`, and returns what is wrong.
    pub(super) async fn probe(&self) -> Result<(), String> {
        let Some(route) = self.route.get() else {
            return Ok(());
        };
        let probe = route.probe(self.topic.wire()).await;
        let health = probe.clone().and_then(|probe| probe.health());
        let silent = probe.as_ref().ok().map(Probe::silent);
        // Whether a broker holds the topic; `None` while the name server
        // does not answer.
        let held = probe.as_ref().ok().map(|probe| !probe.brokers.is_empty());
        let changed = {
            let mut last = self.broker.lock().unwrap_or_else(|e| e.into_inner());
            let was = last
                .as_ref()
                .map(|last| last.clone().and_then(|probe| probe.health()));
            *last = Some(probe);
            was.as_ref() != Some(&health)
        };
        let wire = self.topic.wire();
        match held {
            Some(false) => {
                if !self.topic_missing.swap(true, Ordering::AcqRel) {
                    warn!(
                        topic = wire,
                        "topic {wire} is not on the broker yet; mqplug looks every {} s and consumes it as soon as it is there. \
                         A producer's first send creates it where the broker allows that (autoCreateTopicEnable); \
                         or create it: mqadmin updateTopic -n NAME_SERVER -c CLUSTER -t {wire}",
                        super::PROBE_EVERY.as_secs()
                    );
                }
            }
            Some(true) if self.topic_missing.swap(false, Ordering::AcqRel) => {
                info!(
                    topic = wire,
                    "topic {wire} is on the broker now: consuming it"
                );
                self.pick_up_topic().await;
            }
            _ if changed => match &health {
                Ok(()) => info!(
                    topic = wire,
                    "the name server and a broker holding the topic answer"
                ),
                Err(why) => warn!(topic = wire, "not ready: {why}"),
            },
            _ => {}
        }
        let lag = match silent {
            Some(silent) => self.read_lag(route, &silent).await,
            None => BTreeMap::new(),
        };
        self.sample(&lag);
        *self.lag.lock().unwrap_or_else(|e| e.into_inner()) = lag;
        health
    }

    /// Has every running consumer read the topic's route and rebalance now:
    /// the topic has just appeared.
    async fn pick_up_topic(&self) {
        // Each consumer's route request is bounded: the lock on the running
        // plugins (which a config reload and shutdown wait for) is not held
        // longer than that.
        const EACH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);
        for (name, running) in self.running.lock().await.iter() {
            let picked = tokio::time::timeout(
                EACH_WITHIN,
                running.consumer.pick_up_topic(self.topic.wire()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(crate::mq::MqError {
                    action: "read the topic's route".into(),
                    cause: format!("no answer within {EACH_WITHIN:?}"),
                })
            });
            match picked {
                Ok(queues) => debug!(plugin = %name, queues, "consumer picked up the topic"),
                Err(err) => warn!(
                    plugin = %name,
                    "the consumer picks up the topic at its next route refresh (within 30 s): {err}"
                ),
            }
        }
    }

    /// Every running plugin's lag (brokers in `silent` not asked).
    async fn read_lag(&self, route: &RouteClient, silent: &[String]) -> BTreeMap<String, u64> {
        let groups: Vec<(String, String)> = self
            .running
            .lock()
            .await
            .iter()
            .map(|(name, running)| (name.clone(), running.config.group()))
            .collect();
        let mut lag = BTreeMap::new();
        for (name, group) in groups {
            match route.lag(&group, self.topic.wire(), silent).await {
                Ok(waiting) => {
                    lag.insert(name, waiting);
                }
                Err(err) => debug!(plugin = %name, "lag not read: {err}"),
            }
        }
        lag
    }

    /// A plugin's first point, when its consumer starts: what it handled
    /// before the first probe shows on its chart too.
    fn first_sample(&self, name: &str) {
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let samples = history.entry(name.to_string()).or_default();
        if samples.is_empty() {
            samples.push_back(Sample {
                at: std::time::SystemTime::now(),
                handled: self.handled(name),
                lag: None,
            });
        }
    }

    /// Messages `name` handled so far, every outcome.
    fn handled(&self, name: &str) -> u64 {
        ["success", "retry_later", "retry_after", "dead_letter"]
            .iter()
            .map(|outcome| self.metrics.messages(name, outcome))
            .sum()
    }

    /// A point of each serving plugin's chart: handled so far, and `lag`.
    fn sample(&self, lag: &BTreeMap<String, u64>) {
        let at = std::time::SystemTime::now();
        let names: Vec<String> = self
            .slots()
            .iter()
            .map(|slot| slot.name().to_string())
            .collect();
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            let handled = self.handled(&name);
            let samples = history.entry(name.clone()).or_default();
            samples.push_back(Sample {
                at,
                handled,
                lag: lag.get(&name).copied(),
            });
            while samples.len() > HISTORY {
                samples.pop_front();
            }
        }
    }

    /// Notes that `config`'s plugin serves nothing, and why.
    fn mark_not_serving(&self, config: &PluginConfig, error: String) {
        error!(plugin = %config.name, "plugin in the config not serving: {error}");
        self.not_serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                config.name.clone(),
                NotServing {
                    name: config.name.clone(),
                    path: config.path.clone(),
                    group: config.group(),
                    error,
                    since: std::time::SystemTime::now(),
                },
            );
    }

    fn mark_serving(&self, name: &str) {
        self.not_serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
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
        dispatcher = dispatcher.with_group(&settings.group);
        // Its chart starts before its first message can be handled.
        self.first_sample(&plugin_config.name);
        // A cluster that refuses the credentials: say so now, by name,
        // rather than a consumer that retries in silence.
        if let Some(route) = self.route.get()
            && let Err(why) = route.check_access(&settings.group, self.topic.wire()).await
        {
            return Err(HostError::Mq(crate::mq::MqError {
                action: format!("start the consumer of plugin {}", slot.name()),
                cause: why,
            }));
        }
        if settings.consume_from == ConsumeFrom::Last
            && let Some(route) = self.route.get()
        {
            // A new group starts at the end of every queue: from now on.
            match route
                .start_new_group_at_end(&settings.group, self.topic.wire())
                .await
            {
                Ok(0) => {}
                Ok(queues) => {
                    info!(plugin = slot.name(), group = %settings.group, queues, "new consumer group: starts with messages published from now on")
                }
                Err(err) => warn!(
                    plugin = slot.name(),
                    group = %settings.group,
                    "cannot tell whether the consumer group is new; if it is, it may start with messages published before it existed: {err}"
                ),
            }
        }
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
        self.not_serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| wanted.contains_key(name));
        for step in plan(&old, &wanted) {
            match step {
                Step::Stop(name) => {
                    info!(plugin = %name, "removed from the config: draining");
                    self.stop_consumer(&name).await;
                    self.history
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&name);
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
                        Err(err) => self.mark_not_serving(config, format!("cannot load: {err}")),
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

    /// Loads a plugin entry off the async threads: its build, and its
    /// canary's candidate if it names one, both before anything stops. Its
    /// load report comes back unsent, so the caller can put its own state
    /// in place first.
    async fn load(&self, config: &PluginConfig) -> (Result<Builds, String>, Option<HostEvent>) {
        let wasm = self.wasm.clone();
        let observers = self.observers.clone();
        let entry = config.clone();
        let loading = move || {
            let (loaded, report) = load_unreported(&wasm, &entry, &observers);
            let loaded = loaded.map(|plugin| (plugin, load_candidate(&wasm, &entry, &observers)));
            (loaded, report)
        };
        match tokio::task::spawn_blocking(loading).await {
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
    /// its consumer started (a failure is logged and shown as not serving).
    async fn serve(&self, config: &PluginConfig, (plugin, candidate): Builds) -> bool {
        let slot = Arc::new(PluginSlot::new(config, plugin).with_candidate(config, candidate));
        match self.start_consumer(config, slot).await {
            Ok(()) => {
                self.mark_serving(&config.name);
                true
            }
            Err(err) => {
                self.mark_not_serving(config, format!("cannot start its consumer: {err}"));
                false
            }
        }
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

    fn broker_health(&self) -> Option<Result<(), String>> {
        let probe = self.broker.lock().unwrap_or_else(|e| e.into_inner());
        probe
            .as_ref()
            .map(|probe| probe.as_ref().map_err(Clone::clone).and_then(Probe::health))
    }

    fn broker_notes(&self) -> Vec<String> {
        let probe = self.broker.lock().unwrap_or_else(|e| e.into_inner());
        match probe.as_ref() {
            Some(Ok(probe)) => probe.notes(),
            _ => Vec::new(),
        }
    }

    fn lag(&self) -> BTreeMap<String, u64> {
        self.lag.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn history(&self, plugin: &str) -> Vec<Sample> {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(plugin)
            .map(|samples| samples.iter().copied().collect())
            .unwrap_or_default()
    }

    fn not_serving(&self) -> Vec<NotServing> {
        self.not_serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
