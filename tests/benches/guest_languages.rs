//! The same plugin (reward-logger) in every guest language, side by side:
//! component size, memory at instantiation, cold compile and cached load,
//! and the cost of one event with a reused instance and with a fresh one
//! (`instance_mode = "fresh"`, where Go's runtime and CPython's and
//! SpiderMonkey's start-up run on every event).
//!
//!   cargo bench -p mqplug-tests --bench guest_languages
//!
//! To profile one language's events, run only those, in a loop, with the
//! plugins' functions named for perf:
//!
//!   MQPLUG_WASM_PERFMAP=1 MQPLUG_BENCH_PROFILE=Go:reused \
//!     perf record -g -- target/release/deps/guest_languages-* --bench

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mqplug::config::PluginConfig;
use mqplug::delivery::Delivery;
use mqplug::observe::Observers;
use mqplug::outcome::HandlerOutcome;
use mqplug::slot::load_plugin;
use mqplug::wasm::{InstanceMode, Plugin, RuntimeSettings, WasmRuntime};
use mqplug_tests::plugins::{Guest, guest_plugin_path, plugin_path};

/// Events per measurement, and measurements (the median is reported).
const REUSED_EVENTS: usize = 2_000;
const FRESH_EVENTS: usize = 200;
const ROUNDS: usize = 5;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("guest_languages: run with `cargo bench`");
        return Ok(());
    }
    let plugins = [
        ("Rust", plugin_path("reward-logger")?),
        ("Go", guest_plugin_path(Guest::Go)?),
        ("JavaScript", guest_plugin_path(Guest::JavaScript)?),
        ("Python", guest_plugin_path(Guest::Python)?),
    ];
    let event = mqplug_tests::sample_event_with(
        "SHARE_ARTICLE",
        125,
        serde_json::json!({"count": 2, "source": "web"}),
    );
    let delivery = Delivery {
        message_id: "7F000001000000000000000000000001".into(),
        topic: "marketing_task_completed".into(),
        ..Delivery::default()
    };
    if let Ok(profile) = std::env::var("MQPLUG_BENCH_PROFILE") {
        return profile_one(&plugins, &profile, &event, &delivery);
    }
    println!(
        "| reward-logger in | component | memory at instantiation | cold compile + instantiate | \
         cached load + instantiate | one event, reused instance | one event, fresh instance |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rust_reused = None;
    for (language, path) in plugins {
        let size = std::fs::metadata(&path)?.len();
        let cache = tempfile::tempdir()?;
        // A new runtime per load, as after a restart: only the cache folder
        // is shared.
        let runtime = || {
            WasmRuntime::new(RuntimeSettings {
                cache_dir: Some(cache.path().to_path_buf()),
                ..RuntimeSettings::default()
            })
            .map_err(anyhow::Error::msg)
        };
        let (cold, _) = timed(|| load(&runtime()?, &path, InstanceMode::Reuse))?;
        let cached = median(|| {
            let runtime = runtime()?;
            Ok(timed(|| load(&runtime, &path, InstanceMode::Reuse))?.0)
        })?;
        let runtime = runtime()?;
        let reused_plugin = load(&runtime, &path, InstanceMode::Reuse)?;
        let fresh_plugin = load(&runtime, &path, InstanceMode::FreshPerEvent)?;
        let per_event = |plugin: &Plugin, events: usize| {
            median(|| {
                let started = Instant::now();
                for _ in 0..events {
                    let outcome = plugin.handle(&event, &delivery);
                    ensure!(outcome == HandlerOutcome::Accepted, "{outcome:?}");
                }
                Ok(started.elapsed() / events as u32)
            })
        };
        let reused = per_event(&reused_plugin, REUSED_EVENTS)?;
        let fresh = per_event(&fresh_plugin, FRESH_EVENTS)?;
        let rust = *rust_reused.get_or_insert(reused);
        println!(
            "| {language} | {:.1} MB | {:.1} MiB | {:.0} ms | {:.1} ms | {:.1} us ({:.1}x Rust) | {:.0} us |",
            size as f64 / 1e6,
            reused_plugin.memory_at_instantiation() as f64 / (1024.0 * 1024.0),
            cold.as_secs_f64() * 1e3,
            cached.as_secs_f64() * 1e3,
            reused.as_secs_f64() * 1e6,
            reused.as_secs_f64() / rust.as_secs_f64(),
            fresh.as_secs_f64() * 1e6,
        );
    }
    Ok(())
}

/// `LANGUAGE:reused` or `LANGUAGE:fresh`: that plugin's events alone, for
/// `MQPLUG_BENCH_SECONDS` (default 10), after one unmeasured second.
fn profile_one(
    plugins: &[(&str, std::path::PathBuf)],
    profile: &str,
    event: &mqplug::event::TaskEvent,
    delivery: &Delivery,
) -> Result<()> {
    let (language, mode) = profile.split_once(':').unwrap_or((profile, "reused"));
    let Some((_, path)) = plugins
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(language))
    else {
        anyhow::bail!("MQPLUG_BENCH_PROFILE: no plugin in {language}");
    };
    let mode = match mode {
        "reused" => InstanceMode::Reuse,
        "fresh" => InstanceMode::FreshPerEvent,
        other => anyhow::bail!("MQPLUG_BENCH_PROFILE: {other} is neither reused nor fresh"),
    };
    let runtime = WasmRuntime::new(RuntimeSettings::default()).map_err(anyhow::Error::msg)?;
    let plugin = load(&runtime, path, mode)?;
    let (events, each) = mqplug_tests::repeat_for_profile(|| {
        let outcome = plugin.handle(event, delivery);
        ensure!(outcome == HandlerOutcome::Accepted, "{outcome:?}");
        Ok(())
    })?;
    println!(
        "{profile}: {events} events, {:.1} us each",
        each.as_secs_f64() * 1e6
    );
    Ok(())
}

fn load(runtime: &std::sync::Arc<WasmRuntime>, path: &Path, mode: InstanceMode) -> Result<Plugin> {
    let config = PluginConfig {
        instance_mode: mode,
        // The plugin logs a line per event: room for all of them.
        log_lines_per_second: 1_000_000,
        log_bytes_per_second: 1 << 30,
        ..PluginConfig::new("bench", path)
    };
    Ok(load_plugin(runtime, &config, &Observers::default())?)
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let started = Instant::now();
    let value = f()?;
    Ok((started.elapsed(), value))
}

fn median(mut once: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut times = (0..ROUNDS).map(|_| once()).collect::<Result<Vec<_>>>()?;
    times.sort();
    Ok(times[ROUNDS / 2])
}
