//! How much host memory one hostile plugin can take, against its own
//! `memory_limit_mb`: each kind of hoarding the sandbox allows, run until
//! the host stops it, in one instance that is reused (so what it keeps
//! stays kept until the host drops the instance). Prints the host's
//! resident memory before, its peak and after, and the growth as a share
//! of the plugin's limit.
//!
//!   cargo bench -p mqplug-tests --bench hostile_memory
//!
//! Each kind runs in a fresh process state as far as one process allows:
//! the kinds run one after the other, each measured from its own start.

use std::time::Duration;

use mqplug::delivery::Delivery;
use mqplug::metrics::resident_memory_bytes;
use mqplug::observe::Observers;
use mqplug::outcome::HandlerOutcome;
use mqplug::wasm::{InstanceMode, Plugin, PluginSettings, RuntimeSettings, WasmRuntime};
use mqplug_tests::{plugins::plugin_path, sample_event_with};

const MIB: u64 = 1024 * 1024;
/// The plugin's limit, the default `memory_limit_mb`.
const MEMORY_LIMIT_MB: u64 = 64;
/// Events of each kind: a hoarder that is stopped starts over on a fresh
/// instance, so what it can hold at once is what counts.
const ROUNDS: u32 = 5;

fn main() -> anyhow::Result<()> {
    let runtime =
        WasmRuntime::new(RuntimeSettings::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let plugin = Plugin::load_file(
        &runtime,
        PluginSettings {
            deadline: Duration::from_secs(25),
            memory_limit_bytes: (MEMORY_LIMIT_MB * MIB) as usize,
            instance_mode: InstanceMode::Reuse,
            ..PluginSettings::new("chaos")
        },
        &plugin_path("chaos")?,
        Observers::default(),
    )?;
    let delivery = Delivery {
        message_id: "hostile".into(),
        ..Delivery::default()
    };
    let kinds: [(&str, &str, serde_json::Value); 4] = [
        ("nothing (baseline)", "OK", serde_json::json!({})),
        (
            "header sets of 1 KiB, 1,000,000 asked",
            "HOARD",
            serde_json::json!({"count": 1_000_000, "bytes": 1024}),
        ),
        (
            "header sets of 15 KiB, 1,000,000 asked",
            "HOARD",
            serde_json::json!({"count": 1_000_000, "bytes": 15 * 1024}),
        ),
        (
            "linear memory, grown until denied",
            "OOM",
            serde_json::json!({}),
        ),
    ];
    println!(
        "| hoarding | outcome | RSS before | RSS peak | RSS after | peak growth / memory_limit_mb ({MEMORY_LIMIT_MB} MiB) |"
    );
    println!("|---|---|---|---|---|---|");
    for (what, kind, data) in kinds {
        let event = sample_event_with(kind, 1, data);
        let before = resident_memory_bytes().unwrap_or(0);
        let mut peak = before;
        let mut outcome = String::new();
        for _ in 0..ROUNDS {
            let handled = plugin.handle(&event, &delivery);
            outcome = match handled {
                HandlerOutcome::Accepted => "ok".into(),
                HandlerOutcome::Failed(failure) => failure.to_string(),
                other => format!("{other:?}"),
            };
            peak = peak.max(resident_memory_bytes().unwrap_or(0));
        }
        let after = resident_memory_bytes().unwrap_or(0);
        let growth = peak.saturating_sub(before);
        let outcome: String = outcome.chars().take(90).collect();
        println!(
            "| {what} | {outcome} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} |",
            before as f64 / MIB as f64,
            peak as f64 / MIB as f64,
            after as f64 / MIB as f64,
            growth as f64 / (MEMORY_LIMIT_MB * MIB) as f64,
        );
    }
    Ok(())
}
