//! Recorded failures: for a plugin whose entry asks for it
//! (`[plugin.record_failures]`), each event it fails is written down with
//! what the plugin saw (the event and delivery, the config keys it read,
//! its HTTP exchanges, its key-value reads, the follow-ups it had put in
//! its outbox), bounded on disk, secrets never. `mqplug dlq export` turns
//! one into a kit fixture that replays the failure with no broker, no
//! network and no store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::PluginConfig;
use crate::delivery::Delivery;
use crate::event::TaskEvent;
use crate::outcome::{Disposition, HandlerFailure, HandlerOutcome};
use crate::wasm::{ConfigValues, OutgoingMessage, Seen};

/// `[plugin.record_failures]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordFailuresConfig {
    /// Where recordings go (a folder per plugin inside); relative paths are
    /// relative to the config file.
    pub dir: PathBuf,
    /// The most the plugin's recordings take on disk; the oldest go first.
    #[serde(default = "default_max_mb")]
    pub max_mb: u64,
}

fn default_max_mb() -> u64 {
    16
}

/// The largest `max_mb`.
pub const MAX_RECORDED_MB: u64 = 4096;

impl RecordFailuresConfig {
    pub fn problem(&self) -> Option<String> {
        (!(1..=MAX_RECORDED_MB).contains(&self.max_mb)).then(|| {
            format!(
                "record_failures.max_mb is {}; it must be 1 to {MAX_RECORDED_MB}",
                self.max_mb
            )
        })
    }
}

/// One failed event, as written down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recording {
    pub plugin: String,
    /// The build that failed it.
    pub version: String,
    pub recorded_at: String,
    /// `retry`, `retry-after`, `dead-letter`, or the host's word for a trap,
    /// a deadline, a memory limit.
    pub outcome: String,
    pub reason: String,
    pub event: TaskEvent,
    pub delivery: RecordedDelivery,
    pub seen: Seen,
    pub follow_ups: Vec<RecordedMessage>,
}

/// The delivery fields a fixture takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedDelivery {
    pub message_id: String,
    pub topic: String,
    pub tags: Option<String>,
    pub keys: Vec<String>,
    pub reconsume_times: u32,
    pub queue_id: u32,
    pub queue_offset: i64,
    pub born_timestamp: i64,
}

/// A follow-up the handler had put in its outbox (not sent: it failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedMessage {
    pub topic: String,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub body: String,
}

/// The longest follow-up body a recording keeps.
const MAX_FOLLOW_UP_BODY: usize = 16 * 1024;

impl Recording {
    /// The recording of a failed call; `None` for an accepted one.
    pub fn of(
        plugin: &str,
        version: &str,
        event: &TaskEvent,
        delivery: &Delivery,
        outcome: &HandlerOutcome,
        (seen, outbox): (Seen, Vec<OutgoingMessage>),
        secrets: &ConfigValues,
    ) -> Option<Recording> {
        let (word, reason) = match outcome {
            HandlerOutcome::Accepted => return None,
            HandlerOutcome::Rejected {
                reason,
                disposition,
            } => (
                match disposition {
                    Disposition::Retry => "retry",
                    Disposition::RetryAfter(_) => "retry-after",
                    Disposition::DeadLetter => "dead-letter",
                }
                .to_string(),
                reason.clone(),
            ),
            HandlerOutcome::Failed(failure) => (
                match failure {
                    HandlerFailure::Trap { .. } => "trap",
                    HandlerFailure::Deadline { .. } => "deadline",
                    HandlerFailure::MemoryLimit { .. } => "memory-limit",
                    HandlerFailure::OutOfFuel { .. } => "out-of-fuel",
                    HandlerFailure::Host { .. } => "host-failure",
                }
                .to_string(),
                failure.to_string(),
            ),
        };
        let mut recording = Recording {
            plugin: plugin.to_string(),
            version: version.to_string(),
            recorded_at: chrono::Utc::now().to_rfc3339(),
            outcome: word,
            reason,
            event: event.clone(),
            delivery: RecordedDelivery {
                message_id: delivery.message_id.clone(),
                topic: delivery.topic.clone(),
                tags: delivery.tags.clone(),
                keys: delivery.keys.clone(),
                reconsume_times: delivery.reconsume_times,
                queue_id: delivery.queue_id,
                queue_offset: delivery.queue_offset,
                born_timestamp: delivery.born_timestamp,
            },
            seen,
            follow_ups: outbox
                .into_iter()
                .map(|message| RecordedMessage {
                    topic: message.topic.configured().to_string(),
                    tag: message.tag,
                    keys: message.keys,
                    body: String::from_utf8_lossy(
                        &message.body[..message.body.len().min(MAX_FOLLOW_UP_BODY)],
                    )
                    .into_owned(),
                })
                .collect(),
        };
        recording.redact(secrets);
        Some(recording)
    }

    /// Every text the plugin or a service controls, with the plugin's
    /// secret values blanked, as they are or encoded for a URL or JSON: a
    /// secret never reaches the disk. A URL's user and password go too.
    fn redact(&mut self, secrets: &ConfigValues) {
        let blank = |text: &mut String| *text = secrets.redact_every_form(std::mem::take(text));
        blank(&mut self.reason);
        for exchange in &mut self.seen.http {
            exchange.url = strip_userinfo(&exchange.url);
            blank(&mut exchange.url);
            blank(&mut exchange.body);
            for (name, value) in &mut exchange.headers {
                blank(name);
                blank(value);
            }
            if let Some(error) = &mut exchange.error {
                blank(error);
            }
        }
        for read in &mut self.seen.kv {
            blank(&mut read.bucket);
            blank(&mut read.key);
            if let Some(value) = &mut read.value {
                blank(value);
            }
        }
        for message in &mut self.follow_ups {
            blank(&mut message.body);
            for key in &mut message.keys {
                blank(key);
            }
            if let Some(tag) = &mut message.tag {
                blank(tag);
            }
        }
    }

    /// The kit fixture file that replays this failure: a grants line (the
    /// entry's, with placeholder secrets) and one fixture that expects
    /// `ok`, answering the requests as the services did and presetting what
    /// the plugin read from its buckets.
    pub fn fixture(&self, entry: &PluginConfig) -> String {
        // Every key the entry grants (a plugin that reads its config once
        // and keeps it read none during the failed event): the values as
        // the entry has them now, the secrets as placeholders.
        let secrets: BTreeMap<&str, String> = entry
            .secrets
            .keys()
            .chain(&self.seen.secrets)
            .map(|key| (key.as_str(), format!("recorded-placeholder-for-{key}")))
            .collect();
        let mut config: BTreeMap<&str, &str> = entry
            .config
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        config.extend(
            self.seen
                .config
                .iter()
                .filter_map(|(key, value)| Some((key.as_str(), value.as_deref()?))),
        );
        let mut grants = json!({
            "config": config,
            "secrets": secrets,
            "allowed_outbound_hosts": entry.allowed_outbound_hosts,
            "allowed_topics": entry.allowed_topics,
        });
        if let Some(key_value) = &entry.key_value {
            grants["key_value"] = json!({ "buckets": key_value.buckets });
        }
        let answers: Vec<serde_json::Value> = self
            .seen
            .http
            .iter()
            .filter_map(|exchange| {
                let status = exchange.status?;
                let headers: BTreeMap<&str, &str> = exchange
                    .headers
                    .iter()
                    .filter(|(name, _)| !is_hop_header(name))
                    .map(|(name, value)| (name.as_str(), value.as_str()))
                    .collect();
                Some(json!({
                    "method": exchange.method,
                    "url": exchange.url,
                    "status": status,
                    "headers": headers,
                    "body": exchange.body,
                }))
            })
            .collect();
        let mut kv: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
        for read in &self.seen.kv {
            // What the key held when the plugin first read it.
            if let Some(value) = &read.value {
                kv.entry(&read.bucket)
                    .or_default()
                    .entry(&read.key)
                    .or_insert(value);
            }
        }
        let fixture = json!({
            "name": format!(
                "recorded failure of message {} ({}: {})",
                self.delivery.message_id,
                self.outcome,
                crate::text::inert(&self.reason, 200)
            ),
            "event": self.event,
            "delivery": self.delivery,
            "expect": "ok",
            "http": answers,
            "kv": kv,
        });
        format!(
            "# Recorded by mqplug at {} from build {} of plugin {}: it answered {}.\n\
             # Replay: mqplug test PLUGIN.wasm --fixtures THIS_FILE. The fixture expects ok:\n\
             # it fails as the build did, and passes once a build handles the event.\n\
             {}\n{}\n",
            self.recorded_at,
            &self.version[..12.min(self.version.len())],
            self.plugin,
            self.outcome,
            json!({ "grants": grants }),
            fixture
        )
    }
}

/// Headers that describe one connection, not the answer: a replay makes
/// its own.
fn is_hop_header(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "date"
            // The body is recorded as the plugin read it; a replay sends it
            // as it is.
            | "content-encoding"
    )
}

/// One plugin's folder of recordings, bounded in size.
#[derive(Debug)]
pub struct FailureLog {
    dir: PathBuf,
    max_bytes: u64,
    /// One write (and trim) at a time: listener threads fail messages side
    /// by side.
    writing: std::sync::Mutex<()>,
}

impl FailureLog {
    pub fn new(config: &RecordFailuresConfig, plugin: &str) -> Self {
        FailureLog {
            dir: config.dir.join(file_name(plugin)),
            max_bytes: config.max_mb.saturating_mul(1024 * 1024),
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Writes `recording` (one file per message: a redelivery that fails
    /// again replaces it), then removes the oldest recordings past the
    /// bound. A recording larger than the whole bound is not written.
    /// Returns the file. Folder and files are the host user's alone.
    pub fn write(&self, recording: &Recording) -> std::io::Result<PathBuf> {
        let text = serde_json::to_vec_pretty(recording).map_err(std::io::Error::other)?;
        if text.len() as u64 > self.max_bytes {
            return Err(std::io::Error::other(format!(
                "the recording is {} bytes, over the plugin's record_failures.max_mb",
                text.len()
            )));
        }
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        private_dir(&self.dir)?;
        let path = self.path(&recording.delivery.message_id);
        let partial = path.with_extension("partial");
        private_file(&partial, &text)?;
        std::fs::rename(&partial, &path)?;
        self.trim(&path)?;
        Ok(path)
    }

    /// The recording of message `id`.
    pub fn read(&self, id: &str) -> Result<Recording, String> {
        let path = self.path(id);
        let text = std::fs::read(&path).map_err(|err| {
            format!(
                "no recorded failure of message {id} ({}: {err})",
                path.display()
            )
        })?;
        serde_json::from_slice(&text)
            .map_err(|err| format!("{} is not a recording: {err}", path.display()))
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_name(id)))
    }

    /// Removes the oldest recordings until the folder is within its bound;
    /// `keep` (the one just written) stays. A file gone meanwhile is fine.
    fn trim(&self, keep: &Path) -> std::io::Result<()> {
        let mut files = Vec::new();
        let mut total = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let Ok((path, meta)) = entry.and_then(|entry| Ok((entry.path(), entry.metadata()?)))
            else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            total += meta.len();
            files.push((meta.modified()?, meta.len(), path));
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path != keep {
                match std::fs::remove_file(&path) {
                    Ok(()) => total -= len,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => total -= len,
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(())
    }
}

/// Makes `dir` (and its parents) readable by this user alone.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes `path` afresh, readable by this user alone.
fn private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// A URL without its user and password.
fn strip_userinfo(url: &str) -> String {
    let rest_at = url.find("://").map_or(0, |at| at + 3);
    let (scheme, rest) = url.split_at(rest_at);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// `text` as a file name: letters, digits, `-` and `_` kept, anything
/// else `_`, at most 128 characters.
fn file_name(text: &str) -> String {
    text.chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
