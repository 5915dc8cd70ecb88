//! The host: loads the plugins, then starts one consumer per plugin and,
//! if configured, the built-in producer.

use std::sync::Arc;

use tracing::info;

use crate::config::{ConfigError, HostConfig};
use crate::dispatch::Dispatcher;
use crate::mq::{MqError, MqRuntime, PluginConsumer, Publisher};
use crate::observe::Observers;
use crate::topic::TopicName;
use crate::wasm::{Plugin, PluginLoadError, WasmRuntime};

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
}

/// A running mqplug host. Dropping it without [`Host::shutdown`] abandons
/// in-flight handlers; their messages are redelivered later.
pub struct Host {
    topic: TopicName,
    plugins: Vec<Arc<Plugin>>,
    consumers: Vec<PluginConsumer>,
    publisher: Option<Publisher>,
    mq: MqRuntime,
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

        let wasm = WasmRuntime::new(config.runtime_settings()).map_err(HostError::Engine)?;
        let mut plugins = Vec::new();
        for plugin in &config.plugins {
            let loaded = Plugin::load_file(
                &wasm,
                plugin.plugin_settings(),
                &plugin.path,
                observers.clone(),
            )?;
            info!(plugin = %plugin.name, path = %plugin.path.display(), "plugin loaded");
            plugins.push(Arc::new(loaded));
        }

        let listener_threads = config.plugins.iter().map(|p| p.concurrency as usize).sum();
        let mq = MqRuntime::new(listener_threads)?;
        let mut host = Host {
            topic: topic.clone(),
            plugins: Vec::new(),
            consumers: Vec::new(),
            publisher: None,
            mq,
        };
        if let Err(err) = host.connect(config, plugins, observers).await {
            host.shutdown().await;
            return Err(err);
        }
        Ok(host)
    }

    async fn connect(
        &mut self,
        config: &HostConfig,
        plugins: Vec<Arc<Plugin>>,
        observers: Observers,
    ) -> Result<(), HostError> {
        if config.producer.enabled {
            let mut publisher = Publisher::start(&self.mq, config.producer_settings()?).await?;
            if let Some(queues) = config.producer.create_topic_queues {
                publisher.create_topic(queues).await?;
                info!(wire_topic = self.topic.wire(), queues, "topic created");
            }
            info!(group = %config.producer.group, "producer started");
            self.publisher = Some(publisher);
        }
        for (plugin_config, plugin) in config.plugins.iter().zip(plugins) {
            let dispatcher = Dispatcher::new(
                plugin.name(),
                plugin.clone(),
                config.on_undecodable,
                config.max_body_bytes,
                observers.clone(),
            );
            let settings = plugin_config.consumer_settings(&config.name_server, &self.topic);
            let consumer = PluginConsumer::start(&self.mq, &settings, Arc::new(dispatcher)).await?;
            info!(
                plugin = plugin.name(),
                group = consumer.group(),
                tags = %settings.tags,
                concurrency = settings.concurrency,
                "consumer started"
            );
            self.consumers.push(consumer);
            self.plugins.push(plugin);
        }
        Ok(())
    }

    pub fn topic(&self) -> &TopicName {
        &self.topic
    }

    /// The built-in producer, if the config enabled it.
    pub fn publisher(&self) -> Option<&Publisher> {
        self.publisher.as_ref()
    }

    pub fn plugins(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    /// Stops pulling, lets in-flight handlers finish and their outcomes reach
    /// the broker, then closes the producer and the client runtime.
    pub async fn shutdown(self) {
        info!("shutting down: draining in-flight handlers");
        for consumer in self.consumers {
            let group = consumer.group().to_string();
            consumer.shutdown().await;
            info!(%group, "consumer stopped");
        }
        if let Some(publisher) = self.publisher {
            publisher.shutdown().await;
        }
        self.mq.shutdown().await;
        info!("mqplug stopped");
    }
}
