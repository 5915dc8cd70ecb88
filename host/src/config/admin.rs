//! `[admin]` (the admin listener) and `[traces]` (where spans go): what
//! operators see.

use serde::Deserialize;

/// Admin connections a host may hold at most: each costs a descriptor the
/// broker client also needs.
pub const MAX_ADMIN_CONNECTIONS: usize = 4096;

/// The admin HTTP listener: /healthz, /readyz, /plugins, /metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Address to bind; keep it on loopback unless something guards it.
    /// Port 0 picks a free port (logged at start-up).
    pub listen: String,
    /// Connections served at once. At the cap, the oldest connection that
    /// has not yet sent its request is closed to make room; if every one is
    /// mid-request, the new connection is closed instead.
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:9900".into(),
            max_connections: 64,
        }
    }
}

/// `[traces]`: the OpenTelemetry collector the host exports a span to for
/// each message each plugin handles (see [`crate::traces`]). Read at start;
/// a change takes a restart.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracesConfig {
    /// The collector's OTLP/HTTP address, such as `http://127.0.0.1:4318`
    /// (`/v1/traces` is added when it has no path).
    pub endpoint: String,
    /// The `service.name` the spans carry.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

pub(super) fn default_service_name() -> String {
    "mqplug".into()
}
