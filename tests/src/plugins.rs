//! The plugins in `plugins/`, built once for wasm32-wasip2.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Result, bail};

use crate::workspace_root;

/// Builds every plugin in `plugins/` (once per test process; cargo skips the
/// work when nothing changed) and returns the path of `name`'s component,
/// e.g. `plugin_path("chaos")`.
pub fn plugin_path(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "build",
                    "--release",
                    "--target",
                    "wasm32-wasip2",
                    "--manifest-path",
                ])
                .arg(root.join("plugins/Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .status()
                .map_err(|err| format!("cannot run cargo: {err}"))?;
            if !status.success() {
                return Err(format!("building plugins/ failed: {status}"));
            }
            Ok(target.join("wasm32-wasip2/release"))
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    if !path.exists() {
        bail!("no plugin {name} at {}", path.display());
    }
    Ok(path)
}

/// Builds the `mqplug` binary (once per test process) and returns its path.
pub fn mqplug_bin() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "-p", "mqplug", "--bin", "mqplug", "--manifest-path"])
                .arg(root.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .status()
                .map_err(|err| format!("cannot run cargo: {err}"))?;
            if !status.success() {
                return Err(format!("building mqplug failed: {status}"));
            }
            Ok(target.join("debug/mqplug"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}
