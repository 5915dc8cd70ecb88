//! The admin HTTP listener: `/healthz`, `/readyz`, `/plugins`, `/metrics`.
//!
//! A deliberately small HTTP/1.1 server: GET only, one request per
//! connection, a request head of at most 8 KiB read within 5 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::metrics::{Metrics, render_gauges};
use crate::slot::{PluginSlot, SlotState};
use crate::wasm::PoolUsage;

const MAX_REQUEST_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

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
}

/// Binds `listen` and serves until `stop` turns true.
pub async fn serve(
    listen: &str,
    view: Arc<dyn AdminView>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    info!(%addr, "admin listening: /healthz /readyz /plugins /metrics");
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let view = view.clone();
                        tokio::spawn(async move {
                            if let Err(err) = respond(stream, view.as_ref()).await {
                                debug!(%peer, "admin request failed: {err}");
                            }
                        });
                    }
                    Err(err) => debug!("admin accept failed: {err}"),
                },
            }
        }
    });
    Ok((addr, task))
}

async fn respond(mut stream: TcpStream, view: &dyn AdminView) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = if method != "GET" {
        (405, "text/plain", "only GET\n".to_string())
    } else {
        route(path, view)
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn route(path: &str, view: &dyn AdminView) -> (u16, &'static str, String) {
    match path {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" => {
            if view.ready() {
                // Still ready (every plugin serves a build), but a refused
                // reload is said here too, not only on /plugins.
                let mut body = String::from("ready\n");
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
                (503, "text/plain", "not ready\n".into())
            }
        }
        "/plugins" => (200, "application/json", plugins_json(view)),
        "/metrics" => {
            let versions: Vec<(String, String)> = view
                .slots()
                .iter()
                .map(|slot| (slot.name().to_string(), slot.version().to_string()))
                .collect();
            let mut text = view.metrics().render(&versions);
            text.push_str(&render_gauges(&view.pool_usage()));
            (200, "text/plain; version=0.0.4", text)
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}

fn plugins_json(view: &dyn AdminView) -> String {
    let metrics = view.metrics();
    let plugins: Vec<serde_json::Value> = view
        .slots()
        .iter()
        .map(|slot| {
            let status = slot.status();
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
                "state": state,
                "error": error,
                "failed_version": failed_version,
                "messages": {
                    "success": metrics.messages(&status.name, "success"),
                    "retry_later": metrics.messages(&status.name, "retry_later"),
                },
            })
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&json!({
        "ready": view.ready(),
        "config_error": view.config_error(),
        "plugins": plugins,
    }))
    .expect("JSON values serialize");
    text.push('\n');
    text
}
