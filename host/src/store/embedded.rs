//! The embedded backend: one redb database file, durable across restarts
//! (every write is committed to disk before it returns), nothing to start.
//! One host process opens the file at a time; hosts on several machines
//! share state through Redis instead.
//!
//! Tables:
//! - `entries`: `plugin \0 bucket \0 key` to the expiry (milliseconds since
//!   the Unix epoch, big-endian, 0 for none) followed by the value;
//! - `expiring`: the expiry followed by the entry's key, to sweep expired
//!   entries in order;
//! - `usage`: per plugin, the bytes its keys and values take.
//!
//! An expired entry is absent to every read at once; its bytes are given
//! back when a write sweeps it (each write sweeps up to [`SWEEP_BATCH`]).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, LIST_PAGE, Namespace, StoreError, Write, Written, entry_size, incremented};

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
const EXPIRING: TableDefinition<&[u8], ()> = TableDefinition::new("expiring");
const USAGE: TableDefinition<&str, u64> = TableDefinition::new("usage");

/// Expired entries one write sweeps at most.
pub const SWEEP_BATCH: usize = 64;

/// The embedded store (or, from [`Embedded::in_memory`], the same store
/// kept in memory: the conformance kit's).
pub struct Embedded {
    db: Database,
    kind: &'static str,
}

impl Embedded {
    /// Opens the database at `path`, creating it (and its folder) if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| {
                StoreError::Unavailable(format!("cannot create {}: {err}", dir.display()))
            })?;
        }
        let db = Database::create(path).map_err(|err| {
            StoreError::Unavailable(format!("cannot open {}: {err}", path.display()))
        })?;
        Self::with_tables(db, "embedded")
    }

    /// A store that lives in memory and is gone when dropped.
    pub fn in_memory() -> Self {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory database always opens");
        Self::with_tables(db, "memory").expect("an in-memory database always has its tables")
    }

    fn with_tables(db: Database, kind: &'static str) -> Result<Self, StoreError> {
        let txn = db.begin_write().map_err(failed)?;
        txn.open_table(ENTRIES).map_err(failed)?;
        txn.open_table(EXPIRING).map_err(failed)?;
        txn.open_table(USAGE).map_err(failed)?;
        txn.commit().map_err(failed)?;
        Ok(Embedded { db, kind })
    }
}

fn failed(err: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(err.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn entry_key(ns: &Namespace, key: &str) -> Vec<u8> {
    let mut full = Vec::with_capacity(ns.plugin.len() + ns.bucket.len() + key.len() + 2);
    full.extend_from_slice(ns.plugin.as_bytes());
    full.push(0);
    full.extend_from_slice(ns.bucket.as_bytes());
    full.push(0);
    full.extend_from_slice(key.as_bytes());
    full
}

fn bucket_prefix(ns: &Namespace) -> Vec<u8> {
    entry_key(ns, "")
}

fn expiring_key(expires: u64, entry: &[u8]) -> Vec<u8> {
    let mut key = expires.to_be_bytes().to_vec();
    key.extend_from_slice(entry);
    key
}

/// The plugin of an entry's key.
fn plugin_of(entry: &[u8]) -> &str {
    let end = entry.iter().position(|&b| b == 0).unwrap_or(entry.len());
    std::str::from_utf8(&entry[..end]).unwrap_or("")
}

/// A stored entry: its expiry (0: none) and value.
struct Stored {
    expires: u64,
    value: Vec<u8>,
}

impl Stored {
    fn decode(bytes: &[u8]) -> Stored {
        let (expires, value) = bytes.split_at(bytes.len().min(8));
        let mut be = [0u8; 8];
        be[..expires.len()].copy_from_slice(expires);
        Stored {
            expires: u64::from_be_bytes(be),
            value: value.to_vec(),
        }
    }

    fn encode(expires: u64, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(8 + value.len());
        bytes.extend_from_slice(&expires.to_be_bytes());
        bytes.extend_from_slice(value);
        bytes
    }

    fn live(&self, now: u64) -> bool {
        self.expires == 0 || self.expires > now
    }
}

/// The write transaction's tables.
struct Tables<'t> {
    entries: redb::Table<'t, &'static [u8], &'static [u8]>,
    expiring: redb::Table<'t, &'static [u8], ()>,
    usage: redb::Table<'t, &'static str, u64>,
}

impl Tables<'_> {
    /// Removes up to [`SWEEP_BATCH`] expired entries, giving their bytes back.
    fn sweep(&mut self, now: u64) -> Result<(), StoreError> {
        let end = (now + 1).to_be_bytes();
        let due: Vec<Vec<u8>> = self
            .expiring
            .range::<&[u8]>(..&end[..])
            .map_err(failed)?
            .take(SWEEP_BATCH)
            .map(|item| item.map(|(key, _)| key.value().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(failed)?;
        for due in due {
            self.expiring.remove(due.as_slice()).map_err(failed)?;
            let entry = &due[8..];
            let removed = self
                .entries
                .remove(entry)
                .map_err(failed)?
                .map(|removed| Stored::decode(removed.value()).value.len());
            if let Some(value_len) = removed {
                let size = entry.len() - entry_prefix_len(entry) + value_len;
                self.add_usage(plugin_of(entry), -(size as i128))?;
            }
        }
        Ok(())
    }

    fn current(&self, entry: &[u8]) -> Result<Option<Stored>, StoreError> {
        Ok(self
            .entries
            .get(entry)
            .map_err(failed)?
            .map(|found| Stored::decode(found.value())))
    }

    fn usage_of(&self, plugin: &str) -> Result<u64, StoreError> {
        Ok(self
            .usage
            .get(plugin)
            .map_err(failed)?
            .map_or(0, |found| found.value()))
    }

    fn add_usage(&mut self, plugin: &str, delta: i128) -> Result<(), StoreError> {
        let now = self.usage_of(plugin)? as i128;
        let next = (now + delta).max(0) as u64;
        if next == 0 {
            self.usage.remove(plugin).map_err(failed)?;
        } else {
            self.usage.insert(plugin, next).map_err(failed)?;
        }
        Ok(())
    }

    /// Replaces `old` (if any) under `entry` by `value`, expiring at
    /// `expires` (0: never), within `quota`.
    fn put(
        &mut self,
        entry: &[u8],
        key: &str,
        old: Option<&Stored>,
        value: &[u8],
        expires: u64,
        quota: u64,
    ) -> Result<(), StoreError> {
        let plugin = plugin_of(entry).to_string();
        let old_size = old.map_or(0, |old| entry_size(key, &old.value));
        let new_size = entry_size(key, value);
        let total = self.usage_of(&plugin)?;
        let would_be = total.saturating_sub(old_size) + new_size;
        if new_size > old_size && would_be > quota {
            return Err(StoreError::Quota {
                limit: quota,
                would_be,
            });
        }
        if let Some(old) = old.filter(|old| old.expires != 0) {
            self.expiring
                .remove(expiring_key(old.expires, entry).as_slice())
                .map_err(failed)?;
        }
        self.entries
            .insert(entry, Stored::encode(expires, value).as_slice())
            .map_err(failed)?;
        if expires != 0 {
            self.expiring
                .insert(expiring_key(expires, entry).as_slice(), ())
                .map_err(failed)?;
        }
        self.add_usage(&plugin, new_size as i128 - old_size as i128)
    }
}

/// The length of `plugin \0 bucket \0` in an entry's key.
fn entry_prefix_len(entry: &[u8]) -> usize {
    let mut zeros = 0;
    for (i, &b) in entry.iter().enumerate() {
        if b == 0 {
            zeros += 1;
            if zeros == 2 {
                return i + 1;
            }
        }
    }
    entry.len()
}

impl Embedded {
    /// Runs `f` in a write transaction after a sweep, committing when it
    /// returns `Ok`.
    fn write_txn<T>(
        &self,
        f: impl FnOnce(&mut Tables<'_>, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_write().map_err(failed)?;
        let now = now_ms();
        let result = {
            let mut tables = Tables {
                entries: txn.open_table(ENTRIES).map_err(failed)?,
                expiring: txn.open_table(EXPIRING).map_err(failed)?,
                usage: txn.open_table(USAGE).map_err(failed)?,
            };
            tables.sweep(now)?;
            f(&mut tables, now)
        };
        match result {
            Ok(value) => {
                txn.commit().map_err(failed)?;
                Ok(value)
            }
            Err(err) => {
                txn.abort().map_err(failed)?;
                Err(err)
            }
        }
    }
}

impl Backend for Embedded {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn get(&self, ns: &Namespace, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(failed)?;
        let entries = txn.open_table(ENTRIES).map_err(failed)?;
        let found = entries.get(entry_key(ns, key).as_slice()).map_err(failed)?;
        Ok(found
            .map(|found| Stored::decode(found.value()))
            .filter(|stored| stored.live(now_ms()))
            .map(|stored| stored.value))
    }

    fn write(
        &self,
        ns: &Namespace,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        how: Write,
        quota: u64,
    ) -> Result<Written, StoreError> {
        let entry = entry_key(ns, key);
        self.write_txn(|tables, now| {
            let old = tables.current(&entry)?;
            if how == Write::Claim
                && let Some(held) = old.as_ref().filter(|old| old.live(now))
            {
                return Ok(Written::Held(held.value.clone()));
            }
            let expires = ttl.map_or(0, |ttl| now.saturating_add(ttl.as_millis() as u64).max(1));
            tables.put(&entry, key, old.as_ref(), value, expires, quota)?;
            Ok(Written::Stored)
        })
    }

    fn delete(&self, ns: &Namespace, key: &str) -> Result<(), StoreError> {
        let entry = entry_key(ns, key);
        self.write_txn(|tables, _| {
            let Some(old) = tables.current(&entry)? else {
                return Ok(());
            };
            if old.expires != 0 {
                tables
                    .expiring
                    .remove(expiring_key(old.expires, &entry).as_slice())
                    .map_err(failed)?;
            }
            tables.entries.remove(entry.as_slice()).map_err(failed)?;
            tables.add_usage(&ns.plugin, -(entry_size(key, &old.value) as i128))
        })
    }

    fn list_keys(
        &self,
        ns: &Namespace,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), StoreError> {
        let prefix = bucket_prefix(ns);
        let skip = cursor.unwrap_or(0) as usize;
        let now = now_ms();
        let txn = self.db.begin_read().map_err(failed)?;
        let entries = txn.open_table(ENTRIES).map_err(failed)?;
        let mut keys = Vec::new();
        let mut seen = 0usize;
        let mut more = false;
        for item in entries
            .range::<&[u8]>(prefix.as_slice()..)
            .map_err(failed)?
        {
            let (key, value) = item.map_err(failed)?;
            let key = key.value();
            if !key.starts_with(&prefix) {
                break;
            }
            if !Stored::decode(value.value()).live(now) {
                continue;
            }
            seen += 1;
            if seen <= skip {
                continue;
            }
            if keys.len() == LIST_PAGE {
                more = true;
                break;
            }
            keys.push(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
        }
        let next = more.then(|| (skip + keys.len()) as u64);
        Ok((keys, next))
    }

    fn increment(
        &self,
        ns: &Namespace,
        key: &str,
        delta: u64,
        quota: u64,
    ) -> Result<u64, StoreError> {
        let entry = entry_key(ns, key);
        self.write_txn(|tables, now| {
            let old = tables.current(&entry)?;
            let live = old.as_ref().filter(|old| old.live(now));
            let next = incremented(live.map(|old| old.value.as_slice()), delta)?;
            let expires = live.map_or(0, |old| old.expires);
            tables.put(
                &entry,
                key,
                old.as_ref(),
                next.to_string().as_bytes(),
                expires,
                quota,
            )?;
            Ok(next)
        })
    }

    fn usage(&self, plugin: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(failed)?;
        let usage = txn.open_table(USAGE).map_err(failed)?;
        Ok(usage
            .get(plugin)
            .map_err(failed)?
            .map_or(0, |found| found.value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_memory_store_keeps_the_contract() {
        super::super::contract::check_all(&Embedded::in_memory(), &std::thread::sleep);
    }

    #[test]
    fn the_embedded_store_keeps_the_contract_and_its_keys_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/state.redb");
        let store = Embedded::open(&path).unwrap();
        super::super::contract::check_all(&store, &std::thread::sleep);
        let ns = Namespace::new("p", "b");
        store
            .write(&ns, "kept", b"yes", None, Write::Set, 1 << 20)
            .unwrap();
        store
            .write(
                &ns,
                "claim",
                b"done",
                Some(Duration::from_secs(600)),
                Write::Claim,
                1 << 20,
            )
            .unwrap();
        drop(store);
        let store = Embedded::open(&path).unwrap();
        assert_eq!(store.get(&ns, "kept").unwrap(), Some(b"yes".to_vec()));
        assert_eq!(
            store
                .write(
                    &ns,
                    "claim",
                    b"again",
                    Some(Duration::from_secs(600)),
                    Write::Claim,
                    1 << 20
                )
                .unwrap(),
            Written::Held(b"done".to_vec())
        );
        assert_eq!(store.usage("p").unwrap(), 7 + 9);
    }

    #[test]
    fn a_database_file_in_use_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _held = Embedded::open(&path).unwrap();
        let err = Embedded::open(&path).err().expect("opened twice");
        assert!(err.to_string().contains("state.redb"), "{err}");
    }
}
