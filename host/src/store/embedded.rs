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
//!
//! A failed write to the file (a full disk, an I/O error) makes redb refuse
//! every later call until the database is reopened. The store then reopens
//! the file at the next call, at most once a second until that works; each
//! call before is `unavailable`, an error the handler sees.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    Backend, LIST_PAGE, Namespace, StoreError, Write, Written, entry_size, incremented,
    names_charge,
};

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
const EXPIRING: TableDefinition<&[u8], ()> = TableDefinition::new("expiring");
const USAGE: TableDefinition<&str, u64> = TableDefinition::new("usage");

/// Expired entries one write sweeps at most.
pub const SWEEP_BATCH: usize = 64;

/// The embedded store (or, from [`Embedded::in_memory`], the same store
/// kept in memory: the conformance kit's).
pub struct Embedded {
    /// `None` after a failed reopen.
    db: RwLock<Option<Database>>,
    kind: &'static str,
    /// How to open the database again (`None`: in memory, never reopened).
    reopen: Option<Reopen>,
    /// A call failed in a way redb latches: reopen before the next one.
    latched: AtomicBool,
    /// No reopen before this.
    next_reopen: Mutex<Option<Instant>>,
}

type Reopen = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// The least time between two reopens of a failing file.
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);

/// The database, read-locked for one call.
struct Db<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for Db<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        self.0.as_ref().expect("checked when the guard was made")
    }
}

impl Embedded {
    /// Opens the database at `path`, creating it (and its folder) if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| {
                StoreError::Unavailable(format!("cannot create {}: {err}", dir.display()))
            })?;
        }
        let path = path.to_path_buf();
        Self::reopening(Box::new(move || {
            Database::create(&path).map_err(|err| match err {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::InUse(format!("{} is locked", path.display()))
                }
                err => StoreError::Unavailable(format!("cannot open {}: {err}", path.display())),
            })
        }))
    }

    /// A store `open` opens now, and again after a failed write.
    fn reopening(open: Reopen) -> Result<Self, StoreError> {
        let mut store = Self::with_tables(open()?, "embedded")?;
        store.reopen = Some(open);
        Ok(store)
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
        Ok(Embedded {
            db: RwLock::new(Some(db)),
            kind,
            reopen: None,
            latched: AtomicBool::new(false),
            next_reopen: Mutex::new(None),
        })
    }

    /// Removes `key` (only if it holds `expected`, when given), giving its
    /// bytes back; whether it did.
    fn remove(
        &self,
        ns: &Namespace,
        key: &str,
        expected: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let entry = entry_key(ns, key);
        self.write_txn(|tables, _| {
            let Some(old) = tables.current(&entry)? else {
                return Ok(false);
            };
            if expected.is_some_and(|expected| old.value != expected) {
                return Ok(false);
            }
            if old.expires != 0 {
                tables
                    .expiring
                    .remove(expiring_key(old.expires, &entry).as_slice())
                    .map_err(failed)?;
            }
            tables.entries.remove(entry.as_slice()).map_err(failed)?;
            tables.add_usage(
                &ns.plugin,
                -(stored_size(&entry, old.value.len(), old.expires != 0) as i128),
            )?;
            Ok(true)
        })
    }

    /// The database for one call, reopened first if the last call failed
    /// in a way redb latches.
    fn db(&self) -> Result<Db<'_>, StoreError> {
        if self.latched.load(Ordering::Acquire) {
            self.reopen_now()?;
        }
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            self.latched.store(true, Ordering::Release);
            return Err(StoreError::Unavailable(
                "the state file is closed after an I/O error and could not be reopened yet".into(),
            ));
        }
        Ok(Db(guard))
    }

    fn reopen_now(&self) -> Result<(), StoreError> {
        let Some(open) = &self.reopen else {
            return Ok(());
        };
        {
            let mut next = self.next_reopen.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if next.is_some_and(|next| now < next) {
                return Err(StoreError::Unavailable(
                    "the state file failed; it is reopened at most once a second".into(),
                ));
            }
            *next = Some(now + REOPEN_BACKOFF);
        }
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        if !self.latched.load(Ordering::Acquire) {
            return Ok(()); // Another call reopened it meanwhile.
        }
        // redb holds the file's lock until its database is dropped.
        *db = None;
        match open() {
            Ok(reopened) => {
                *db = Some(reopened);
                self.latched.store(false, Ordering::Release);
                tracing::info!(store = self.kind, "state store reopened after an I/O error");
                Ok(())
            }
            Err(err) => {
                tracing::warn!(
                    store = self.kind,
                    "state store could not be reopened: {err}"
                );
                Err(err)
            }
        }
    }

    /// Notes a failure redb latches (an I/O error, or one before it), so the
    /// next call reopens the database.
    fn noting<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Failed(text)) = &result
            && (text.contains("I/O error") || text.contains("Storage backend error"))
            && !self.latched.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                store = self.kind,
                "state store failed, reopening it: {text}"
            );
        }
        result
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
                let size = stored_size(entry, value_len, true);
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
        old: Option<&Stored>,
        value: &[u8],
        expires: u64,
        quota: u64,
    ) -> Result<(), StoreError> {
        let plugin = plugin_of(entry).to_string();
        let old_size = old.map_or(0, |old| {
            stored_size(entry, old.value.len(), old.expires != 0)
        });
        let new_size = stored_size(entry, value.len(), expires != 0);
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

/// The bytes the entry `entry` (`plugin \0 bucket \0 key`) counts with a
/// value of `value_len` bytes, expiring or not ([`entry_size`]).
fn stored_size(entry: &[u8], value_len: usize, expiring: bool) -> u64 {
    entry_size(names_charge(entry.len() - 2), value_len, expiring)
}

impl Embedded {
    /// Runs `f` in a write transaction after a sweep, committing when it
    /// returns `Ok`.
    fn write_txn<T>(
        &self,
        f: impl FnOnce(&mut Tables<'_>, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = self.write_txn_once(f);
        self.noting(result)
    }

    fn write_txn_once<T>(
        &self,
        f: impl FnOnce(&mut Tables<'_>, u64) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db()?.begin_write().map_err(failed)?;
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
        let txn = self.noting(self.db()?.begin_read().map_err(failed))?;
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
            tables.put(&entry, old.as_ref(), value, expires, quota)?;
            Ok(Written::Stored)
        })
    }

    fn delete(&self, ns: &Namespace, key: &str) -> Result<(), StoreError> {
        self.remove(ns, key, None).map(drop)
    }

    fn delete_if(&self, ns: &Namespace, key: &str, expected: &[u8]) -> Result<bool, StoreError> {
        self.remove(ns, key, Some(expected))
    }

    fn list_keys(
        &self,
        ns: &Namespace,
        cursor: Option<u64>,
    ) -> Result<(Vec<String>, Option<u64>), StoreError> {
        let prefix = bucket_prefix(ns);
        let skip = cursor.unwrap_or(0) as usize;
        let now = now_ms();
        let txn = self.noting(self.db()?.begin_read().map_err(failed))?;
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
                old.as_ref(),
                next.to_string().as_bytes(),
                expires,
                quota,
            )?;
            Ok(next)
        })
    }

    fn health(&self) -> Result<(), String> {
        if self.latched.load(Ordering::Acquire) {
            return Err("the state file failed (an I/O error); the next call reopens it".into());
        }
        Ok(())
    }

    fn usage(&self, plugin: &str) -> Result<u64, StoreError> {
        let txn = self.noting(self.db()?.begin_read().map_err(failed))?;
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
    use std::sync::Arc;

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
        assert_eq!(
            store.usage("p").unwrap(),
            super::super::entry_size(super::super::key_charge(&ns, "kept"), 3, false)
                + super::super::entry_size(super::super::key_charge(&ns, "claim"), 4, true)
        );
    }

    /// A file whose writes fail while `failing` is set: a full disk.
    #[derive(Debug)]
    struct Flaky {
        file: redb::backends::FileBackend,
        failing: Arc<AtomicBool>,
    }

    impl redb::StorageBackend for Flaky {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.fail()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.fail()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.fail()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.file.close()
        }
    }

    impl Flaky {
        fn fail(&self) -> Result<(), std::io::Error> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            Ok(())
        }
    }

    /// One failed write (a full disk) no longer takes every plugin's state
    /// away until a restart: once the disk has room again, the store
    /// reopens its file and what was committed before is all there.
    #[test]
    fn a_failed_write_is_an_error_and_the_store_reopens_its_file_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let failing = Arc::new(AtomicBool::new(false));
        let (open_path, open_failing) = (path.clone(), failing.clone());
        let store = Embedded::reopening(Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&open_path)
                .map_err(super::failed)?;
            let backend = Flaky {
                file: redb::backends::FileBackend::new(file).map_err(super::failed)?,
                failing: open_failing.clone(),
            };
            Database::builder()
                .create_with_backend(backend)
                .map_err(super::failed)
        }))
        .unwrap();
        let ns = Namespace::new("p", "b");
        let q = 1 << 20;
        store
            .write(&ns, "before", b"1", None, Write::Set, q)
            .unwrap();
        failing.store(true, Ordering::SeqCst);
        let err = store
            .write(&ns, "during", b"2", None, Write::Set, q)
            .unwrap_err();
        assert!(err.to_string().contains("I/O error"), "{err}");
        failing.store(false, Ordering::SeqCst);
        // Reopened at most once a second: within a few, it serves again.
        let mut tries = 0;
        while store
            .write(&ns, "after", b"3", None, Write::Set, q)
            .is_err()
        {
            tries += 1;
            assert!(tries < 100, "the store never came back");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(store.get(&ns, "before").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get(&ns, "during").unwrap(), None);
        assert_eq!(store.get(&ns, "after").unwrap(), Some(b"3".to_vec()));
        // The usage counts what the store holds, the failed write not.
        let size =
            |key, len| super::super::entry_size(super::super::key_charge(&ns, key), len, false);
        assert_eq!(
            store.usage("p").unwrap(),
            size("before", 1) + size("after", 1)
        );
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
