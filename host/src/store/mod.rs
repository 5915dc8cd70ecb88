//! Plugins' durable key-value state, behind one contract with two backends:
//! an embedded database (the default: one file, nothing to start) and Redis
//! (for hosts on several machines that share a consumer group, so the host
//! that takes over a queue after a rebalance sees the same keys).
//!
//! The `wasi:keyvalue` capability (`wasm/keyvalue.rs`) depends on
//! [`Backend`], never on a backend. Keys live in a [`Namespace`]: a plugin
//! and one of its buckets, so one plugin never reads another's. Every
//! backend keeps, per plugin, the bytes its keys and values take (expired
//! keys included until they are swept) and refuses a write that would take
//! it past the plugin's quota.

use std::time::Duration;

pub mod embedded;
pub mod inspect;
pub mod redis;

pub use embedded::Embedded;
pub use redis::RedisStore;

/// Keys listed per `list-keys` page.
pub const LIST_PAGE: usize = 100;

/// A plugin's bucket: where a key lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace {
    pub plugin: String,
    pub bucket: String,
}

impl Namespace {
    pub fn new(plugin: impl Into<String>, bucket: impl Into<String>) -> Self {
        Namespace {
            plugin: plugin.into(),
            bucket: bucket.into(),
        }
    }
}

/// How a write is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Set the key, replacing any value.
    Set,
    /// Set the key only if nobody holds it (absent or expired).
    Claim,
}

/// The result of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The value was stored.
    Stored,
    /// A claim found the key held; its value, unchanged.
    Held(Vec<u8>),
}

/// Why a store operation failed. The guest sees the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "quota: the plugin's keys and values would take {would_be} bytes, over its limit of {limit} bytes"
    )]
    Quota { limit: u64, would_be: u64 },
    #[error("the value is not a counter (increment needs a decimal integer)")]
    NotACounter,
    #[error("the counter would overflow")]
    Overflow,
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// Another process has the embedded store open: a running host, most
    /// likely (redb allows one process at a time).
    #[error("the store is in use by another process, a running mqplug host most likely: {0}")]
    InUse(String),
    #[error("the store failed: {0}")]
    Failed(String),
}

thread_local! {
    /// When the store call running on this thread must end (see [`within`]).
    static CALL_DEADLINE: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Runs `f`, a store call made for a message, so that every wait it makes
/// on the store (connecting, sending, reading the answer) ends by
/// `deadline`, the event's, even if the store's own timeout is longer:
/// a slow store cannot hold a handler past its deadline once a call has
/// started. The deadline is thread-local: calls block the handler's thread,
/// and the backend reads it through [`wait_limit`].
pub fn within<T>(deadline: Option<std::time::Instant>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<std::time::Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CALL_DEADLINE.with(|cell| cell.set(self.0));
        }
    }
    let _restore = Restore(CALL_DEADLINE.with(|cell| cell.replace(deadline)));
    f()
}

/// How long one wait on the store may last now: `limit`, the backend's own
/// timeout, or less when the call's deadline ([`within`]) is nearer; `Ok`
/// with `true` when the deadline set it. An error once the deadline has
/// passed.
pub(crate) fn wait_limit(limit: Duration) -> Result<(Duration, bool), StoreError> {
    match CALL_DEADLINE.with(std::cell::Cell::get) {
        None => Ok((limit, false)),
        Some(deadline) => {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                Err(StoreError::Unavailable(DEADLINE_CAME.into()))
            } else if left < limit {
                Ok((left, true))
            } else {
                Ok((limit, false))
            }
        }
    }
}

/// What a call the event's deadline ended says.
pub(crate) const DEADLINE_CAME: &str = "the event's deadline came while waiting for the store";

/// What every backend does. Calls block (plugins call them from the
/// handler's thread) and are bounded by the backend's own timeouts, and by
/// the event's deadline when made [`within`] it.
pub trait Backend: Send + Sync + 'static {
    /// `embedded`, `memory` or `redis`, for logs and metrics.
    fn kind(&self) -> &'static str;

    fn get(&self, ns: &Namespace, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores `value` under `key` (for [`Write::Claim`], only if nobody
    /// holds it), expiring after `ttl` if given, unless the plugin's keys
    /// and values would then take more than `quota` bytes.
    fn write(
        &self,
        ns: &Namespace,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        how: Write,
        quota: u64,
    ) -> Result<Written, StoreError>;

    fn delete(&self, ns: &Namespace, key: &str) -> Result<(), StoreError>;

    /// Deletes `key` only if its value is `expected` (expired or not), and
    /// says whether it did; atomic, like a claim.
    fn delete_if(&self, ns: &Namespace, key: &str, expected: &[u8]) -> Result<bool, StoreError>;

    fn exists(&self, ns: &Namespace, key: &str) -> Result<bool, StoreError> {
        self.get(ns, key).map(|value| value.is_some())
    }

    /// A page of the bucket's keys from `cursor` (`None`: the first), and
    /// the cursor of the next page if there is one.
    fn list_keys(
        &self,
        ns: &Namespace,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), StoreError>;

    /// Adds `delta` to the decimal counter under `key` (absent is 0), and
    /// returns the new value. An expiring key keeps its expiry.
    fn increment(
        &self,
        ns: &Namespace,
        key: &str,
        delta: u64,
        quota: u64,
    ) -> Result<u64, StoreError>;

    /// Bytes the plugin's keys and values take now.
    fn usage(&self, plugin: &str) -> Result<u64, StoreError>;

    /// The store as the last call found it: `Err` with why when it was
    /// unavailable. No I/O: `/readyz` reads it.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A backend's last-seen state, for [`Backend::health`].
#[derive(Debug, Default)]
pub(crate) struct Health(std::sync::Mutex<Option<String>>);

impl Health {
    pub(crate) fn get(&self) -> Result<(), String> {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Records what a call found: up unless it was unavailable.
    pub(crate) fn saw<T>(&self, result: &Result<T, StoreError>) {
        let seen = match result {
            Err(StoreError::Unavailable(why)) if why != DEADLINE_CAME => Some(why.clone()),
            Err(StoreError::Unavailable(_)) => return,
            _ => None,
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = seen;
    }
}

/// What a store keeps for each entry besides its names and value, in
/// bytes: Redis's key object and dictionary entry and mqplug's key prefix
/// (measured: 122 bytes for an entry of 1 byte under a 20-byte name);
/// redb's B-tree cell.
pub const ENTRY_OVERHEAD: u64 = 128;

/// The bytes an entry's name counts: plugin, bucket and key names, and
/// [`ENTRY_OVERHEAD`].
pub fn key_charge(ns: &Namespace, key: &str) -> u64 {
    names_charge(ns.plugin.len() + ns.bucket.len() + key.len())
}

/// [`key_charge`] from the names' length.
pub(crate) fn names_charge(names_len: usize) -> u64 {
    names_len as u64 + ENTRY_OVERHEAD
}

/// The bytes one entry counts against its plugin's quota: what the store
/// really holds for it, not only its key and value. Its name's charge
/// ([`key_charge`]), twice more when it expires (the expiry index keeps
/// the name twice: a Redis hash field and sorted-set member, redb a row;
/// measured: 440 bytes in Redis for the entry above), and its value.
pub fn entry_size(key_charge: u64, value_len: usize, expiring: bool) -> u64 {
    let names = if expiring { 3 } else { 1 };
    key_charge * names + value_len as u64
}

/// The counter's value after adding `delta`, from the stored text, with
/// Redis's rules (`INCRBY`), so the embedded store and the kit answer as a
/// shared Redis does: absent is 0; a counter is a decimal integer from 0 to
/// `i64::MAX` written without sign, spaces or leading zeros (`007`, `+5`,
/// `-1` and `9223372036854775808` are not counters); a sum past `i64::MAX`
/// overflows.
pub(crate) fn incremented(current: Option<&[u8]>, delta: u64) -> Result<u64, StoreError> {
    let current = match current {
        None => 0,
        Some(text) => counter(text).ok_or(StoreError::NotACounter)?,
    };
    let delta = i64::try_from(delta).map_err(|_| StoreError::Overflow)?;
    current
        .checked_add(delta)
        .map(|sum| sum as u64)
        .ok_or(StoreError::Overflow)
}

/// The counter `text` is, as Redis reads one (see [`incremented`]).
fn counter(text: &[u8]) -> Option<i64> {
    let canonical = text == b"0"
        || (matches!(text.first(), Some(b'1'..=b'9')) && text.iter().all(u8::is_ascii_digit));
    if !canonical {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// A bucket name: 1 to 64 of `a-z A-Z 0-9 . _ -`.
pub fn check_bucket_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("a bucket name has 1 to 64 characters".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{bad:?} is not allowed in a bucket name (letters, digits, '.', '_', '-')"
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod contract {
    //! One set of checks every backend passes (`embedded` and `memory` in
    //! their unit tests; Redis in the tests crate against a real server).
    use super::*;

    /// The lifetime of the key whose expiry is checked: long enough that
    /// the read right after its write sees it on a slow machine.
    const SHORT: Duration = Duration::from_secs(1);

    /// Runs every check against `store`, whose plugin names start empty.
    pub fn check_all(store: &dyn Backend, sleep: &dyn Fn(Duration)) {
        let a = Namespace::new("plugin-a", "rewards");
        let other_bucket = Namespace::new("plugin-a", "audit");
        let other_plugin = Namespace::new("plugin-b", "rewards");
        let q = 1 << 20;
        // What an entry counts: its names and the store's overhead, not
        // only its key and value.
        let plain = |key: &str, len: usize| entry_size(key_charge(&a, key), len, false);
        let expiring = |key: &str, len: usize| entry_size(key_charge(&a, key), len, true);
        assert!(plain("k", 2) > 128 && expiring("k", 2) > 3 * 128);

        // Set, get, isolation.
        assert_eq!(store.get(&a, "k").unwrap(), None);
        store.write(&a, "k", b"v1", None, Write::Set, q).unwrap();
        assert_eq!(store.get(&a, "k").unwrap(), Some(b"v1".to_vec()));
        assert_eq!(store.get(&other_bucket, "k").unwrap(), None);
        assert_eq!(store.get(&other_plugin, "k").unwrap(), None);
        assert!(store.exists(&a, "k").unwrap());
        assert_eq!(store.usage("plugin-a").unwrap(), plain("k", 2));
        store.write(&a, "k", b"v22", None, Write::Set, q).unwrap();
        assert_eq!(store.usage("plugin-a").unwrap(), plain("k", 3));
        assert_eq!(store.usage("plugin-b").unwrap(), 0);

        // Quota: a write past it is refused and changes nothing.
        let err = store
            .write(&a, "big", &[7; 100], None, Write::Set, 300)
            .unwrap_err();
        let would_be = plain("k", 3) + plain("big", 100);
        assert_eq!(
            err,
            StoreError::Quota {
                limit: 300,
                would_be
            }
        );
        assert_eq!(store.get(&a, "big").unwrap(), None);
        assert_eq!(store.usage("plugin-a").unwrap(), plain("k", 3));
        // Shrinking is always allowed, even over the quota.
        store.write(&a, "k", b"v", None, Write::Set, 1).unwrap();
        assert_eq!(store.usage("plugin-a").unwrap(), plain("k", 1));

        // Delete.
        store.delete(&a, "k").unwrap();
        store.delete(&a, "never").unwrap();
        assert_eq!(store.get(&a, "k").unwrap(), None);
        assert_eq!(store.usage("plugin-a").unwrap(), 0);

        // Claim: once, then held, with the holder's value.
        assert_eq!(
            store
                .write(
                    &a,
                    "m1",
                    b"pending",
                    Some(Duration::from_secs(60)),
                    Write::Claim,
                    q
                )
                .unwrap(),
            Written::Stored
        );
        assert_eq!(
            store
                .write(
                    &a,
                    "m1",
                    b"other",
                    Some(Duration::from_secs(60)),
                    Write::Claim,
                    q
                )
                .unwrap(),
            Written::Held(b"pending".to_vec())
        );
        assert_eq!(store.usage("plugin-a").unwrap(), expiring("m1", 7));
        // Given back only by the value that holds it.
        assert!(!store.delete_if(&a, "m1", b"other").unwrap());
        assert_eq!(store.get(&a, "m1").unwrap(), Some(b"pending".to_vec()));
        assert!(!store.delete_if(&a, "never", b"pending").unwrap());
        store
            .write(
                &a,
                "m2",
                b"mine",
                Some(Duration::from_secs(60)),
                Write::Claim,
                q,
            )
            .unwrap();
        assert!(store.delete_if(&a, "m2", b"mine").unwrap());
        assert_eq!(store.get(&a, "m2").unwrap(), None);
        assert_eq!(store.usage("plugin-a").unwrap(), expiring("m1", 7));
        // Overwritten with a longer expiry, then deleted.
        store
            .write(
                &a,
                "m1",
                b"done",
                Some(Duration::from_secs(3600)),
                Write::Set,
                q,
            )
            .unwrap();
        assert_eq!(store.get(&a, "m1").unwrap(), Some(b"done".to_vec()));
        assert_eq!(store.usage("plugin-a").unwrap(), expiring("m1", 4));
        store.delete(&a, "m1").unwrap();
        assert_eq!(store.usage("plugin-a").unwrap(), 0);

        // Expiry: a claim that expired can be claimed again, and its bytes
        // are given back.
        store
            .write(&a, "short", b"x", Some(SHORT), Write::Claim, q)
            .unwrap();
        // Held until it expires, however slow the machine: a lifetime far
        // longer than one write and one read take, then waited out.
        assert!(store.exists(&a, "short").unwrap());
        let written = std::time::Instant::now();
        while store.exists(&a, "short").unwrap() {
            assert!(
                written.elapsed() < SHORT * 30,
                "a key written for {SHORT:?} is still there"
            );
            sleep(Duration::from_millis(50));
        }
        assert_eq!(store.get(&a, "short").unwrap(), None);
        assert!(!store.exists(&a, "short").unwrap());
        assert_eq!(
            store
                .write(
                    &a,
                    "short",
                    b"yy",
                    Some(Duration::from_secs(60)),
                    Write::Claim,
                    q
                )
                .unwrap(),
            Written::Stored
        );
        assert_eq!(store.usage("plugin-a").unwrap(), expiring("short", 2));
        // Expired keys nobody touches again are swept by later writes.
        for i in 0..5 {
            let key = format!("gone-{i}");
            store
                .write(
                    &a,
                    &key,
                    b"x",
                    Some(Duration::from_millis(20)),
                    Write::Set,
                    q,
                )
                .unwrap();
        }
        sleep(Duration::from_millis(120));
        store.write(&a, "after", b"1", None, Write::Set, q).unwrap();
        assert_eq!(
            store.usage("plugin-a").unwrap(),
            expiring("short", 2) + plain("after", 1)
        );
        store.delete(&a, "short").unwrap();
        store.delete(&a, "after").unwrap();
        assert_eq!(store.usage("plugin-a").unwrap(), 0);

        // Counters.
        assert_eq!(store.increment(&a, "n", 5, q).unwrap(), 5);
        assert_eq!(store.increment(&a, "n", 2, q).unwrap(), 7);
        assert_eq!(store.get(&a, "n").unwrap(), Some(b"7".to_vec()));
        store
            .write(&a, "text", b"abc", None, Write::Set, q)
            .unwrap();
        assert_eq!(
            store.increment(&a, "text", 1, q).unwrap_err(),
            StoreError::NotACounter
        );
        store
            .write(
                &a,
                "max",
                u64::MAX.to_string().as_bytes(),
                None,
                Write::Set,
                q,
            )
            .unwrap();
        assert!(store.increment(&a, "max", 1, q).is_err());
        assert_eq!(
            store.get(&a, "max").unwrap(),
            Some(u64::MAX.to_string().into_bytes())
        );
        // What Redis's INCRBY refuses, every backend refuses.
        for not_a_counter in ["007", "+5", "-1", " 5", "5 ", "", "9223372036854775808"] {
            store
                .write(&a, "odd", not_a_counter.as_bytes(), None, Write::Set, q)
                .unwrap();
            assert_eq!(
                store.increment(&a, "odd", 1, q),
                Err(StoreError::NotACounter),
                "{not_a_counter:?}"
            );
        }
        store
            .write(&a, "odd", b"9223372036854775806", None, Write::Set, q)
            .unwrap();
        assert_eq!(store.increment(&a, "odd", 1, q), Ok(i64::MAX as u64));
        assert_eq!(store.increment(&a, "odd", 1, q), Err(StoreError::Overflow));
        assert_eq!(
            store.increment(&a, "fresh", i64::MAX as u64 + 1, q),
            Err(StoreError::Overflow)
        );
        assert_eq!(store.get(&a, "fresh").unwrap(), None);
        store.write(&a, "odd", b"0", None, Write::Set, q).unwrap();
        assert_eq!(store.increment(&a, "odd", 3, q), Ok(3));
        store.delete(&a, "odd").unwrap();
        assert!(matches!(
            store.increment(&a, "n2", 1, 1).unwrap_err(),
            StoreError::Quota { .. }
        ));
        for key in ["n", "text", "max"] {
            store.delete(&a, key).unwrap();
        }

        // Keys with any characters, listed page by page, this bucket only.
        store
            .write(&other_bucket, "x", b"", None, Write::Set, q)
            .unwrap();
        let mut expected = Vec::new();
        for i in 0..(LIST_PAGE + 30) {
            let key = format!("key:{i}/\u{1F600}\0end");
            store.write(&a, &key, b"1", None, Write::Set, q).unwrap();
            expected.push(key);
        }
        let mut listed = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let (keys, next) = store.list_keys(&a, cursor).unwrap();
            listed.extend(keys);
            pages += 1;
            assert!(pages < 1000, "list-keys does not end");
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        listed.sort();
        listed.dedup();
        expected.sort();
        assert_eq!(listed, expected);
        for key in &expected {
            store.delete(&a, key).unwrap();
        }
        store.delete(&other_bucket, "x").unwrap();
        assert_eq!(store.usage("plugin-a").unwrap(), 0);
    }
}
