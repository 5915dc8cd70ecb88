//! `mqplug replay`: bodies from a file through a plugin, no broker.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::plugin_name;
use crate::event::DEFAULT_MAX_BODY_BYTES;
use crate::observe::Observers;
use crate::outcome::{DeliveryOutcome, UndecodablePolicy};
use crate::replay::Replayer;
use crate::topic::TopicName;
use crate::wasm::{Plugin, PluginSettings, RuntimeSettings, WasmRuntime};

#[derive(Args)]
pub struct ReplayArgs {
    /// The plugin component (.wasm).
    #[arg(long)]
    pub plugin: PathBuf,
    /// Message bodies, one a line.
    #[arg(long)]
    pub events: PathBuf,
    /// Pretend every message is on this redelivery.
    #[arg(long, default_value_t = 0)]
    pub reconsume_times: u32,
    /// Handler deadline in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub deadline_ms: u64,
    /// Let the plugin print to this command's stdout and stderr (by default
    /// what it prints is discarded).
    #[arg(long)]
    pub inherit_stdio: bool,
}

pub fn replay(args: ReplayArgs) -> Result<std::process::ExitCode> {
    let runtime = WasmRuntime::new(RuntimeSettings::default())
        .map_err(|err| anyhow::anyhow!("cannot start the wasm engine: {err:#}"))?;
    let settings = PluginSettings {
        deadline: Duration::from_millis(args.deadline_ms),
        inherit_stdio: args.inherit_stdio,
        ..PluginSettings::new(plugin_name(&args.plugin))
    };
    let plugin = Plugin::load_file(&runtime, settings, &args.plugin, Observers::default())?;
    let replayer = Replayer::new(
        Arc::new(plugin),
        TopicName::new(crate::topic::DEFAULT_TOPIC)?,
        UndecodablePolicy::Retry,
        DEFAULT_MAX_BODY_BYTES,
    );
    let file = std::fs::File::open(&args.events)
        .with_context(|| format!("cannot open {}", args.events.display()))?;
    let (mut acked, mut retried, mut dead) = (0, 0, 0);
    for (index, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line.with_context(|| format!("cannot read {}", args.events.display()))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let result = replayer.replay(index + 1, &line, args.reconsume_times);
        match result.outcome {
            DeliveryOutcome::ConsumeSuccess => acked += 1,
            DeliveryOutcome::ConsumeRetryLater | DeliveryOutcome::RetryAfter { .. } => retried += 1,
            DeliveryOutcome::DeadLetter => dead += 1,
        }
        println!(
            "line {}: {:?}{}",
            index + 1,
            result.outcome,
            result.cause.map(|c| format!(" ({c})")).unwrap_or_default()
        );
    }
    println!("{acked} acknowledged, {retried} to retry, {dead} to the dead-letter queue");
    Ok(std::process::ExitCode::SUCCESS)
}
