//! A plugin that fails every event, many times over: does the host's memory
//! or the wasm pool grow? Prints resident memory and live pool slots as the
//! failures pile up, and the cost of one failure (a dropped instance and a
//! fresh one for the next event).
//!
//!   cargo bench -p mqplug-tests --bench trap_storm
//!
//! `MQPLUG_STORM_EVENTS` sets the events per kind (default 20000; a stack
//! overflow costs far more, so it runs a quarter of them, and running out of
//! memory, which first fills a 16 MiB memory, a twentieth).

use std::time::{Duration, Instant};

use mqplug::delivery::Delivery;
use mqplug::metrics::resident_memory_bytes;
use mqplug::observe::Observers;
use mqplug::outcome::HandlerOutcome;
use mqplug::wasm::{Plugin, PluginSettings, RuntimeSettings, WasmRuntime};
use mqplug_tests::{plugins::plugin_path, sample_event};

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    let events: u32 = std::env::var("MQPLUG_STORM_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let runtime =
        WasmRuntime::new(RuntimeSettings::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let plugin = Plugin::load_file(
        &runtime,
        PluginSettings {
            deadline: Duration::from_secs(5),
            memory_limit_bytes: 16 * 1024 * 1024,
            ..PluginSettings::new("chaos")
        },
        &plugin_path("chaos")?,
        Observers::default(),
    )?;
    let delivery = Delivery {
        message_id: "storm".into(),
        ..Delivery::default()
    };

    println!(
        "| event kind | events | per event | RSS before | RSS after | RSS peak | live instances after |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (kind, share) in [("OK", 1), ("PANIC", 1), ("STACK_OVERFLOW", 4), ("OOM", 20)] {
        let events = events / share;
        let event = sample_event(kind, 1);
        let before = resident_memory_bytes().unwrap_or(0);
        let mut peak = before;
        let started = Instant::now();
        for i in 0..events {
            let outcome = plugin.handle(&event, &delivery);
            assert_eq!(
                matches!(outcome, HandlerOutcome::Accepted),
                kind == "OK",
                "{kind}: {outcome:?}"
            );
            if i % 1000 == 999 {
                peak = peak.max(resident_memory_bytes().unwrap_or(0));
            }
        }
        let per_event = started.elapsed() / events;
        let after = resident_memory_bytes().unwrap_or(0);
        let pool = runtime.pool_usage();
        println!(
            "| {kind} | {events} | {per_event:.1?} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} of {} ({} memories) |",
            mib(before),
            mib(after),
            mib(peak),
            pool.component_instances,
            pool.max_component_instances,
            pool.memories,
        );
    }
    Ok(())
}
