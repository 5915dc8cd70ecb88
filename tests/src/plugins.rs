//! The plugins in `plugins/`, built for wasm32-wasip2 once per test process;
//! cargo skips the work when nothing changed.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Result, bail};

use crate::workspace_root;

/// The target directory the tests' own build uses.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs `cargo build <args> --target-dir <target>`.
fn cargo_build(args: &[&str], what: &str) -> Result<(), String> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .arg("build")
        .args(args)
        .arg("--target-dir")
        .arg(target_dir())
        .current_dir(workspace_root())
        .status()
        .map_err(|err| format!("cannot run cargo: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("building {what} failed: {status}"))
    }
}

/// Builds every plugin in `plugins/` and returns the path of `name`'s
/// component, e.g. `plugin_path("chaos")`.
pub fn plugin_path(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let args = ["--release", "--target", "wasm32-wasip2"];
            let manifest = ["--manifest-path", "plugins/Cargo.toml"];
            cargo_build(&[&args[..], &manifest[..]].concat(), "plugins/")
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    let path = target_dir()
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    if !path.exists() {
        bail!("no plugin {name} at {}", path.display());
    }
    Ok(path)
}

/// A plugin written in another language than Rust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// `plugins/python/reward_logger`, built with componentize-py.
    Python,
    /// `plugins/js/reward-logger`, built with componentize-js.
    JavaScript,
    /// `plugins/go/reward-logger`, built with mainline Go and wasm-tools.
    Go,
}

/// The guest toolchains, installed on first use by
/// `scripts/install-guest-tools.sh`: the componentize-py executable and the
/// node_modules folder that holds componentize-js.
pub fn guest_tools() -> Result<(PathBuf, PathBuf)> {
    static TOOLS: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let output = Command::new("bash")
                .arg("scripts/install-guest-tools.sh")
                .current_dir(workspace_root())
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|err| format!("cannot run bash: {err}"))?;
            if !output.status.success() {
                return Err(format!(
                    "scripts/install-guest-tools.sh failed: {}",
                    output.status
                ));
            }
            let text = String::from_utf8_lossy(&output.stdout);
            let mut lines = text.lines().map(PathBuf::from);
            match (lines.next(), lines.next()) {
                (Some(python), Some(node_modules)) => Ok((python, node_modules)),
                _ => Err(format!("install-guest-tools.sh printed {text:?}")),
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Builds the Python and JavaScript examples once per test process with
/// `scripts/build-guest-plugins.sh` (which installs its tools on first use and
/// skips components newer than their sources) and returns one's component.
pub fn guest_plugin_path(guest: Guest) -> Result<PathBuf> {
    let built = guest_builds()?;
    Ok(match guest {
        Guest::Python => built[0].clone(),
        Guest::JavaScript => built[1].clone(),
        Guest::Go => built[4].clone(),
    })
}

/// The reward-granter example in `guest`'s language
/// (`plugins/python/reward_granter`, `plugins/js/reward-granter`,
/// `plugins/go/reward-granter`), built
/// with the reward-loggers.
pub fn guest_granter_path(guest: Guest) -> Result<PathBuf> {
    let built = guest_builds()?;
    Ok(match guest {
        Guest::Python => built[2].clone(),
        Guest::JavaScript => built[3].clone(),
        Guest::Go => built[6].clone(),
    })
}

/// `plugins/go/testing/failures`: a Go plugin that fails the way its event
/// type says (`PANIC`, `RETRY_AFTER`, `DEAD_LETTER`, `FAIL`), or logs its
/// config key `greeting` (`CONFIG`).
pub fn go_failures_path() -> Result<PathBuf> {
    Ok(guest_builds()?[5].clone())
}

/// Every guest build, once per test process: the reward-logger and the
/// reward-granter, in Python and JavaScript, and the Go plugins.
fn guest_builds() -> Result<[PathBuf; 7]> {
    static BUILT: OnceLock<Result<[PathBuf; 7], String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = target_dir().join("guest-plugins");
            let status = Command::new("bash")
                .arg("scripts/build-guest-plugins.sh")
                .arg(&out)
                .current_dir(workspace_root())
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|err| format!("cannot run bash: {err}"))?;
            if !status.success() {
                return Err(format!("scripts/build-guest-plugins.sh failed: {status}"));
            }
            Ok([
                out.join("reward_logger_py.wasm"),
                out.join("reward_logger_js.wasm"),
                out.join("reward_granter_py.wasm"),
                out.join("reward_granter_js.wasm"),
                out.join("reward_logger_go.wasm"),
                out.join("failures_go.wasm"),
                out.join("reward_granter_go.wasm"),
            ])
        })
        .clone()
        .map_err(anyhow::Error::msg)
}
