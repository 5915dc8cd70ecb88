//! The watcher: polls the plugin files and the config file, and applies a
//! change once the file has settled.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::lifecycle::Shared;
use crate::config::{HostConfig, PluginConfig};
use crate::slot::{PluginSlot, SlotState};
use crate::wasm::Version;

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
    /// A file whose content has not been compared with what serves yet:
    /// its first settled poll reads it, and a content that differs from the
    /// build serving is loaded. That covers a file that changed while its
    /// plugin was loading at start or during a config reload.
    fn unchecked(path: &std::path::Path) -> Self {
        Watched {
            applied: None,
            seen: stamp(path),
            seen_since: Instant::now(),
        }
    }

    /// A file whose current stamp is applied (the config file at start).
    fn applied(path: &std::path::Path) -> Self {
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
pub(super) struct Watcher {
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    config_file: Option<Watched>,
    files: BTreeMap<String, Watched>,
    poll: Duration,
    settle: Duration,
}

impl Watcher {
    pub(super) fn new(shared: Arc<Shared>, config: &HostConfig) -> Self {
        Watcher {
            config_file: config.source.as_deref().map(Watched::applied),
            config_path: config.source.clone(),
            files: config
                .plugins
                .iter()
                .map(|p| (p.name.clone(), Watched::unchecked(&p.path)))
                .collect(),
            poll: Duration::from_millis(config.reload.poll_ms.max(10)),
            settle: Duration::from_millis(config.reload.settle_ms),
            shared,
        }
    }

    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) {
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
                || current.store != new.store
                || current.traces != new.traces
                || current.credentials != new.credentials
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
            .map(|p| (p.name.clone(), Watched::unchecked(&p.path)))
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
                .or_insert_with(|| Watched::unchecked(&config.path));
            let Some(stamp) = watched.settled_change(&config.path, self.settle) else {
                continue;
            };
            // Taken whatever the result: a refused build is not retried
            // until the file changes again.
            watched.applied = Some(stamp);
            let wasm = self.shared.wasm.clone();
            let observers = self.shared.observers.clone();
            // Reading, hashing and compiling take up to seconds: off the
            // async threads, and off the message path (handlers keep using
            // the current build).
            let _ = tokio::task::spawn_blocking(move || {
                if slot.promoted() {
                    info!(plugin = %config.name, path = %config.path.display(), "plugin file changed, not reloaded: its canary's candidate was promoted and serves until the entry changes");
                    return;
                }
                if unchanged(&slot, &config.path) {
                    debug!(plugin = %config.name, "plugin file touched, content unchanged: nothing to reload");
                    return;
                }
                info!(plugin = %config.name, path = %config.path.display(), "plugin file changed: reloading");
                // A refused build is reported (and shown) by the slot itself.
                let _ = slot.reload(&wasm, &config, &observers);
            })
            .await;
        }
    }
}

/// Whether `path` holds the build `slot` serves, or the build it last
/// refused: either way there is nothing new to load.
fn unchanged(slot: &PluginSlot, path: &std::path::Path) -> bool {
    let Ok(wasm) = std::fs::read(path) else {
        // Unreadable: the reload reports why.
        return false;
    };
    let digest = Version::of(&wasm).0;
    if *slot.version() == *digest {
        return true;
    }
    matches!(slot.status().state, SlotState::ReloadFailed { version, .. } if version == digest)
}
