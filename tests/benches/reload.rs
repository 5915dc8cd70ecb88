//! Plugin load and reload latency: read, compile (or load from the compile
//! cache), link and instantiate, for a small and two large plugins, with a
//! cold cache and a warm one. What a reload or a restart costs.
//!
//!   cargo bench -p mqplug-tests --bench reload

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mqplug::config::PluginConfig;
use mqplug::observe::Observers;
use mqplug::slot::load_plugin;
use mqplug::wasm::{Compiled, RuntimeSettings, WasmRuntime};
use mqplug_tests::plugins::{Guest, guest_plugin_path, plugin_path};

const COLD_RUNS: usize = 3;
const WARM_RUNS: usize = 10;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("reload: run with `cargo bench`");
        return Ok(());
    }
    let plugins = [
        ("reward-logger (Rust)", plugin_path("reward-logger")?),
        (
            "reward-logger (JavaScript)",
            guest_plugin_path(Guest::JavaScript)?,
        ),
        ("reward-logger (Python)", guest_plugin_path(Guest::Python)?),
    ];
    println!("| plugin | wasm size | cold: compile + instantiate | cached: load + instantiate |");
    println!("|---|---|---|---|");
    for (name, path) in plugins {
        let size = std::fs::metadata(&path)?.len();
        let cold = median(COLD_RUNS, || {
            // A new cache folder each run: nothing cached.
            let dir = tempfile::tempdir()?;
            load(&path, dir.path(), Compiled::Fresh)
        })?;
        let dir = tempfile::tempdir()?;
        load(&path, dir.path(), Compiled::Fresh)?;
        let warm = median(WARM_RUNS, || load(&path, dir.path(), Compiled::FromCache))?;
        println!(
            "| {name} | {:.1} MB | {:.0} ms | {:.1} ms |",
            size as f64 / 1e6,
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// One load through a new runtime, as after a restart; checks how the
/// component was obtained.
fn load(path: &Path, cache: &Path, expect: Compiled) -> Result<Duration> {
    let runtime = WasmRuntime::new(RuntimeSettings {
        cache_dir: Some(cache.to_path_buf()),
        ..RuntimeSettings::default()
    })
    .map_err(anyhow::Error::msg)?;
    let config = PluginConfig::new("bench", path);
    let started = Instant::now();
    let plugin = load_plugin(&runtime, &config, &Observers::default())?;
    let took = started.elapsed();
    if plugin.compiled() != expect {
        bail!("expected {expect:?}, got {:?}", plugin.compiled());
    }
    Ok(took)
}

fn median(runs: usize, mut once: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut times = (0..runs).map(|_| once()).collect::<Result<Vec<_>>>()?;
    times.sort();
    Ok(times[runs / 2])
}
