//! The RocketMQ client's runtime, sized for mqplug's listeners.

use std::sync::{Arc, Mutex};

use rocketmq_client_rust::{ClientRuntime, ClientRuntimeConfig};
use rocketmq_observability::TelemetryHandle;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};

use super::error::MqError;

/// Owns the client's Tokio runtime and its `ClientRuntime`.
///
/// The client runs concurrent listeners on its "metadata io" blocking lane,
/// which on 2 cores admits 4 tasks and queues 16: less than a consumer's
/// default concurrency, and the overflow is counted as a failure that sends
/// healthy messages to retry. The lane is sized here from the listener
/// threads all consumers will use.
pub struct MqRuntime {
    /// Taken by [`MqRuntime::shutdown`], which may run while others still
    /// hold the host's shared state.
    owner: Mutex<Option<RuntimeOwner>>,
    client: Arc<ClientRuntime>,
}

impl MqRuntime {
    /// `listener_threads`: the sum of every consumer's `consume_thread_max`.
    pub fn new(listener_threads: usize) -> Result<Self, MqError> {
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut config = RuntimeConfig::for_parallelism("mqplug-rocketmq", parallelism);
        let lane = &mut config.blocking_lane_policies.metadata_io;
        lane.max_concurrency = lane.max_concurrency.max(listener_threads + 4);
        lane.max_queue_depth = lane.max_queue_depth.max(4 * (listener_threads + 4));
        let total = (config.max_blocking_threads + listener_threads + 4).min(512);
        let config = config
            .with_max_blocking_threads(total)
            .map_err(|err| MqError::new("size the RocketMQ client's thread pools", &err))?;
        let owner = RuntimeOwner::plan(config)
            .map_err(|err| MqError::new("plan the RocketMQ client runtime", &err))?
            .build()
            .map_err(|err| MqError::new("start the RocketMQ client runtime", &err))?;
        let client = ClientRuntime::try_new(
            owner.root_context().component("client"),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )
        .map_err(|err| MqError::new("create the RocketMQ client runtime", &err))?;
        Ok(MqRuntime {
            owner: Mutex::new(Some(owner)),
            client,
        })
    }

    /// The raw client runtime, for callers that build their own clients on
    /// the same pools (the benchmarks' native consumer does).
    pub fn client(&self) -> Arc<ClientRuntime> {
        self.client.clone()
    }

    /// Stops the client runtime; call after every consumer and producer
    /// built on it has shut down.
    /// A second call does nothing.
    pub async fn shutdown(&self) {
        let Some(owner) = self.owner.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let report = self.client.shutdown().await;
        if !report.is_healthy() {
            tracing::warn!(report = %report.to_json(), "RocketMQ client runtime shut down unclean");
        }
        let _ = owner.shutdown_tasks().await;
        let _ = owner.shutdown_background();
    }
}
