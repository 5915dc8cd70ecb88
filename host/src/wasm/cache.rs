//! Compiled components, cached on disk by content and engine configuration.
//!
//! A key is the wasm file's SHA-256 plus a hash of everything in the engine's
//! configuration that makes compiled code incompatible (wasmtime's
//! `precompile_compatibility_hash`). An entry made by another configuration
//! has another key, so it is compiled afresh, never loaded and never an error.
//! An entry whose MAC does not hold (swapped, truncated, changed) is never
//! run: it is compiled afresh and overwritten.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// A plugin build's identity: the SHA-256 of its wasm bytes, in hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(pub String);

impl Version {
    pub fn of(wasm: &[u8]) -> Version {
        Version(hex(&Sha256::digest(wasm)))
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> &str {
        &self.0[..12.min(self.0.len())]
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Compiled by Cranelift now (no cache, or no entry for this key).
    Fresh,
    /// Deserialized from the cache: no compilation.
    FromCache,
}

/// A compiled component and how long getting it took.
pub struct CompiledComponent {
    pub component: Component,
    pub version: Version,
    pub how: Compiled,
    pub took: Duration,
}

/// The most bytes of entries the cache keeps by default; past it the least
/// recently used entries are removed.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 1 << 30;

/// An entry starts with this, then the MAC, then wasmtime's serialized
/// component.
const MAGIC: &[u8; 8] = b"MQPLUGC1";
const MAC_LEN: usize = 32;

/// Where compiled components are kept; `None` compiles every time.
///
/// A compiled entry is native code the host runs without a sandbox, so an
/// entry is used only if it is provably one this host wrote for that wasm
/// digest and engine: each carries an HMAC-SHA-256 over the digest, the
/// engine key and the code, keyed with a secret kept outside the folder
/// (`<folder>.key`, mode 0600). An entry swapped for another plugin's, cut
/// short, or changed by one byte fails the check and is compiled afresh. A
/// folder that others can write is not used at all.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: Option<PathBuf>,
    max_bytes: u64,
    /// Components loaded in this process: plugins with the same build (the
    /// same digest) share one compiled copy, its code mapped once.
    loaded: Arc<Loaded>,
}

/// Components most recently loaded, at most [`MAX_LOADED`], by digest.
#[derive(Default)]
struct Loaded(Mutex<VecDeque<(Version, Engine, Component)>>);

/// Builds kept loaded for sharing; older ones go when their plugins do.
const MAX_LOADED: usize = 64;

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(loaded.iter().map(|(version, _, _)| version.short()))
            .finish()
    }
}

impl Loaded {
    fn get(&self, version: &Version, engine: &Engine) -> Option<Component> {
        let mut loaded = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let at = loaded
            .iter()
            .position(|(v, e, _)| v == version && Engine::same(e, engine))?;
        let entry = loaded.remove(at)?;
        let component = entry.2.clone();
        loaded.push_back(entry);
        Some(component)
    }

    fn put(&self, version: &Version, engine: &Engine, component: &Component) {
        let mut loaded = self.0.lock().unwrap_or_else(|e| e.into_inner());
        loaded.retain(|(v, e, _)| !(v == version && Engine::same(e, engine)));
        loaded.push_back((version.clone(), engine.clone(), component.clone()));
        while loaded.len() > MAX_LOADED {
            loaded.pop_front();
        }
    }
}

/// Why the cache folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "compile cache folder {dir} is writable by {who} (mode {mode:o}): refusing to run native code from it; fix with `chmod go-w {dir}`"
    )]
    Writable {
        dir: String,
        who: &'static str,
        mode: u32,
    },
    #[error(
        "compile cache {path} {why}: refusing to run native code from it; use a folder of this user's, not a link"
    )]
    NotOurs { path: String, why: String },
    #[error("compile cache key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("compile cache folder {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
}

impl CompileCache {
    pub fn new(dir: Option<PathBuf>) -> Self {
        CompileCache {
            dir,
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            loaded: Arc::default(),
        }
    }

    /// The same cache, keeping at most `max_bytes` of entries.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    pub fn disabled() -> Self {
        CompileCache::new(None)
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Compiles `wasm`, or takes it already loaded (another plugin with the
    /// same build), or loads its compiled form from the cache.
    pub fn compile(&self, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<CompiledComponent> {
        let started = Instant::now();
        let version = Version::of(wasm);
        if let Some(component) = self.loaded.get(&version, engine) {
            return Ok(CompiledComponent {
                component,
                version,
                how: Compiled::FromCache,
                took: started.elapsed(),
            });
        }
        let compiled = self.compile_unshared(engine, wasm, started, version)?;
        self.loaded
            .put(&compiled.version, engine, &compiled.component);
        Ok(compiled)
    }

    fn compile_unshared(
        &self,
        engine: &Engine,
        wasm: &[u8],
        started: Instant,
        version: Version,
    ) -> wasmtime::Result<CompiledComponent> {
        let fresh = |version: Version| -> wasmtime::Result<CompiledComponent> {
            Ok(CompiledComponent {
                component: Component::new(engine, wasm)?,
                version,
                how: Compiled::Fresh,
                took: started.elapsed(),
            })
        };
        let Some(dir) = &self.dir else {
            return fresh(version);
        };
        let key = match open_folder(dir) {
            Ok(key) => key,
            Err(err) => {
                tracing::error!("{err}; compiling without the cache");
                return fresh(version);
            }
        };
        let engine_key = engine_key(engine);
        let entry = dir.join(format!("{version}-{engine_key}.cwasm"));
        // Read into memory rather than `deserialize_file`, which maps the
        // file: an entry truncated while mapped would crash the process.
        if let Ok(bytes) = std::fs::read(&entry) {
            match verified_code(&key, &version, &engine_key, &bytes) {
                // SAFETY: the MAC proves these bytes are what `store` wrote
                // from `Component::serialize` for this digest and engine
                // configuration, with a key only this host's user can read;
                // wasmtime checks the header and configuration again.
                Some(code) => match unsafe { Component::deserialize(engine, code) } {
                    Ok(component) => {
                        touch(&entry);
                        return Ok(CompiledComponent {
                            component,
                            version,
                            how: Compiled::FromCache,
                            took: started.elapsed(),
                        });
                    }
                    Err(err) => tracing::warn!(
                        entry = %entry.display(),
                        "compile cache entry unusable, compiling afresh: {err:#}"
                    ),
                },
                None => tracing::warn!(
                    entry = %entry.display(),
                    "compile cache entry is not one this host wrote for this plugin (MAC mismatch: \
                     swapped, cut or changed); not run, compiling afresh"
                ),
            }
        }
        let compiled = fresh(version)?;
        let written = store(
            &key,
            dir,
            &entry,
            &compiled.version,
            &engine_key,
            &compiled.component,
        )
        .and_then(|()| evict(dir, &entry, self.max_bytes));
        if let Err(err) = written {
            tracing::warn!(dir = %dir.display(), "cannot write the compile cache: {err:#}");
        }
        Ok(compiled)
    }
}

/// Checks the folder (creating it, mode 0700) and returns the MAC key,
/// creating it (mode 0600) on first use.
fn open_folder(dir: &Path) -> Result<[u8; MAC_LEN], CacheError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};

    let io = |source| CacheError::Io {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let metadata = std::fs::symlink_metadata(dir).map_err(io)?;
    ours(dir, &metadata)?;
    let mode = metadata.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(CacheError::Writable {
            dir: dir.display().to_string(),
            who: if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode,
        });
    }
    let path = key_path(dir);
    let key_error = |reason: String| CacheError::Key {
        path: path.display().to_string(),
        reason,
    };
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path);
    match created {
        Ok(mut file) => {
            let mut key = [0u8; MAC_LEN];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut random| random.read_exact(&mut key))
                .and_then(|()| file.write_all(&key))
                .and_then(|()| file.sync_all())
                .map_err(|err| key_error(format!("cannot create: {err}")))?;
            Ok(key)
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            let metadata =
                std::fs::symlink_metadata(&path).map_err(|e| key_error(e.to_string()))?;
            ours(&path, &metadata)?;
            if metadata.mode() & 0o077 != 0 {
                return Err(key_error(format!(
                    "readable or writable by others (mode {:o})",
                    metadata.mode() & 0o777
                )));
            }
            let bytes = std::fs::read(&path).map_err(|e| key_error(e.to_string()))?;
            bytes.try_into().map_err(|bytes: Vec<u8>| {
                key_error(format!("{} bytes, not {MAC_LEN}", bytes.len()))
            })
        }
        Err(err) => Err(key_error(format!("cannot create: {err}"))),
    }
}

/// Refuses a cache folder or key that is a symbolic link (whoever made it
/// chooses what it points at) or that another user owns (who could replace
/// what is in it).
fn ours(path: &Path, metadata: &std::fs::Metadata) -> Result<(), CacheError> {
    use std::os::unix::fs::MetadataExt;

    let not_ours = |why: String| CacheError::NotOurs {
        path: path.display().to_string(),
        why,
    };
    if metadata.file_type().is_symlink() {
        return Err(not_ours("is a symbolic link".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me {
        return Err(not_ours(format!(
            "is owned by user {}, not by this process's user {me}",
            metadata.uid()
        )));
    }
    Ok(())
}

/// How old a temporary file must be before [`evict`] takes it for one a
/// crashed writer left (a host sharing the folder may be writing one now).
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// `<folder>.key`, beside the folder: whoever can write only the folder
/// cannot replace it.
fn key_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".key");
    dir.with_file_name(name)
}

/// HMAC-SHA-256 (RFC 2104) of `parts`, each prefixed with its length.
fn mac(key: &[u8; MAC_LEN], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut inner_pad = [0x36u8; 64];
    let mut outer_pad = [0x5cu8; 64];
    for (i, byte) in key.iter().enumerate() {
        inner_pad[i] ^= byte;
        outer_pad[i] ^= byte;
    }
    let mut inner = Sha256::new();
    inner.update(inner_pad);
    for part in parts {
        inner.update((part.len() as u64).to_be_bytes());
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(outer_pad);
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The compiled code in `entry` if its MAC holds for this digest and engine.
fn verified_code<'a>(
    key: &[u8; MAC_LEN],
    version: &Version,
    engine_key: &str,
    entry: &'a [u8],
) -> Option<&'a [u8]> {
    let rest = entry.strip_prefix(MAGIC)?;
    let (tag, code) = rest.split_at_checked(MAC_LEN)?;
    let expected = mac(key, &[version.0.as_bytes(), engine_key.as_bytes(), code]);
    // Compared in constant time: a timing difference tells nothing.
    let differs = tag
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    (differs == 0).then_some(code)
}

/// Writes an entry atomically: a temporary file of a unique name, synced,
/// then renamed, so a reader never sees half of one and two hosts sharing the
/// folder never write into one temporary file.
fn store(
    key: &[u8; MAC_LEN],
    dir: &Path,
    entry: &Path,
    version: &Version,
    engine_key: &str,
    component: &Component,
) -> wasmtime::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    static WRITES: AtomicU64 = AtomicU64::new(0);

    let code = component.serialize()?;
    let tag = mac(key, &[version.0.as_bytes(), engine_key.as_bytes(), &code]);
    let temporary = dir.join(format!(
        ".{}.{}-{}.tmp",
        entry.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    let written = file
        .write_all(MAGIC)
        .and_then(|()| file.write_all(&tag))
        .and_then(|()| file.write_all(&code))
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temporary, entry));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written?;
    Ok(())
}

/// Marks an entry as just used, for [`evict`].
fn touch(entry: &Path) {
    if let Ok(file) = std::fs::OpenOptions::new().write(true).open(entry) {
        let _ = file.set_modified(SystemTime::now());
    }
}

/// Removes the least recently used entries (by modification time, which a
/// hit renews) until the folder's entries fit in `max_bytes`; `keep` (the
/// entry just written) stays. Temporary files older than [`ORPHAN_AGE`],
/// left by a writer that died before renaming them, go too.
fn evict(dir: &Path, keep: &Path, max_bytes: u64) -> wasmtime::Result<()> {
    let mut entries = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let path = item.path();
        if path.extension().is_some_and(|ext| ext == "cwasm") {
            let metadata = item.metadata()?;
            entries.push((metadata.modified()?, metadata.len(), path));
        } else if path.extension().is_some_and(|ext| ext == "tmp") {
            let age = item.metadata()?.modified()?.elapsed().unwrap_or_default();
            if age >= ORPHAN_AGE && std::fs::remove_file(&path).is_ok() {
                tracing::info!(file = %path.display(), "compile cache: removed a temporary file a writer left behind");
            }
        }
    }
    let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
    entries.sort();
    for (_, len, path) in entries {
        if total <= max_bytes {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            tracing::info!(entry = %path.display(), "compile cache over its size cap: removed the least recently used entry");
            total -= len;
        }
    }
    Ok(())
}

/// A short stable name for the engine's compatibility-relevant configuration.
fn engine_key(engine: &Engine) -> String {
    let mut hasher = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_of_one_build_share_its_compiled_code_and_other_builds_do_not() {
        let engine = Engine::default();
        let cache = CompileCache::disabled();
        let noop = std::fs::read(mqplug_tests::plugins::plugin_path("noop").unwrap()).unwrap();
        let chaos = std::fs::read(mqplug_tests::plugins::plugin_path("chaos").unwrap()).unwrap();
        let first = cache.compile(&engine, &noop).unwrap();
        let second = cache.compile(&engine, &noop).unwrap();
        let other = cache.compile(&engine, &chaos).unwrap();
        assert_eq!(first.how, Compiled::Fresh);
        assert_eq!(second.how, Compiled::FromCache);
        assert_eq!(
            first.component.image_range(),
            second.component.image_range()
        );
        assert_ne!(first.component.image_range(), other.component.image_range());
        // Another engine (another configuration) gets its own.
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        let fueled = Engine::new(&config).unwrap();
        let own = cache.compile(&fueled, &noop).unwrap();
        assert_eq!(own.how, Compiled::Fresh);
    }

    #[test]
    fn versions_are_sha256_hex() {
        let version = Version::of(b"abc");
        assert_eq!(
            version.0,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(version.short(), "ba7816bf8f01");
    }

    #[test]
    fn the_mac_is_hmac_sha256_over_length_prefixed_parts() {
        // Python: hmac.new(b"\x0b" * 32, struct.pack(">Q", 8) + b"Hi There",
        // hashlib.sha256).hexdigest()
        assert_eq!(
            hex(&mac(&[0x0b; MAC_LEN], &[b"Hi There"])),
            "0bc448fbd942bda00fa596aed1a2014da91bb53394aafc0fd1b510d9ce5de26a"
        );
    }

    fn entry(key: &[u8; MAC_LEN], version: &Version, code: &[u8]) -> Vec<u8> {
        let tag = mac(key, &[version.0.as_bytes(), b"engine", code]);
        [MAGIC.as_slice(), &tag, code].concat()
    }

    #[test]
    fn only_an_entry_tagged_for_this_digest_and_engine_with_this_key_verifies() {
        let key = [7; MAC_LEN];
        let version = Version::of(b"plugin a");
        let good = entry(&key, &version, b"native code");
        assert_eq!(
            verified_code(&key, &version, "engine", &good),
            Some(b"native code".as_slice())
        );
        let other_plugin = entry(&key, &Version::of(b"plugin b"), b"native code");
        assert_eq!(verified_code(&key, &version, "engine", &other_plugin), None);
        assert_eq!(verified_code(&key, &version, "other-engine", &good), None);
        assert_eq!(
            verified_code(&[8; MAC_LEN], &version, "engine", &good),
            None
        );
        assert_eq!(
            verified_code(&key, &version, "engine", &good[..good.len() - 1]),
            None
        );
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(verified_code(&key, &version, "engine", &flipped), None);
        assert_eq!(verified_code(&key, &version, "engine", &good[..20]), None);
        assert_eq!(
            verified_code(&key, &version, "engine", b"native code"),
            None
        );
    }
}
