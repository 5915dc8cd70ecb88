//! `mqplug dlq list|redrive`: a plugin's dead-letter queue, read, or sent
//! back through its current build (or, beside a running host that holds its
//! store, handed back to that host).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::Connection;
use crate::config::{HostConfig, PluginConfig};
use crate::mq::{MqRuntime, Publisher};
use crate::observe::Observers;
use crate::outcome::DeliveryOutcome;
use crate::replay::Replayer;
use crate::wasm::WasmRuntime;

#[derive(Args)]
pub struct DlqArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The plugin, by its name in the config file.
    #[arg(long)]
    pub plugin: String,
}

#[derive(Args)]
pub struct DlqRedriveArgs {
    #[command(flatten)]
    pub dlq: DlqArgs,
    /// Only this message id (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<String>,
}

/// The config and the entry of `--plugin`, and the plugin's dead letters
/// (`None`: the plugin's group never dead-lettered anything).
async fn dead_letters(
    args: &DlqArgs,
    config: HostConfig,
    mq: &MqRuntime,
) -> Result<(
    HostConfig,
    PluginConfig,
    Option<Vec<crate::dlq::DeadLetter>>,
)> {
    let entry = config
        .plugins
        .iter()
        .find(|plugin| plugin.name == args.plugin)
        .cloned()
        .with_context(|| {
            format!(
                "no plugin {:?} in the config (it has: {})",
                args.plugin,
                config
                    .plugins
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let letters = crate::dlq::read(mq, &config.name_server, &entry.group()).await?;
    Ok((config, entry, letters))
}

pub async fn list(args: DlqArgs) -> Result<std::process::ExitCode> {
    let config = args.connection.load()?;
    let mq = MqRuntime::with_credentials(1, config.credentials()?)?;
    let result = dead_letters(&args, config, &mq).await;
    mq.shutdown().await;
    let (_, entry, letters) = result?;
    let letters = letters.unwrap_or_default();
    if letters.len() >= crate::dlq::MAX_DEAD_LETTERS {
        println!("(only the first {} are read)", crate::dlq::MAX_DEAD_LETTERS);
    }
    println!(
        "{} dead letter(s) in %DLQ%{} (plugin {}):",
        letters.len(),
        entry.group(),
        entry.name
    );
    for letter in &letters {
        let born = chrono::DateTime::from_timestamp_millis(letter.delivery.born_timestamp)
            .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        println!(
            "  {}  delivered {}x  born {born}  {}",
            crate::text::inert(&letter.delivery.message_id, 128),
            letter.delivery.reconsume_times,
            letter.summary()
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn redrive(args: DlqRedriveArgs) -> Result<std::process::ExitCode> {
    let config = args.dlq.connection.load()?;
    let mq = MqRuntime::with_credentials(1, config.credentials()?)?;
    let result = redrive_through(&args, config, &mq).await;
    mq.shutdown().await;
    result
}

async fn redrive_through(
    args: &DlqRedriveArgs,
    config: HostConfig,
    mq: &MqRuntime,
) -> Result<std::process::ExitCode> {
    let (config, entry, letters) = dead_letters(&args.dlq, config, mq).await?;
    let mut letters = letters.unwrap_or_default();
    if !args.ids.is_empty() {
        letters.retain(|letter| args.ids.contains(&letter.delivery.message_id));
        for id in &args.ids {
            if !letters
                .iter()
                .any(|letter| &letter.delivery.message_id == id)
            {
                bail!("no dead letter {id:?} in %DLQ%{}", entry.group());
            }
        }
    }
    // The plugin as the host would load it now: the file its entry names,
    // its grants, the engine's settings.
    let runtime = WasmRuntime::new(config.runtime_settings())
        .map_err(|err| anyhow::anyhow!("cannot start the wasm engine: {err:#}"))?;
    let plugin = match crate::slot::load_plugin(&runtime, &entry, &Observers::default()) {
        Ok(plugin) => Arc::new(plugin),
        // A running host has the plugin's embedded store open: it runs them.
        Err(crate::wasm::PluginLoadError::Store {
            cause: crate::store::StoreError::InUse(why),
            ..
        }) => return hand_back(&config, &entry, &letters, mq, &why).await,
        Err(err) => return Err(err.into()),
    };
    println!(
        "redriving {} dead letter(s) of plugin {} through build {}",
        letters.len(),
        entry.name,
        &plugin.version().to_string()[..12]
    );
    let publisher = if config.producer.enabled {
        Some(Arc::new(
            Publisher::start(mq, config.producer_settings()?).await?,
        ))
    } else {
        None
    };
    let mut replayer = Replayer::new(
        plugin,
        config.topic()?,
        config.on_undecodable,
        config.max_body_bytes,
    );
    if let Some(publisher) = &publisher {
        replayer = replayer.with_outbox(Arc::new(crate::mq::PublisherOutbox::new(
            publisher.clone(),
            tokio::runtime::Handle::current(),
        )));
    }
    // Handlers block: off the async threads, one after another.
    let results = tokio::task::spawn_blocking(move || {
        letters
            .iter()
            .map(|letter| replayer.replay_delivery(&letter.delivery, &letter.body))
            .collect::<Vec<_>>()
    })
    .await?;
    if let Some(publisher) = publisher.and_then(|p| Arc::try_unwrap(p).ok()) {
        publisher.shutdown().await;
    }
    let mut failed = 0;
    for result in &results {
        if result.outcome != DeliveryOutcome::ConsumeSuccess {
            failed += 1;
        }
        println!(
            "  {}: {:?}{}",
            crate::text::inert(&result.message_id, 128),
            result.outcome,
            result
                .cause
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        );
    }
    println!(
        "{} acknowledged, {failed} not; the dead-letter queue keeps every message (RocketMQ never deletes one)",
        results.len() - failed
    );
    Ok(if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Redrive beside a running host that holds the plugin's embedded store:
/// each dead letter goes back to the plugin's group through its retry topic,
/// and whichever host holds that queue runs it, with its own store, as a
/// redelivery. Outcomes are that host's (its log and `/metrics`); a letter
/// that fails again goes to retry and, in the end, back to the DLQ.
async fn hand_back(
    config: &HostConfig,
    entry: &PluginConfig,
    letters: &[crate::dlq::DeadLetter],
    mq: &MqRuntime,
    why: &str,
) -> Result<std::process::ExitCode> {
    let group = entry.group();
    println!(
        "the plugin's state store is in use ({why}): handing {} dead letter(s) to the running host(s) of group {group} through %RETRY%{group}",
        letters.len()
    );
    let topic = config.topic()?;
    let publisher = Publisher::start(mq, config.producer_settings()?).await?;
    let mut failed = 0;
    for letter in letters {
        let delivery = &letter.delivery;
        let sent = publisher
            .hand_back(
                &group,
                topic.wire(),
                letter.body.clone(),
                delivery.tags.as_deref(),
                delivery.keys.clone(),
                delivery.message_id.clone(),
            )
            .await;
        let id = crate::text::inert(&delivery.message_id, 128);
        match sent {
            Ok(_) => println!("  {id}: handed back"),
            Err(err) => {
                failed += 1;
                println!("  {id}: not handed back: {err}");
            }
        }
    }
    publisher.shutdown().await;
    println!(
        "{} handed back, {failed} not; the running host handles them as redeliveries (see its log and /metrics); the dead-letter queue keeps every message",
        letters.len() - failed
    );
    Ok(if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

#[derive(Args)]
pub struct DlqExportArgs {
    #[command(flatten)]
    pub dlq: DlqArgs,
    /// The failed message, by its id (dead-lettered or not: any failure
    /// the plugin's `record_failures` wrote down).
    #[arg(long)]
    pub id: String,
    /// Where to write the fixture file [default: standard output].
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// `mqplug dlq export`: a recorded failure as a kit fixture file.
pub fn export(args: DlqExportArgs) -> Result<std::process::ExitCode> {
    let config = args.dlq.connection.load()?;
    let entry = config
        .plugins
        .iter()
        .find(|plugin| plugin.name == args.dlq.plugin)
        .with_context(|| format!("no plugin {:?} in the config", args.dlq.plugin))?;
    let record = entry.record_failures.as_ref().with_context(|| {
        format!(
            "plugin {} does not record failures: add [plugin.record_failures] with a dir to its entry",
            entry.name
        )
    })?;
    let recording = crate::recorded::FailureLog::new(record, &entry.name)
        .read(&args.id)
        .map_err(anyhow::Error::msg)?;
    let fixture = recording.fixture(entry);
    match &args.out {
        Some(path) => {
            std::fs::write(path, fixture)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "wrote {}: mqplug test PLUGIN.wasm --fixtures {} replays it",
                path.display(),
                path.display()
            );
        }
        None => print!("{fixture}"),
    }
    Ok(std::process::ExitCode::SUCCESS)
}
