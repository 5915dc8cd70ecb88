//! The `mqplug` command line: its arguments (clap) and each command, in the
//! library so that its tests and other tools reach them; the binary
//! (`src/bin/mqplug.rs`) parses, sets up logging and calls [`execute`].
//!
//! One room per command: `run`, `publish`, `replay`, `kit` (`mqplug test`),
//! `new`, `dlq`, `state` and `canary`.

mod canary;
mod dlq;
mod kit;
pub mod logging;
mod new;
mod publish;
mod replay;
mod run;
mod state;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{HostConfig, Overrides};

pub use canary::CanaryArgs;
pub use dlq::{DlqArgs, DlqExportArgs, DlqRedriveArgs};
pub use kit::TestArgs;
pub use new::NewArgs;
pub use publish::{EventArgs, PublishArgs};
pub use replay::ReplayArgs;
pub use run::RunArgs;
pub use state::StateArgs;

/// A WebAssembly plugin host for RocketMQ consumers: teams ship handlers for
/// the marketing platform's task events as wasm components; mqplug consumes
/// `marketing.task.completed`, runs each plugin in a sandbox and acknowledges
/// or retries every message by the plugin's answer.
///
/// Logging: MQPLUG_LOG (e.g. `debug`, `mqplug=trace`); default `warn,mqplug=info`.
#[derive(Parser)]
#[command(name = "mqplug", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `text` for people, `json` (one object a line, with the
    /// message span's plugin, version, message id and reconsume times) for
    /// log collectors.
    #[arg(long, global = true, env = "MQPLUG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Consume task events and hand them to the configured plugins until
    /// SIGINT/SIGTERM, then drain in-flight handlers and exit.
    Run(RunArgs),
    /// Publish task events with the built-in producer: the platform's example
    /// event, one given as flags or JSON, or many from a JSON Lines file.
    Publish(Box<PublishArgs>),
    /// Run message bodies from a JSON Lines file through a plugin, no broker
    /// needed, and print what RocketMQ would be told for each.
    Replay(ReplayArgs),
    /// The conformance kit: check, without a broker, that a plugin honours
    /// mqplug's contract (exports, imports, limits, the built-in edge events,
    /// determinism, your fixtures). Exit code 0 when every check passes, 1
    /// when one fails, 2 when the kit cannot run.
    Test(TestArgs),
    /// Write a new plugin project (Rust, Python or JavaScript) that builds
    /// with one command and passes `mqplug test` as written.
    New(NewArgs),
    /// A plugin's dead-letter queue (`%DLQ%<group>`): list it, or send its
    /// messages back through the plugin's current build.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// A plugin's key-value buckets in the state store its config names:
    /// list the keys, show a value, or clear a bucket.
    #[command(subcommand)]
    State(StateCommand),
    /// A running host's canary (a plugin entry's `[plugin.canary]`):
    /// promote its candidate to the current build, or abort it.
    #[command(subcommand)]
    Canary(CanaryCommand),
}

#[derive(Subcommand)]
pub enum CanaryCommand {
    /// The candidate becomes the current build from the next message on
    /// (until the host restarts: point the entry's path at it to keep it).
    Promote(CanaryArgs),
    /// The current build handles every message from the next one on.
    Abort(CanaryArgs),
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Every message in the plugin's dead-letter queue: message id, how
    /// many times it was delivered (the broker counts the dead-lettering
    /// send-back as one), when it was born, the event.
    List(DlqArgs),
    /// Sends the plugin's dead letters (all, or those given with --id)
    /// through the plugin's current build (the file its config entry names
    /// now), with their message ids, and prints each outcome. Exit code 0
    /// when every one was acknowledged, 1 when one was not, 2 when it
    /// cannot run.
    Redrive(DlqRedriveArgs),
    /// Writes a failure the plugin's `record_failures` wrote down (the
    /// event, and what the plugin saw: config, HTTP answers, key-value
    /// reads) as a kit fixture file, so that `mqplug test PLUGIN.wasm
    /// --fixtures FILE` replays it with no broker, network or store.
    Export(DlqExportArgs),
}

#[derive(Subcommand)]
pub enum StateCommand {
    /// The keys of the plugin's buckets (all it is granted, or --bucket),
    /// with each value's size.
    List(StateArgs),
    /// One key's value: text escaped, anything else in hex.
    Get {
        #[command(flatten)]
        state: StateArgs,
        key: String,
    },
    /// Deletes every key in one bucket (--bucket is required).
    Clear(StateArgs),
}

/// Settings shared by `run` and `publish`; flags beat environment variables,
/// which beat the config file.
#[derive(Args)]
pub struct Connection {
    /// Config file (TOML); see examples/mqplug.toml, which lists every key.
    #[arg(long, short, env = "MQPLUG_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name server address(es), `;`-separated [default: 127.0.0.1:9876].
    #[arg(long, env = "MQPLUG_NAME_SERVER")]
    pub name_server: Option<String>,
    /// Topic as users know it; dots become underscores on the wire
    /// [default: marketing.task.completed].
    #[arg(long, env = "MQPLUG_TOPIC")]
    pub topic: Option<String>,
}

impl Connection {
    fn load(&self) -> Result<HostConfig> {
        self.load_with(Overrides::default())
    }

    /// The config file (or the defaults) with these flags and `overrides`
    /// applied; a reload of the file applies them again.
    fn load_with(&self, overrides: Overrides) -> Result<HostConfig> {
        let mut config = match &self.config {
            Some(path) => HostConfig::from_file(path)?,
            None => HostConfig::default(),
        };
        config.apply(Overrides {
            name_server: self.name_server.clone(),
            topic: self.topic.clone(),
            ..overrides
        });
        Ok(config)
    }
}

pub fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .filter(|(key, _)| !key.is_empty())
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// `mqplug test`'s exit code when the kit itself cannot run.
pub const TEST_CANNOT_RUN: u8 = 2;

impl Command {
    /// What is logged unless MQPLUG_LOG says otherwise.
    pub fn default_log_filter(&self) -> &'static str {
        match self {
            // The kit's table goes to stdout; plugin log lines would drown it.
            Command::Test(_) => "warn",
            // The dead-letter reader pulls each queue itself; the client's
            // classic pull consumer also runs a pull task of its own for a
            // queue it pulled, which fails ("Argument is invalid") on a
            // consumer with no subscription, and logs it as an ERROR that says
            // nothing about the command's result.
            Command::Dlq(_) => {
                "warn,mqplug=info,rocketmq_client_rust::consumer::consumer_impl::default_lite_pull_consumer_impl=off"
            }
            _ => "warn,mqplug=info",
        }
    }

    /// The exit code when the command fails with an error: 2 for the kit
    /// and redrive (1 means a check or a message failed), else 1.
    pub fn error_code(&self) -> std::process::ExitCode {
        match self {
            Command::Test(_) | Command::Dlq(DlqCommand::Redrive(_)) => {
                std::process::ExitCode::from(TEST_CANNOT_RUN)
            }
            _ => std::process::ExitCode::FAILURE,
        }
    }
}

/// Runs `command` to its exit code.
///
/// `replay` and `test` call plugins on this thread, outside any async
/// runtime: wasmtime-wasi's synchronous stdio blocks on a runtime of its
/// own, which it cannot do from inside one.
pub fn execute(command: Command) -> Result<std::process::ExitCode> {
    match command {
        Command::Run(args) => in_runtime(run::run(args)),
        Command::Publish(args) => in_runtime(publish::publish(*args)),
        Command::Replay(args) => replay::replay(args),
        Command::Test(args) => kit::conformance_test(args),
        Command::New(args) => new::new_plugin(args),
        Command::Dlq(DlqCommand::List(args)) => in_runtime(dlq::list(args)),
        Command::Dlq(DlqCommand::Redrive(args)) => in_runtime(dlq::redrive(args)),
        Command::Dlq(DlqCommand::Export(args)) => dlq::export(args),
        Command::State(command) => state::state(command),
        Command::Canary(CanaryCommand::Promote(args)) => canary::canary("promote", args),
        Command::Canary(CanaryCommand::Abort(args)) => canary::canary("abort", args),
    }
}

/// Runs `future` on a multi-threaded Tokio runtime.
pub fn in_runtime(
    future: impl std::future::Future<Output = Result<std::process::ExitCode>>,
) -> Result<std::process::ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

/// A plugin's name from its file: `reward_logger.wasm` is `reward_logger`.
pub fn plugin_name(path: &std::path::Path) -> String {
    path.file_stem().map_or_else(
        || "plugin".to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}
