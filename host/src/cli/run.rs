//! `mqplug run`: the host until SIGINT or SIGTERM.

use anyhow::{Context, Result, bail};
use clap::Args;

use super::Connection;
use crate::config::{Overrides, PluginConfig};
use crate::observe::Observers;
use crate::{Host, shutdown};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Add a plugin with default settings: NAME=PATH (repeatable).
    #[arg(long = "plugin", value_name = "NAME=PATH")]
    pub plugins: Vec<String>,
    /// Admin HTTP address (/healthz, /readyz, /plugins, /metrics), or `off`
    /// [default: 127.0.0.1:9900, or the config's admin.listen].
    #[arg(long, env = "MQPLUG_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
}

pub async fn run(args: RunArgs) -> Result<std::process::ExitCode> {
    let plugins = args
        .plugins
        .iter()
        .map(|spec| {
            let (name, path) = spec
                .split_once('=')
                .with_context(|| format!("--plugin {spec:?}: expected NAME=PATH"))?;
            Ok(PluginConfig::new(name, path))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = args.connection.load_with(Overrides {
        plugins,
        admin_listen: args.admin_listen.clone(),
        ..Overrides::default()
    })?;
    if config.plugins.is_empty() {
        bail!("no plugins: add [[plugin]] sections to the config file or pass --plugin NAME=PATH");
    }
    let host = Host::start(&config, Observers::default()).await?;
    println!(
        "mqplug: consuming {} with {} plugin(s); Ctrl-C or SIGTERM to stop",
        host.topic(),
        host.plugins().len()
    );
    if let Err(why) = host.broker_health() {
        // The client keeps trying; /readyz says when it is through.
        eprintln!("mqplug: not ready yet: {why}");
    }
    if let Some(addr) = host.admin_addr() {
        println!("mqplug: admin on http://{addr}/ (healthz, readyz, plugins, metrics)");
    }
    shutdown::signal().await;
    host.shutdown().await;
    Ok(std::process::ExitCode::SUCCESS)
}
