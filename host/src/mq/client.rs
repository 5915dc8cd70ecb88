//! The RocketMQ client's runtime, sized for mqplug's listeners.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rocketmq_client_rust::{
    AclClientRPCHook, ClientRpcHook, ClientRuntime, ClientRuntimeConfig, SessionCredentials,
};
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
    instance_name: String,
    /// Signs every request with the credentials, when the cluster asks for
    /// them. One `Arc` for every client built on this runtime: the client
    /// pool refuses one instance name with two different hooks.
    rpc_hook: Option<Arc<ClientRpcHook>>,
}

/// The access key and secret key of a RocketMQ (ACL 2.0) user. `Debug`
/// never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"[secret]")
            .finish()
    }
}

/// Runtimes made in this process, so each gets its own client instance.
static RUNTIMES: AtomicU64 = AtomicU64::new(0);

impl MqRuntime {
    /// `listener_threads`: the sum of every consumer's `consume_thread_max`.
    pub fn new(listener_threads: usize) -> Result<Self, MqError> {
        Self::with_credentials(listener_threads, None)
    }

    /// A runtime whose clients sign every request with `credentials`
    /// (HMAC-SHA1 over the request's fields and body, which ACL 2.0 checks).
    pub fn with_credentials(
        listener_threads: usize,
        credentials: Option<Credentials>,
    ) -> Result<Self, MqError> {
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
            instance_name: format!(
                "mqplug#{}#{}",
                std::process::id(),
                RUNTIMES.fetch_add(1, Ordering::Relaxed)
            ),
            rpc_hook: credentials.map(|credentials| {
                Arc::new(AclClientRPCHook::new(SessionCredentials::with_keys(
                    credentials.access_key,
                    credentials.secret_key,
                ))) as Arc<ClientRpcHook>
            }),
        })
    }

    /// What signs the requests of clients built on this runtime, if the
    /// cluster asks for credentials.
    pub fn rpc_hook(&self) -> Option<Arc<ClientRpcHook>> {
        self.rpc_hook.clone()
    }

    /// The client instance name every consumer built on this runtime shares.
    ///
    /// Consumers with one instance name share one client instance: its
    /// connections, route tables and rebalance service, about 0.6 MiB and
    /// one connection per consumer less than a client instance each
    /// (RocketMQ's default, which names every client by its process id and
    /// the time). Unique per runtime and process: the broker tells clients
    /// apart by `ip@instance`, so two hosts on one machine (or two hosts in
    /// one test process) must not share it, or each would be handed every
    /// queue of a group they both consume.
    pub fn instance_name(&self) -> &str {
        &self.instance_name
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
