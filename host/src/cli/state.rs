//! `mqplug state list|get|clear`: a plugin's buckets in its state store.

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use super::{Connection, StateCommand};

#[derive(Args)]
pub struct StateArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// The plugin, by its name in the config file.
    #[arg(long)]
    pub plugin: String,
    /// One of the buckets its key_value entry grants.
    #[arg(long)]
    pub bucket: Option<String>,
}

/// `mqplug state`: the plugin's buckets, read or cleared in its store.
pub fn state(command: StateCommand) -> Result<std::process::ExitCode> {
    use crate::store::{Namespace, StoreError, inspect};
    let (args, key) = match &command {
        StateCommand::List(args) | StateCommand::Clear(args) => (args, None),
        StateCommand::Get { state, key } => (state, Some(key.as_str())),
    };
    let config = args.connection.load()?;
    let entry = config
        .plugins
        .iter()
        .find(|plugin| plugin.name == args.plugin)
        .with_context(|| format!("no plugin {:?} in the config", args.plugin))?;
    let granted: Vec<String> = entry
        .key_value
        .as_ref()
        .map(|kv| kv.buckets.clone())
        .unwrap_or_default();
    let buckets = match &args.bucket {
        Some(bucket) if granted.contains(bucket) => vec![bucket.clone()],
        Some(bucket) => bail!(
            "plugin {} is not granted bucket {bucket:?} (it has: {})",
            entry.name,
            granted.join(", ")
        ),
        None if matches!(command, StateCommand::List(_)) => granted,
        None => bail!("give the bucket with --bucket"),
    };
    ensure!(
        !buckets.is_empty(),
        "plugin {} has no key_value buckets",
        entry.name
    );
    let settings = config.runtime_settings().store;
    let store = crate::wasm::StoreOpener::new(settings)
        .open()
        .map_err(|err| match err {
            StoreError::InUse(_) => anyhow::anyhow!(
                "{err}; stop the host first (the embedded store is one process's at a time), \
                 or keep state in Redis ([store] backend = \"redis\"), which hosts and this command share"
            ),
            err => anyhow::anyhow!("cannot open the state store: {err}"),
        })?;
    for bucket in &buckets {
        let ns = Namespace::new(entry.name.clone(), bucket.clone());
        match (&command, key) {
            (StateCommand::Get { .. }, Some(key)) => match store.get(&ns, key)? {
                Some(value) => println!("{}", inspect::show(&value)),
                None => {
                    eprintln!(
                        "no key {:?} in bucket {bucket}",
                        crate::text::inert(key, 256)
                    );
                    return Ok(std::process::ExitCode::FAILURE);
                }
            },
            (StateCommand::Clear(_), _) => {
                let cleared = inspect::clear(&*store, &ns)?;
                println!(
                    "cleared {cleared} key(s) from bucket {bucket} of plugin {}",
                    entry.name
                );
            }
            _ => {
                let (entries, more) = inspect::list(&*store, &ns)?;
                println!(
                    "bucket {bucket} of plugin {}: {} key(s){}",
                    entry.name,
                    entries.len(),
                    if more {
                        format!(" (only the first {} are listed)", inspect::MAX_LISTED)
                    } else {
                        String::new()
                    }
                );
                for listed in entries {
                    let size = listed
                        .bytes
                        .map_or_else(|| "expired".to_string(), |n| format!("{n} bytes"));
                    println!("  {}  {size}", crate::text::inert(&listed.key, 512));
                }
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
