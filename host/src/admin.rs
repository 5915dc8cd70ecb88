//! The admin HTTP listener: `/healthz`, `/readyz`, `/plugins`, `/metrics`.
//!
//! hyper's HTTP/1.1 server, one request per connection (no keep-alive), with
//! bounds a busy or hostile network cannot push past: a request head of at
//! most 8 KiB within 5 s, a response written within 10 s of its request,
//! at most `admin.max_connections` connections at once (the oldest one still
//! waiting for its request gives way to a new one), and a growing pause
//! after a failed `accept` (out of descriptors), so the listener neither
//! spins nor starves the broker client of descriptors.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, RECENT_WINDOW, render_gauges};
use crate::slot::{PluginSlot, SlotState};
use crate::wasm::PoolUsage;

/// The request line and headers, together.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// From accepting a connection to having its whole request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// From the request head to the last byte of the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The bounds one listener keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
}

impl Limits {
    pub fn new(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            read_timeout: READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
        }
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the admin endpoints read.
pub trait AdminView: Send + Sync + 'static {
    /// Consumers started and plugins loaded.
    fn ready(&self) -> bool;
    fn slots(&self) -> Vec<Arc<PluginSlot>>;
    fn metrics(&self) -> &Metrics;
    /// The wasm pool's live slots, read at scrape time.
    fn pool_usage(&self) -> PoolUsage;
    /// The last config reload error, if the last reload failed.
    fn config_error(&self) -> Option<String>;
    /// The state store's kind and state as its last call found it, once
    /// open.
    fn store_health(&self) -> Option<(&'static str, Result<(), String>)> {
        None
    }
    /// Messages waiting in each plugin's consumer group (the broker's
    /// offsets against the group's), by plugin, as last read.
    fn lag(&self) -> std::collections::BTreeMap<String, u64> {
        Default::default()
    }
    /// A plugin's handled count and lag at each of the last probes, oldest
    /// first.
    fn history(&self, _plugin: &str) -> Vec<Sample> {
        Vec::new()
    }
    /// Plugins in the config that serve no build, and why.
    fn not_serving(&self) -> Vec<NotServing> {
        Vec::new()
    }
    /// Whether the name server answers and the brokers holding the topic
    /// take connections, as last probed; `None` before the first probe.
    fn broker_health(&self) -> Option<Result<(), String>> {
        None
    }
    /// What is wrong with the cluster while the host is still ready: a
    /// broker that does not answer while others do, a topic not created yet.
    fn broker_notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// One point of a plugin's chart on the status page.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: std::time::SystemTime,
    /// Messages handled so far, every outcome.
    pub handled: u64,
    /// Messages waiting in its group, if it could be read.
    pub lag: Option<u64>,
}

/// A plugin in the config that serves no build: loading it or starting its
/// consumer failed when the config added or changed it.
#[derive(Debug, Clone)]
pub struct NotServing {
    pub name: String,
    pub path: std::path::PathBuf,
    pub group: String,
    pub error: String,
    pub since: std::time::SystemTime,
}

/// Why the host is not ready, one line a reason; empty when it is.
/// Everything in them a plugin or a config controls is made inert.
pub fn not_ready(view: &dyn AdminView) -> Vec<String> {
    let mut reasons = Vec::new();
    if !view.ready() {
        reasons.push("starting or stopping".to_string());
    }
    if let Some(Err(why)) = view.broker_health() {
        reasons.push(format!("broker: {}", crate::text::inert(&why, 1024)));
    }
    // Plugins' calls to a store that is down fail.
    if let Some((kind, Err(why))) = view.store_health() {
        reasons.push(format!(
            "store {kind}: unavailable: {}",
            crate::text::inert(&why, 1024)
        ));
    }
    for plugin in view.not_serving() {
        reasons.push(format!(
            "plugin {}: not serving: {}",
            crate::text::inert(&plugin.name, 256),
            crate::text::inert(&plugin.error, 1024)
        ));
    }
    reasons
}

/// One open connection, as the cap sees it.
struct Conn {
    id: u64,
    /// Its request head has arrived: it is being answered.
    answering: AtomicBool,
    /// Told to close to make room for a newer connection.
    evict: Notify,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Conns {
    open: Mutex<VecDeque<Arc<Conn>>>,
    next_id: AtomicU64,
}

impl Conns {
    /// Registers a new connection; at `cap`, first makes room by evicting
    /// the oldest one still waiting for its request. `None` when every open
    /// connection is being answered: the new one is turned away.
    fn admit(&self, cap: usize) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= cap {
            let idle = open
                .iter()
                .position(|conn| !conn.answering.load(Ordering::Acquire))?;
            let evicted = open.remove(idle).expect("position is in range");
            evicted.evict.notify_one();
        }
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            answering: AtomicBool::new(false),
            evict: Notify::new(),
        });
        open.push_back(conn.clone());
        Some(conn)
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = open.iter().position(|conn| conn.id == id) {
            open.remove(at);
        }
    }
}

/// Where connections come from: a TCP listener, or a test's stand-in.
trait Acceptor: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, SocketAddr)>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = tokio::net::TcpStream;
    fn accept(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

/// Binds `listen` and serves until `stop` turns true.
pub async fn serve(
    listen: &str,
    limits: Limits,
    view: Arc<dyn AdminView>,
    stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    info!(
        %addr,
        max_connections = limits.max_connections,
        "admin listening: /healthz /readyz /plugins /metrics"
    );
    let task = tokio::spawn(accept_loop(listener, limits, view, stop));
    Ok((addr, task))
}

async fn accept_loop<A: Acceptor>(
    mut listener: A,
    limits: Limits,
    view: Arc<dyn AdminView>,
    mut stop: watch::Receiver<bool>,
) {
    let conns = Arc::new(Conns::default());
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(err) => {
                // Typically out of descriptors: retrying at once would
                // spin. Pause, longer each time, until one succeeds.
                warn!(
                    pause_ms = backoff.as_millis() as u64,
                    "admin accept failed: {err}"
                );
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Some(conn) = conns.admit(limits.max_connections) else {
            debug!(%peer, "admin connection refused: every connection is being answered");
            continue;
        };
        tokio::spawn(connection(
            stream,
            peer,
            limits,
            conn,
            conns.clone(),
            view.clone(),
        ));
    }
}

async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    limits: Limits,
    conn: Arc<Conn>,
    conns: Arc<Conns>,
    view: Arc<dyn AdminView>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // When the request head arrived: the response's last byte is due
    // `write_timeout` later, however long building the response took.
    let (answering, mut answer_due) = watch::channel(None::<tokio::time::Instant>);
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            conn.answering.store(true, Ordering::Release);
            answering.send_replace(Some(tokio::time::Instant::now() + limits.write_timeout));
            let response = respond(&request, view.as_ref());
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let serving = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_header_size(MAX_REQUEST_HEAD)
        .max_headers(64)
        .keep_alive(false)
        // A client that closes its sending side after the request still
        // gets its answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service);
    // The deadline and the cap first: nothing more is written once either
    // has closed the connection.
    tokio::select! {
        biased;
        _ = async {
            match answer_due.wait_for(Option::is_some).await.ok().and_then(|due| *due) {
                Some(due) => tokio::time::sleep_until(due).await,
                // The service is gone with the connection: nothing to time.
                None => std::future::pending().await,
            }
        } => {
            debug!(%peer, "admin response not taken within {:?}: connection closed", limits.write_timeout);
        }
        _ = conn.evict.notified() => {
            debug!(%peer, "admin connection closed before its request: the connection cap needed room");
        }
        served = serving => if let Err(err) = served {
            debug!(%peer, "admin request failed: {err}");
        },
    }
    conns.remove(conn.id);
}

/// The response to one request.
pub fn respond<B>(request: &Request<B>, view: &dyn AdminView) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let (status, content_type, body) = match *request.method() {
        Method::GET | Method::HEAD => route(path, view),
        Method::POST if canary_action(path).is_some() => {
            act_on_canary(path, request.headers(), view)
        }
        _ => (405, "text/plain", "only GET\n".to_string()),
    };
    let body = if request.method() == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if status == 405 {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// The header a canary command must carry. A page of another origin cannot
/// send it without a CORS preflight, which this listener never grants, so
/// a web page the operator visits cannot promote or abort a canary.
pub const ACTION_HEADER: &str = "x-mqplug-action";

/// `/plugins/NAME/canary/promote` or `.../abort`: the plugin (its name
/// percent-decoded) and the verb.
fn canary_action(path: &str) -> Option<(String, &str)> {
    let rest = path.strip_prefix("/plugins/")?;
    let (name, verb) = rest.rsplit_once("/canary/")?;
    let name = percent_decoded(name)?;
    (!name.is_empty() && !name.contains('/') && matches!(verb, "promote" | "abort"))
        .then_some((name, verb))
}

/// Whether a `Host` header names an IP address or localhost (with or
/// without a port), not a domain name.
fn is_address_or_localhost(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:9900
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// `%XX` escapes decoded; `None` for a broken escape or text that is not
/// UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Promotes or aborts a plugin's running canary (`POST
/// /plugins/NAME/canary/promote|abort`, with [`ACTION_HEADER`]).
fn act_on_canary(
    path: &str,
    headers: &hyper::HeaderMap,
    view: &dyn AdminView,
) -> (u16, &'static str, String) {
    let Some((name, verb)) = canary_action(path) else {
        return (404, "text/plain", "not found\n".into());
    };
    let answer =
        |status: u16, body: serde_json::Value| (status, "application/json", format!("{body}\n"));
    if !headers.contains_key(ACTION_HEADER) {
        return answer(
            403,
            json!({"error": format!("a canary command needs the {ACTION_HEADER} header")}),
        );
    }
    // A page served under another name that resolves here (DNS rebinding)
    // sends that name: commands are taken only for an address or localhost.
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .unwrap_or_default();
    if !is_address_or_localhost(host) {
        return answer(
            403,
            json!({"error": "a canary command is taken only for an address or localhost in Host"}),
        );
    }
    let Some(slot) = view.slots().into_iter().find(|slot| slot.name() == name) else {
        return answer(
            404,
            json!({"error": format!("no plugin {}", crate::text::inert(&name, 256))}),
        );
    };
    let done = match verb {
        "promote" => slot.promote().map(|version| version.to_string()),
        _ => slot.abort_canary().map(|()| slot.version().to_string()),
    };
    match done {
        Ok(serving) => answer(
            200,
            json!({
                "plugin": slot.name(),
                "canary": if verb == "promote" { "promoted" } else { "aborted" },
                "serving": serving,
            }),
        ),
        Err(why) => answer(
            409,
            json!({"error": format!("plugin {}: {why}", slot.name())}),
        ),
    }
}

pub(crate) fn route(path: &str, view: &dyn AdminView) -> (u16, &'static str, String) {
    match path {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" => {
            let reasons = not_ready(view);
            if reasons.is_empty() {
                // Still ready (every plugin serves a build), but a refused
                // reload is said here too, not only on /plugins.
                let mut body = String::from("ready\n");
                for note in view.broker_notes() {
                    body.push_str(&crate::text::inert(&note, 1024));
                    body.push('\n');
                }
                for slot in view.slots() {
                    if let SlotState::ReloadFailed { .. } = slot.status().state {
                        body.push_str(&format!(
                            "plugin {}: reload failed, its previous build serves (see /plugins)\n",
                            crate::text::inert(slot.name(), 256)
                        ));
                    }
                }
                (200, "text/plain", body)
            } else {
                let mut body = String::from("not ready\n");
                for reason in reasons {
                    body.push_str(&reason);
                    body.push('\n');
                }
                (503, "text/plain", body)
            }
        }
        "/" => (
            200,
            "text/html; charset=utf-8",
            crate::page::STATUS_PAGE.to_string(),
        ),
        "/plugins" => (200, "application/json", plugins_json(view)),
        "/metrics" => {
            let slots = view.slots();
            let versions: Vec<(String, String)> = slots
                .iter()
                .map(|slot| (slot.name().to_string(), slot.version().to_string()))
                .collect();
            let mut text = view.metrics().render(&versions);
            text.push_str(&render_gauges(&view.pool_usage()));
            let lag = view.lag();
            let groups: Vec<(String, String, u64)> = slots
                .iter()
                .filter_map(|slot| {
                    let waiting = *lag.get(slot.name())?;
                    Some((slot.name().to_string(), slot.status().group, waiting))
                })
                .collect();
            text.push_str(&crate::metrics::render_lag(&groups));
            (200, "text/plain; version=0.0.4", text)
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// A plugin's candidate build beside its current one, for `/plugins`.
fn canary_json(candidate: &crate::slot::CandidateStatus) -> serde_json::Value {
    let side = |summary: &crate::canary::Summary| {
        json!({
            "events": summary.events,
            "failures": summary.failures,
            "median_ms": summary.median.map(|median| median.as_secs_f64() * 1000.0),
            "handled": summary.handled,
            "failed": summary.failed,
        })
    };
    match &candidate.loaded {
        Err(error) => json!({
            "path": candidate.path.display().to_string(),
            "state": "failed",
            "error": error,
        }),
        Ok(build) => {
            let canary = &build.canary;
            json!({
                "path": candidate.path.display().to_string(),
                "version": build.version,
                "percent": canary.percent,
                "state": canary.state.name(),
                "reason": match &canary.state {
                    crate::canary::CanaryState::RolledBack(reason) => Some(reason.as_str()),
                    _ => None,
                },
                "started_at": chrono::DateTime::<chrono::Utc>::from(canary.started).to_rfc3339(),
                "current": side(&canary.current),
                "candidate": side(&canary.candidate),
            })
        }
    }
}

fn plugins_json(view: &dyn AdminView) -> String {
    let metrics = view.metrics();
    let lag = view.lag();
    let mut plugins: Vec<serde_json::Value> = view
        .slots()
        .iter()
        .map(|slot| {
            let status = slot.status();
            let latency = metrics.recent_latency(&status.name);
            let follow_ups = metrics.follow_ups(&status.name);
            let (state, error, failed_version) = match &status.state {
                SlotState::Serving => ("serving", None, None),
                SlotState::ReloadFailed { version, error } => {
                    ("reload-failed", Some(error.clone()), Some(version.clone()))
                }
                SlotState::Draining => ("draining", None, None),
            };
            json!({
                "name": status.name,
                "path": status.path.display().to_string(),
                "version": status.version,
                "loaded_at": chrono::DateTime::<chrono::Utc>::from(status.loaded_at).to_rfc3339(),
                "from_cache": status.from_cache,
                "group": status.group,
                "contract": status.contract,
                "config_keys": status.config_keys,
                "secret_keys": status.secret_keys,
                "state": state,
                "error": error,
                "failed_version": failed_version,
                "messages": {
                    "success": metrics.messages(&status.name, "success"),
                    "retry_later": metrics.messages(&status.name, "retry_later"),
                    "retry_after": metrics.messages(&status.name, "retry_after"),
                    "dead_letter": metrics.messages(&status.name, "dead_letter"),
                },
                "failures": metrics.failures(&status.name),
                "lag": lag.get(&status.name).copied(),
                "history": view.history(&status.name).iter().map(|sample| json!({
                    "at": sample.at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                    "handled": sample.handled,
                    "lag": sample.lag,
                })).collect::<Vec<_>>(),
                "follow_ups": {
                    "sent": follow_ups.get("sent").copied().unwrap_or(0),
                    "failed": follow_ups.get("failed").copied().unwrap_or(0),
                },
                "latency_ms": {
                    "window_s": RECENT_WINDOW.as_secs(),
                    "events": latency.events,
                    "p50": latency.p50.as_secs_f64() * 1000.0,
                    "p99": latency.p99.as_secs_f64() * 1000.0,
                },
                "canary": status.canary.as_ref().map(canary_json),
                "reloads": metrics.reloads(&status.name).iter().map(|load| json!({
                    "at": chrono::DateTime::<chrono::Utc>::from(load.at).to_rfc3339(),
                    "version": load.version,
                    "from_cache": load.from_cache,
                    "result": if load.result.is_ok() { "ok" } else { "failed" },
                    "error": load.result.as_ref().err(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    // Listed with the rest, so a plugin the config names never goes missing.
    plugins.extend(view.not_serving().into_iter().map(|plugin| {
        json!({
            "name": plugin.name,
            "path": plugin.path.display().to_string(),
            "group": plugin.group,
            "state": "failed",
            "error": plugin.error,
            "since": chrono::DateTime::<chrono::Utc>::from(plugin.since).to_rfc3339(),
        })
    }));
    let not_ready = not_ready(view);
    let mut text = serde_json::to_string_pretty(&json!({
        "ready": not_ready.is_empty(),
        "not_ready": not_ready,
        "broker": view.broker_health().map(|health| json!({
            "available": health.is_ok(),
            "error": health.err(),
            "notes": view.broker_notes(),
        })),
        "config_error": view.config_error(),
        "store": view.store_health().map(|(kind, health)| json!({
            "kind": kind,
            "available": health.is_ok(),
            "error": health.err(),
        })),
        "plugins": plugins,
    }))
    .expect("JSON values serialize");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// A view with no plugins; `config_error` makes `/plugins` as large as
    /// a test needs.
    struct Stub {
        metrics: Arc<Metrics>,
        config_error: Option<String>,
        store: Option<(&'static str, Result<(), String>)>,
    }

    impl Stub {
        fn view(config_error: Option<String>) -> Arc<dyn AdminView> {
            Arc::new(Stub {
                metrics: Metrics::new(),
                config_error,
                store: None,
            })
        }
    }

    impl AdminView for Stub {
        fn ready(&self) -> bool {
            true
        }
        fn slots(&self) -> Vec<Arc<PluginSlot>> {
            Vec::new()
        }
        fn metrics(&self) -> &Metrics {
            &self.metrics
        }
        fn pool_usage(&self) -> PoolUsage {
            PoolUsage {
                component_instances: 0,
                core_instances: 0,
                memories: 0,
                tables: 0,
                max_component_instances: 1,
            }
        }
        fn config_error(&self) -> Option<String> {
            self.config_error.clone()
        }
        fn store_health(&self) -> Option<(&'static str, Result<(), String>)> {
            self.store.clone()
        }
    }

    #[test]
    fn readiness_and_plugins_say_when_the_state_store_is_down_and_why() {
        let view = Stub {
            metrics: Metrics::new(),
            config_error: None,
            store: Some(("redis", Err("Connection refused\n(os error 111)".into()))),
        };
        let (status, _, body) = route("/readyz", &view);
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "not ready\nstore redis: unavailable: Connection refused\\n(os error 111)\n"
        );
        let (_, _, plugins) = route("/plugins", &view);
        let plugins: serde_json::Value = serde_json::from_str(&plugins).unwrap();
        assert_eq!(plugins["store"]["kind"], "redis");
        assert_eq!(plugins["store"]["available"], false);
        let (status, _, _) = route("/readyz", &*Stub::view(None));
        assert_eq!(status, 200);
    }

    /// Ends a test that would otherwise hang on a bug; not a measurement.
    const HANG_GUARD: Duration = Duration::from_secs(60);

    async fn start(limits: Limits, view: Arc<dyn AdminView>) -> (SocketAddr, watch::Sender<bool>) {
        let (stop, stopped) = watch::channel(false);
        let (addr, _task) = serve("127.0.0.1:0", limits, view, stopped).await.unwrap();
        (addr, stop)
    }

    /// GET `path`: (status, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, body.to_string())
    }

    /// Whether the server has closed `stream` (it reads end of file).
    fn closed_by_server(stream: &TcpStream) -> bool {
        let mut byte = [0u8; 1];
        match stream.try_read(&mut byte) {
            Ok(read) => read == 0,
            Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thousands_of_idle_connections_give_way_and_healthz_answers() {
        // Timeouts far beyond the test: only the cap can close anything.
        let limits = Limits {
            max_connections: 16,
            read_timeout: Duration::from_secs(3600),
            write_timeout: Duration::from_secs(3600),
        };
        let (addr, _stop) = start(limits, Stub::view(None)).await;
        // Far past the cap however few descriptors the machine allows.
        let idle_connections = mqplug_tests::open_files_allowed(2000);
        assert!(idle_connections > 4 * limits.max_connections);
        let mut idle = Vec::with_capacity(idle_connections);
        for _ in 0..idle_connections {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let (status, body) = tokio::time::timeout(HANG_GUARD, get(addr, "/healthz"))
            .await
            .expect("/healthz answers behind the idle connections");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        // The server keeps at most the cap open: every older idle
        // connection was closed to make room.
        let held = tokio::time::timeout(HANG_GUARD, async {
            loop {
                let open = idle.iter().filter(|s| !closed_by_server(s)).count();
                if open < limits.max_connections {
                    return open;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the idle connections past the cap are closed");
        assert!(held < limits.max_connections, "{held} still open");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_finishes_its_request_is_cut_off_at_the_read_timeout() {
        let limits = Limits {
            max_connections: 16,
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_secs(3600),
        };
        let (addr, _stop) = start(limits, Stub::view(None)).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: te")
            .await
            .unwrap();
        assert_eq!(get(addr, "/healthz").await.0, 200, "others are answered");
        let mut rest = Vec::new();
        tokio::time::timeout(HANG_GUARD, slow.read_to_end(&mut rest))
            .await
            .expect("the server closes the slow connection")
            .ok();
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "no answer to half a request: {rest}"
        );
    }

    /// Hands the accept loop the server ends of in-memory connections, so a
    /// test chooses the buffer between client and server: the kernel's
    /// socket buffers (and their autotuning) differ from machine to machine.
    struct InMemory(tokio::sync::mpsc::UnboundedReceiver<tokio::io::DuplexStream>);

    impl Acceptor for InMemory {
        type Stream = tokio::io::DuplexStream;
        async fn accept(&mut self) -> std::io::Result<(Self::Stream, SocketAddr)> {
            match self.0.recv().await {
                Some(stream) => Ok((stream, SocketAddr::from(([127, 0, 0, 1], 1)))),
                None => std::future::pending().await,
            }
        }
    }

    /// What the client and server ends of one in-memory connection hold
    /// between them.
    const PIPE_BYTES: usize = 64 * 1024;

    /// Serves in-memory connections; `request()` opens one and sends a GET.
    struct InMemoryServer {
        connections: tokio::sync::mpsc::UnboundedSender<tokio::io::DuplexStream>,
        _stop: watch::Sender<bool>,
    }

    impl InMemoryServer {
        fn start(limits: Limits, view: Arc<dyn AdminView>) -> InMemoryServer {
            let (connections, accepted) = tokio::sync::mpsc::unbounded_channel();
            let (stop, stopped) = watch::channel(false);
            tokio::spawn(accept_loop(InMemory(accepted), limits, view, stopped));
            InMemoryServer {
                connections,
                _stop: stop,
            }
        }

        async fn request(&self, path: &str) -> tokio::io::DuplexStream {
            let (mut client, server) = tokio::io::duplex(PIPE_BYTES);
            self.connections.send(server).unwrap();
            client
                .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
                .await
                .unwrap();
            client
        }
    }

    async fn read_all(mut client: tokio::io::DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(HANG_GUARD, client.read_to_end(&mut got))
            .await
            .expect("the server closed the connection")
            .unwrap();
        got
    }

    // Paused time: the client's wait and the server's timeout are the
    // runtime's clock, not the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_response_is_cut_off_at_the_write_timeout() {
        let limits = Limits {
            max_connections: 16,
            read_timeout: Duration::from_secs(3600),
            write_timeout: Duration::from_millis(300),
        };
        // A response far larger than the pipe holds.
        let view = Stub::view(Some("x".repeat(16 * PIPE_BYTES)));
        let server = InMemoryServer::start(limits, view);

        // A client that reads at once gets the whole response: the pipe
        // alone cuts nothing.
        let whole = read_all(server.request("/plugins").await).await;
        assert!(whole.starts_with(b"HTTP/1.1 200"));
        assert!(whole.len() > 16 * PIPE_BYTES, "{} bytes", whole.len());

        // The slow client: it reads nothing for four times the timeout.
        let slow = server.request("/plugins").await;
        tokio::time::sleep(limits.write_timeout * 4).await;
        let healthz = read_all(server.request("/healthz").await).await;
        assert!(healthz.starts_with(b"HTTP/1.1 200"), "others are answered");
        let got = read_all(slow).await;
        assert!(got.starts_with(b"HTTP/1.1 200"));
        assert!(
            got.len() <= PIPE_BYTES,
            "the response was cut off at the timeout: {} of {} bytes arrived, \
             the pipe holds {PIPE_BYTES}",
            got.len(),
            whole.len()
        );
    }

    /// A view that takes `build` to make `/plugins`, as a host with a huge
    /// config error on a slow machine does.
    struct SlowToBuild {
        view: Arc<dyn AdminView>,
        build: Duration,
    }

    impl AdminView for SlowToBuild {
        fn ready(&self) -> bool {
            true
        }
        fn slots(&self) -> Vec<Arc<PluginSlot>> {
            Vec::new()
        }
        fn metrics(&self) -> &Metrics {
            self.view.metrics()
        }
        fn pool_usage(&self) -> PoolUsage {
            self.view.pool_usage()
        }
        fn config_error(&self) -> Option<String> {
            std::thread::sleep(self.build);
            self.view.config_error()
        }
    }

    // One thread: the client reads only when the server waits, so what the
    // server writes past its deadline is what the client gets, whatever
    // the machine's speed.
    #[tokio::test]
    async fn the_write_timeout_counts_from_the_request_head_not_from_the_built_response() {
        let limits = Limits {
            max_connections: 16,
            read_timeout: Duration::from_secs(3600),
            write_timeout: Duration::from_millis(100),
        };
        let view = Arc::new(SlowToBuild {
            view: Stub::view(Some("x".repeat(16 * PIPE_BYTES))),
            build: limits.write_timeout * 3,
        });
        let server = InMemoryServer::start(limits, view);
        // A client that reads at once: the deadline passed while the
        // response was built, so no more than the pipe holds goes out.
        let got = read_all(server.request("/plugins").await).await;
        assert!(
            got.len() <= PIPE_BYTES,
            "{} bytes sent after the deadline, the pipe holds {PIPE_BYTES}",
            got.len()
        );
    }

    /// Fails its first `FAILS` accepts, as a listener out of descriptors
    /// does, then waits forever (so a loop that spins stops spinning, and
    /// paused time can move on).
    struct Failing(Arc<AtomicUsize>);

    const FAILS: usize = 12;

    impl Acceptor for Failing {
        type Stream = tokio::io::DuplexStream;
        fn accept(
            &mut self,
        ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, SocketAddr)>> + Send
        {
            let call = self.0.fetch_add(1, Ordering::SeqCst);
            async move {
                if call < FAILS {
                    Err(std::io::Error::other("too many open files"))
                } else {
                    std::future::pending().await
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_accepts_pause_longer_each_time_instead_of_spinning() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(accept_loop(
            Failing(calls.clone()),
            Limits::new(4),
            Stub::view(None),
            stopped,
        ));
        while calls.load(Ordering::SeqCst) <= FAILS {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Paused time: the pauses the loop took, not a measurement.
        let paused = started.elapsed();
        let expected: Duration = (0..FAILS as u32)
            .map(|i| (ACCEPT_BACKOFF_MIN * 2u32.pow(i)).min(ACCEPT_BACKOFF_MAX))
            .sum();
        assert!(
            paused >= expected,
            "{FAILS} failed accepts paused {paused:?}, expected {expected:?}"
        );
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn a_canary_command_needs_the_action_header_and_a_plugin_by_its_decoded_name() {
        let view = Stub::view(None);
        let post = |path: &str, header: bool| {
            let mut request = Request::post(path).header(header::HOST, "127.0.0.1:9900");
            if header {
                request = request.header(ACTION_HEADER, "promote");
            }
            respond(&request.body(()).unwrap(), view.as_ref()).status()
        };
        // A name that is not an address: DNS rebinding, refused.
        let rebound = Request::post("/plugins/rewards/canary/promote")
            .header(header::HOST, "attacker.example:9900")
            .header(ACTION_HEADER, "promote")
            .body(())
            .unwrap();
        assert_eq!(respond(&rebound, view.as_ref()).status(), 403);
        for host in ["localhost:9900", "[::1]:9900", "10.0.0.5", "LOCALHOST"] {
            assert!(is_address_or_localhost(host), "{host}");
        }
        assert_eq!(post("/plugins/rewards/canary/promote", false), 403);
        assert_eq!(post("/plugins/rewards/canary/promote", true), 404);
        assert_eq!(post("/plugins/rewards/canary/restart", true), 405);
        assert_eq!(post("/plugins/a/b/canary/abort", true), 405);
        assert_eq!(
            canary_action("/plugins/a%7Cb/canary/abort"),
            Some(("a|b".to_string(), "abort"))
        );
        assert_eq!(canary_action("/plugins/a%7/canary/abort"), None);
    }

    #[test]
    fn only_get_and_head_are_served_and_head_has_no_body() {
        let view = Stub::view(None);
        let post = respond(&Request::post("/healthz").body(()).unwrap(), view.as_ref());
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        let head = respond(&Request::head("/healthz").body(()).unwrap(), view.as_ref());
        assert_eq!(head.status(), 200);
        assert_eq!(http_body::Body::size_hint(head.body()).exact(), Some(0));
        let missing = respond(&Request::get("/nope").body(()).unwrap(), view.as_ref());
        assert_eq!(missing.status(), 404);
    }

    #[test]
    fn the_cap_evicts_the_oldest_waiting_connection_and_refuses_when_all_are_answering() {
        let conns = Conns::default();
        let first = conns.admit(2).unwrap();
        let second = conns.admit(2).unwrap();
        second.answering.store(true, Ordering::SeqCst);
        let third = conns.admit(2).expect("the waiting one gives way");
        assert!(
            futures_ready(first.evict.notified()),
            "the oldest waiting connection is told to close"
        );
        third.answering.store(true, Ordering::SeqCst);
        assert!(conns.admit(2).is_none(), "both are being answered");
        conns.remove(second.id);
        assert!(conns.admit(2).is_some(), "a closed one frees its place");
    }

    /// Whether a `Notified` completes without waiting.
    fn futures_ready(notified: tokio::sync::futures::Notified<'_>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().poll(&mut cx).is_ready()
    }

    /// Runs one request's bytes through the admin connection over an
    /// in-memory pipe: the response's status, if one came.
    fn exchange(runtime: &tokio::runtime::Runtime, request: &[u8]) -> Option<u16> {
        runtime.block_on(async {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let conns = Arc::new(Conns::default());
            let conn = conns.admit(1).unwrap();
            let serving = tokio::spawn(connection(
                server,
                "127.0.0.1:1".parse().unwrap(),
                Limits::new(1),
                conn,
                conns,
                Stub::view(None),
            ));
            let _ = client.write_all(request).await;
            let _ = client.shutdown().await;
            let mut response = Vec::new();
            let _ = client.read_to_end(&mut response).await;
            serving.await.expect("the connection task does not panic");
            let response = String::from_utf8_lossy(&response);
            let status = response.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok();
            assert!(status.is_some(), "a status line or nothing: {response}");
            status
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    const VALID: &[u8] = b"GET /metrics?x=1 HTTP/1.1\r\nhost: test\r\naccept: */*\r\n\r\n";

    #[test]
    fn the_fuzz_harness_gets_answers_to_well_formed_requests() {
        let runtime = runtime();
        assert_eq!(exchange(&runtime, VALID), Some(200));
        assert_eq!(
            exchange(&runtime, b"DELETE / HTTP/1.1\r\nhost: t\r\n\r\n"),
            Some(405)
        );
        let huge = format!(
            "GET / HTTP/1.1\r\nx: {}\r\n\r\n",
            "y".repeat(MAX_REQUEST_HEAD)
        );
        assert_eq!(exchange(&runtime, huge.as_bytes()), Some(431));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

        #[test]
        fn arbitrary_bytes_get_a_bounded_answer_or_none(
            request in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            thread_local!(static RUNTIME: tokio::runtime::Runtime = runtime());
            RUNTIME.with(|runtime| exchange(runtime, &request));
        }

        #[test]
        fn near_misses_of_a_valid_request_get_a_bounded_answer_or_none(
            position in any::<usize>(), byte in any::<u8>(), cut in any::<bool>(),
        ) {
            let request = crate::mutated(VALID, position, byte, cut);
            thread_local!(static RUNTIME: tokio::runtime::Runtime = runtime());
            if let Some(status) = RUNTIME.with(|runtime| exchange(runtime, &request)) {
                prop_assert!([200, 400, 404, 405, 431, 505].contains(&status), "{status}");
            }
        }

        #[test]
        fn any_path_is_routed_without_panicking(path in "/[\\x21-\\x7e]{0,200}") {
            let request = format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n");
            thread_local!(static RUNTIME: tokio::runtime::Runtime = runtime());
            RUNTIME.with(|runtime| exchange(runtime, request.as_bytes()));
        }
    }
}
