//! Compiled components, cached on disk by content and engine configuration.
//!
//! A key is the wasm file's SHA-256 plus a hash of everything in the engine's
//! configuration that makes compiled code incompatible (wasmtime's
//! `precompile_compatibility_hash`). An entry made by another configuration
//! has another key, so it is compiled afresh, never loaded and never an error.
//! A corrupt entry is compiled afresh and overwritten.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// Where compiled components are kept; `None` compiles every time.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: Option<PathBuf>,
}

impl CompileCache {
    pub fn new(dir: Option<PathBuf>) -> Self {
        CompileCache { dir }
    }

    pub fn disabled() -> Self {
        CompileCache { dir: None }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Compiles `wasm`, or loads its compiled form from the cache.
    pub fn compile(&self, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<CompiledComponent> {
        let started = Instant::now();
        let version = Version::of(wasm);
        let Some(dir) = &self.dir else {
            let component = Component::new(engine, wasm)?;
            return Ok(CompiledComponent {
                component,
                version,
                how: Compiled::Fresh,
                took: started.elapsed(),
            });
        };
        let entry = dir.join(format!("{}-{}.cwasm", version, engine_key(engine)));
        // Read into memory rather than `deserialize_file`, which maps the
        // file: a cache entry truncated while mapped (by another host
        // sharing the folder, or by hand) would crash the process.
        if let Ok(bytes) = std::fs::read(&entry) {
            // SAFETY: entries are written only by `store` below, from
            // `Component::serialize` of this engine configuration (the key
            // says so); wasmtime checks the header and configuration again.
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(component) => {
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
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Err(err) = store(dir, &entry, &component) {
            tracing::warn!(dir = %dir.display(), "cannot write the compile cache: {err:#}");
        }
        Ok(CompiledComponent {
            component,
            version,
            how: Compiled::Fresh,
            took: started.elapsed(),
        })
    }
}

/// Writes an entry atomically (temporary file, then rename), so a reader never
/// sees half of one.
fn store(dir: &Path, entry: &Path, component: &Component) -> wasmtime::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = component.serialize()?;
    let temporary = entry.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, entry)?;
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
    fn versions_are_sha256_hex() {
        let version = Version::of(b"abc");
        assert_eq!(
            version.0,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(version.short(), "ba7816bf8f01");
    }
}
