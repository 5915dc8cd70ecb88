//! The host: loads the plugins, then starts one consumer per plugin, the
//! built-in producer if configured, the admin listener, and the watcher that
//! hot-reloads plugin files and the config's plugin list.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::watch;
use tracing::{info, warn};

mod lifecycle;
mod watcher;

use lifecycle::Shared;
use watcher::Watcher;

use crate::admin::{self, AdminView};
use crate::config::{ConfigError, HostConfig};
use crate::metrics::Metrics;
use crate::mq::{MqError, MqRuntime, Publisher, PublisherOutbox, RouteClient};
use crate::observe::Observers;
use crate::slot::{PluginSlot, load_candidate, load_plugin};
use crate::topic::TopicName;
use crate::wasm::{PluginLoadError, PoolUsage, WasmRuntime};

/// How often the host asks the name server and the brokers holding its
/// topic whether they answer (for `/readyz`).
pub(crate) const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

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
    #[error(transparent)]
    Traces(#[from] crate::traces::TracesError),
}

/// A running mqplug host. Dropping it without [`Host::shutdown`] abandons
/// in-flight handlers; their messages are redelivered later.
pub struct Host {
    shared: Arc<Shared>,
    publisher: Option<Arc<Publisher>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    admin_addr: Option<SocketAddr>,
    /// The span exporter, while `[traces]` is configured.
    traces: Option<crate::traces::Traces>,
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
                            contract = instance.contract(),
                            took_ms = started.elapsed().as_millis() as u64,
                            "plugin loaded"
                        );
                        let candidate = load_candidate(&wasm, plugin, &observers);
                        Ok(Arc::new(
                            PluginSlot::new(plugin, instance).with_candidate(plugin, candidate),
                        ))
                    })
                    .collect::<Result<Vec<_>, PluginLoadError>>()
            })
            .await
            .map_err(|err| HostError::LoadTask(err.to_string()))??
        };

        let listener_capacity = config.listener_threads() + SPARE_LISTENER_THREADS;
        let mq = MqRuntime::with_credentials(listener_capacity, config.credentials()?)?;
        let traces = config
            .traces
            .as_ref()
            .map(|traces| crate::traces::Traces::start(&traces.endpoint, &traces.service_name))
            .transpose()?;
        if let Some(traces) = &config.traces {
            info!(endpoint = %traces.endpoint, "exporting a span per message per plugin (OTLP/HTTP)");
        }
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
                outbox: Mutex::new(None),
                not_serving: Mutex::new(BTreeMap::new()),
                route: tokio::sync::OnceCell::new(),
                broker: Mutex::new(None),
                topic_missing: std::sync::atomic::AtomicBool::new(false),
                lag: Mutex::new(BTreeMap::new()),
                history: Mutex::new(BTreeMap::new()),
            }),
            publisher: None,
            stop,
            tasks: Vec::new(),
            admin_addr: None,
            traces,
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
                // And the topics plugins publish follow-ups to, so their
                // consumers can subscribe before the first one.
                // (Checked when the config was validated.)
                let follow_ups: std::collections::BTreeSet<&String> = config
                    .plugins
                    .iter()
                    .flat_map(|plugin| &plugin.allowed_topics)
                    .collect();
                for topic in follow_ups
                    .into_iter()
                    .filter_map(|t| TopicName::new(t).ok())
                {
                    publisher.create(&topic, queues).await?;
                    info!(wire_topic = topic.wire(), queues, "follow-up topic created");
                }
            }
            info!(group = %config.producer.group, "producer started");
            let publisher = Arc::new(publisher);
            // Plugins' follow-up messages go out through it too.
            *self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(
                PublisherOutbox::new(publisher.clone(), tokio::runtime::Handle::current()),
            ));
            self.publisher = Some(publisher);
        }
        // The cluster, as the name server describes it: probed now (a
        // warning names what does not answer) and every PROBE_EVERY after.
        let route = RouteClient::start(&self.shared.mq, &config.name_server).await?;
        let _ = self.shared.route.set(route);
        let _ = self.shared.probe().await;
        {
            let (shared, mut stop) = (self.shared.clone(), self.stop.subscribe());
            self.tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(PROBE_EVERY) => {}
                    }
                    let _ = shared.probe().await;
                }
            }));
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
        self.publisher.as_deref()
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

    /// Whether the name server answers and a broker holding the topic
    /// does, as last probed (also on `/readyz`); `Err` says what does not.
    pub fn broker_health(&self) -> Result<(), String> {
        self.shared.broker_health().unwrap_or(Ok(()))
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
        // The consumers have stopped, so no dispatcher still holds it.
        self.shared
            .outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(publisher) = self.publisher {
            match Arc::try_unwrap(publisher) {
                Ok(publisher) => publisher.shutdown().await,
                Err(_) => warn!(
                    "the producer is still shared at shutdown; its client stops with the runtime"
                ),
            }
        }
        if let Some(route) = self.shared.route.get() {
            route.shutdown().await;
        }
        // Also while an admin connection still holds the shared state.
        self.shared.mq.shutdown().await;
        if let Some(traces) = self.traces {
            // Exports what is left: blocking, off the runtime's workers.
            let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        }
        info!("mqplug stopped");
    }
}
