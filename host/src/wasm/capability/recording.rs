//! What a plugin saw while it handled one event, for a plugin whose entry
//! records failures (`[plugin.record_failures]`): the config keys it read
//! (a secret's value never), its HTTP exchanges (bodies bounded), its
//! key-value reads. The capabilities write to one [`Tape`] per instance;
//! the slot keeps what a failed event's tape holds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The longest response body a recording keeps.
pub const MAX_RECORDED_BODY: usize = 64 * 1024;
/// The most HTTP exchanges, key-value reads and config keys one recording
/// keeps of each; past that it says it was cut.
pub const MAX_RECORDED_ITEMS: usize = 64;

/// What one event's handler saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Config keys read and their values (`None`: the key is not there).
    pub config: BTreeMap<String, Option<String>>,
    /// Secrets read, by name only.
    pub secrets: BTreeSet<String>,
    pub http: Vec<Exchange>,
    /// Key-value reads, in order: what the store answered.
    pub kv: Vec<Read>,
    /// Whether something was left out (more than the bounds allow).
    pub cut: bool,
}

/// One HTTP request and what came back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub method: String,
    pub url: String,
    /// `None` when no response came (the error says why).
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    /// The response body as the plugin read it, as text, at most
    /// [`MAX_RECORDED_BODY`] bytes.
    pub body: String,
    pub body_cut: bool,
    pub error: Option<String>,
    /// The body's bytes as they come, made text once the event is over (so
    /// a character or a secret split between chunks stays whole).
    #[serde(skip)]
    raw: Vec<u8>,
}

/// One key-value read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    pub bucket: String,
    pub key: String,
    /// The value as text; `None` when the key was not there.
    pub value: Option<String>,
}

/// One instance's recording of the event it is handling, shared by its
/// capabilities; empty (`None` inside) unless its entry records failures.
#[derive(Debug, Clone, Default)]
pub struct Tape(Option<Arc<Mutex<Reel>>>);

/// The current event's recording, and which event it is: a response body
/// still read after its event ended writes nothing on the next one's.
#[derive(Debug, Default)]
struct Reel {
    event: u64,
    seen: Seen,
}

/// Which request of which event: what [`Tape::request`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    event: u64,
    index: usize,
}

impl Tape {
    /// A tape that records; [`Tape::default`] does not.
    pub fn recording() -> Self {
        Tape(Some(Arc::default()))
    }

    /// Empties the tape for a new event.
    pub fn start(&self) {
        if let Some(reel) = &self.0 {
            let mut reel = reel.lock().unwrap_or_else(|e| e.into_inner());
            reel.event += 1;
            reel.seen = Seen::default();
        }
    }

    /// What the tape holds now, emptying it; `None` when it does not record.
    pub fn take(&self) -> Option<Seen> {
        let reel = self.0.as_ref()?;
        let mut reel = reel.lock().unwrap_or_else(|e| e.into_inner());
        reel.event += 1;
        let mut seen = std::mem::take(&mut reel.seen);
        for exchange in &mut seen.http {
            exchange.body =
                String::from_utf8_lossy(&std::mem::take(&mut exchange.raw)).into_owned();
        }
        Some(seen)
    }

    /// Writes on the tape, if it records.
    fn note(&self, write: impl FnOnce(&mut Seen)) {
        if let Some(reel) = &self.0 {
            write(&mut reel.lock().unwrap_or_else(|e| e.into_inner()).seen);
        }
    }

    /// A config key read, with its value (never a secret's).
    pub fn config(&self, key: &str, value: Option<&str>, secret: bool) {
        self.note(|seen| {
            if seen.config.len() + seen.secrets.len() >= MAX_RECORDED_ITEMS {
                seen.cut = true;
            } else if secret {
                seen.secrets.insert(key.to_string());
            } else {
                seen.config
                    .insert(key.to_string(), value.map(str::to_string));
            }
        });
    }

    /// A key-value read and its answer.
    pub fn read(&self, bucket: &str, key: &str, value: Option<&[u8]>) {
        self.note(|seen| {
            if seen.kv.len() >= MAX_RECORDED_ITEMS {
                seen.cut = true;
                return;
            }
            let value = value.map(|value| {
                let (text, cut) = bounded_text(value);
                seen.cut |= cut;
                text
            });
            seen.kv.push(Read {
                bucket: bucket.to_string(),
                key: key.to_string(),
                value,
            });
        });
    }

    /// A request going out; where its answer goes, for [`Tape::answer`]
    /// and [`Tape::body`].
    pub fn request(&self, method: &str, url: &str) -> Option<Slot> {
        let reel = self.0.as_ref()?;
        let mut reel = reel.lock().unwrap_or_else(|e| e.into_inner());
        if reel.seen.http.len() >= MAX_RECORDED_ITEMS {
            reel.seen.cut = true;
            return None;
        }
        reel.seen.http.push(Exchange {
            method: method.to_string(),
            url: url.to_string(),
            ..Exchange::default()
        });
        Some(Slot {
            event: reel.event,
            index: reel.seen.http.len() - 1,
        })
    }

    /// The exchange at `slot`, if its event is still the current one.
    fn exchange(&self, slot: Slot, write: impl FnOnce(&mut Exchange)) {
        if let Some(reel) = &self.0 {
            let mut reel = reel.lock().unwrap_or_else(|e| e.into_inner());
            if reel.event == slot.event
                && let Some(exchange) = reel.seen.http.get_mut(slot.index)
            {
                write(exchange);
            }
        }
    }

    /// The response to the request at `slot`, or why there was none.
    pub fn answer(&self, slot: Slot, answer: Result<(u16, Vec<(String, String)>), String>) {
        self.exchange(slot, |exchange| match answer {
            Ok((status, headers)) => {
                exchange.status = Some(status);
                exchange.headers = headers;
            }
            Err(error) => exchange.error = Some(error),
        });
    }

    /// More of the response body at `slot`, as the plugin reads it.
    pub fn body(&self, slot: Slot, chunk: &[u8]) {
        self.exchange(slot, |exchange| {
            let room = MAX_RECORDED_BODY.saturating_sub(exchange.raw.len());
            exchange
                .raw
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
            exchange.body_cut |= chunk.len() > room;
        });
    }
}

/// Bytes as text (invalid UTF-8 replaced), at most [`MAX_RECORDED_BODY`]
/// bytes; whether it was cut.
fn bounded_text(bytes: &[u8]) -> (String, bool) {
    let cut = bytes.len() > MAX_RECORDED_BODY;
    (
        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_RECORDED_BODY)]).into_owned(),
        cut,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tape_that_does_not_record_keeps_nothing() {
        let tape = Tape::default();
        tape.start();
        tape.config("rewards_url", Some("http://x"), false);
        assert_eq!(tape.request("GET", "http://x"), None);
        assert_eq!(tape.take(), None);
    }

    #[test]
    fn secrets_are_kept_by_name_and_bodies_and_lists_are_bounded() {
        let tape = Tape::recording();
        tape.start();
        tape.config("rewards_url", Some("http://x"), false);
        tape.config("token", Some("s3cret"), true);
        let slot = tape.request("POST", "http://x/grants").unwrap();
        tape.answer(
            slot,
            Ok((500, vec![("content-type".into(), "text/plain".into())])),
        );
        tape.body(slot, &vec![b'a'; MAX_RECORDED_BODY - 2]);
        // A character split between two chunks stays whole.
        tape.body(slot, &"é".as_bytes()[..1]);
        tape.body(slot, &"é".as_bytes()[1..]);
        tape.body(slot, b"bc");
        for i in 0..MAX_RECORDED_ITEMS + 1 {
            tape.read("seen", &format!("k{i}"), Some(b"v"));
        }
        let seen = tape.take().unwrap();
        assert_eq!(seen.config["rewards_url"].as_deref(), Some("http://x"));
        assert!(seen.secrets.contains("token"));
        assert!(!format!("{seen:?}").contains("s3cret"));
        let exchange = &seen.http[0];
        assert_eq!(exchange.status, Some(500));
        assert_eq!(exchange.body.len(), MAX_RECORDED_BODY);
        assert!(exchange.body.ends_with('é'));
        assert!(exchange.body_cut);
        assert_eq!(seen.kv.len(), MAX_RECORDED_ITEMS);
        assert!(seen.cut);
        // Taken: the next event starts empty, and a body still read from
        // the last one writes nothing on it.
        tape.body(slot, b"late");
        assert_eq!(tape.take(), Some(Seen::default()));
    }
}
