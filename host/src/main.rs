//! `mqplug`: the command line over the mqplug library.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use mqplug::config::{HostConfig, Overrides, PluginConfig};
use mqplug::conformance;
use mqplug::event::{DEFAULT_MAX_BODY_BYTES, TaskEvent};
use mqplug::mq::{MqRuntime, Publisher};
use mqplug::observe::Observers;
use mqplug::outcome::{DeliveryOutcome, UndecodablePolicy};
use mqplug::publish::{Pipeline, Published};
use mqplug::replay::Replayer;
use mqplug::topic::TopicName;
use mqplug::wasm::{
    ConfigValues, KeyValueGrants, KeyValueLimits, Origin, OutboundGrants, OutboundLimits, Plugin,
    PluginSettings, PublishGrants, RuntimeSettings, WasmRuntime,
};
use mqplug::{Host, shutdown};
use tracing_subscriber::EnvFilter;

/// A WebAssembly plugin host for RocketMQ consumers: teams ship handlers for
/// the marketing platform's task events as wasm components; mqplug consumes
/// `marketing.task.completed`, runs each plugin in a sandbox and acknowledges
/// or retries every message by the plugin's answer.
///
/// Logging: MQPLUG_LOG (e.g. `debug`, `mqplug=trace`); default `warn,mqplug=info`.
#[derive(Parser)]
#[command(name = "mqplug", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `text` for people, `json` (one object a line, with the
    /// message span's plugin, version, message id and reconsume times) for
    /// log collectors.
    #[arg(long, global = true, env = "MQPLUG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
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
}

#[derive(Subcommand)]
enum DlqCommand {
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
}

#[derive(Subcommand)]
enum StateCommand {
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

#[derive(Args)]
struct StateArgs {
    #[command(flatten)]
    connection: Connection,
    /// The plugin, by its name in the config file.
    #[arg(long)]
    plugin: String,
    /// One of the buckets its key_value entry grants.
    #[arg(long)]
    bucket: Option<String>,
}

#[derive(Args)]
struct DlqArgs {
    #[command(flatten)]
    connection: Connection,
    /// The plugin, by its name in the config file.
    #[arg(long)]
    plugin: String,
}

#[derive(Args)]
struct DlqRedriveArgs {
    #[command(flatten)]
    dlq: DlqArgs,
    /// Only this message id (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
}

/// Settings shared by `run` and `publish`; flags beat environment variables,
/// which beat the config file.
#[derive(Args)]
struct Connection {
    /// Config file (TOML); see examples/mqplug.toml, which lists every key.
    #[arg(long, short, env = "MQPLUG_CONFIG")]
    config: Option<PathBuf>,
    /// Name server address(es), `;`-separated [default: 127.0.0.1:9876].
    #[arg(long, env = "MQPLUG_NAME_SERVER")]
    name_server: Option<String>,
    /// Topic as users know it; dots become underscores on the wire
    /// [default: marketing.task.completed].
    #[arg(long, env = "MQPLUG_TOPIC")]
    topic: Option<String>,
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

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    connection: Connection,
    /// Add a plugin with default settings: NAME=PATH (repeatable).
    #[arg(long = "plugin", value_name = "NAME=PATH")]
    plugins: Vec<String>,
    /// Admin HTTP address (/healthz, /readyz, /plugins, /metrics), or `off`
    /// [default: 127.0.0.1:9900, or the config's admin.listen].
    #[arg(long, env = "MQPLUG_ADMIN_LISTEN")]
    admin_listen: Option<String>,
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    connection: Connection,
    /// One event as JSON (snake_case or Go field names).
    #[arg(long, conflicts_with = "file")]
    json: Option<String>,
    /// Many events, one JSON object a line.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Publish the same event this many times.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Create the topic with this many queues first (local brokers only).
    #[arg(long, value_name = "QUEUES")]
    create_topic: Option<i32>,
    /// Synchronous sends in flight at once, each with its own retries; 1
    /// sends one event after the other.
    #[arg(long, default_value_t = mqplug::publish::DEFAULT_CONCURRENCY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    concurrency: usize,
    /// Events in one send: 1 sends each event alone; more sends RocketMQ
    /// batches of up to this many consecutive events (and 1 MiB), each stored
    /// or refused, and retried, as a whole.
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    batch: usize,
    /// Write every event's receipt (message id, queue, offset, attempts) or
    /// failure here, one JSON object a line in the events' order.
    #[arg(long, value_name = "FILE")]
    receipts: Option<PathBuf>,
    #[command(flatten)]
    event: EventArgs,
}

/// The event to publish when neither --json nor --file is given; defaults
/// are the marketing platform's example event.
#[derive(Args)]
struct EventArgs {
    #[arg(long, default_value = "USER_REGISTER")]
    event_type: String,
    #[arg(long, default_value_t = 123)]
    user_id: u64,
    #[arg(long, default_value = "tenant1")]
    tenant_id: String,
    #[arg(long, default_value = "app1")]
    app_id: String,
    #[arg(long, default_value = "campaign-1")]
    campaign_id: String,
    #[arg(long, default_value = "测试活动")]
    campaign_name: String,
    /// A JSON object.
    #[arg(long, default_value = r#"{"count":1}"#)]
    event_data: String,
    /// RFC 3339 [default: now].
    #[arg(long)]
    timestamp: Option<String>,
}

#[derive(Args)]
struct ReplayArgs {
    /// The plugin component (.wasm).
    #[arg(long)]
    plugin: PathBuf,
    /// Message bodies, one a line.
    #[arg(long)]
    events: PathBuf,
    /// Pretend every message is on this redelivery.
    #[arg(long, default_value_t = 0)]
    reconsume_times: u32,
    /// Handler deadline in milliseconds.
    #[arg(long, default_value_t = 5000)]
    deadline_ms: u64,
    /// Let the plugin print to this command's stdout and stderr (by default
    /// what it prints is discarded).
    #[arg(long)]
    inherit_stdio: bool,
}

#[derive(Args)]
struct NewArgs {
    /// The plugin's name: lower-case letters, digits and '-'.
    name: String,
    /// rust, python, js or go.
    #[arg(long, default_value = "rust")]
    lang: mqplug::scaffold::Lang,
    /// The folder to write [default: ./NAME].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// mqplug's SDK for the language (plugins/sdk for Rust, plugins/go/sdk
    /// for Go, in a checkout of mqplug) [default: the checkout this mqplug
    /// was built from].
    #[arg(long)]
    sdk: Option<PathBuf>,
}

#[derive(Args)]
struct TestArgs {
    /// The plugin component (.wasm).
    plugin: PathBuf,
    /// Your fixtures: JSON Lines of {"event": {...}, "expect": "ok"|"err",
    /// "reason": REGEX, "delivery": {...}, "name": TEXT}.
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Also write the results as JUnit XML here.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Handler deadline in milliseconds, as in the plugin's config.
    #[arg(long, default_value_t = 5000)]
    deadline_ms: u64,
    /// Linear memory limit in MiB, as in the plugin's config.
    #[arg(long, default_value_t = 64)]
    memory_limit_mib: usize,
    /// A config value the plugin reads through wasi:config/store, as in its
    /// `[plugin.config]`; repeatable.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = key_value)]
    config: Vec<(String, String)>,
    /// A secret the plugin reads through wasi:config/store (a test value;
    /// redacted from its log lines like a real one); repeatable.
    #[arg(long = "secret", value_name = "KEY=VALUE", value_parser = key_value)]
    secrets: Vec<(String, String)>,
    /// An origin the plugin may send HTTP requests to, as in its
    /// `allowed_outbound_hosts` (`http://127.0.0.1:8080`); repeatable. The
    /// requests really go out, unless the fixtures answer them (`http`).
    #[arg(long = "allow-outbound", value_name = "ORIGIN")]
    allow_outbound: Vec<String>,
    /// A topic the plugin may publish follow-up messages to, as in its
    /// `allowed_topics`; repeatable. Nothing is sent: fixtures check the
    /// messages (`published`).
    #[arg(long = "allow-topic", value_name = "TOPIC")]
    allow_topics: Vec<String>,
    /// A bucket the plugin may open through wasi:keyvalue, as in its
    /// `key_value.buckets`; repeatable. The kit keeps it in memory, empty
    /// before every event; fixtures preset and check keys (`kv`,
    /// `expect_kv`).
    #[arg(long = "bucket", value_name = "NAME")]
    buckets: Vec<String>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .filter(|(key, _)| !key.is_empty())
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// `mqplug test`'s exit code when the kit itself cannot run.
const TEST_CANNOT_RUN: u8 = 2;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The kit's table goes to stdout; plugin log lines would drown it.
    let default_filter = match cli.command {
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
    };
    let filter =
        EnvFilter::try_from_env("MQPLUG_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let error_code = match cli.command {
        Command::Test(_) | Command::Dlq(DlqCommand::Redrive(_)) => {
            std::process::ExitCode::from(TEST_CANNOT_RUN)
        }
        _ => std::process::ExitCode::FAILURE,
    };
    // `replay` and `test` call plugins on this thread, outside any async
    // runtime: wasmtime-wasi's synchronous stdio blocks on a runtime of its
    // own, which it cannot do from inside one.
    let result = match cli.command {
        Command::Run(args) => in_runtime(run(args)),
        Command::Publish(args) => in_runtime(publish(*args)),
        Command::Replay(args) => replay(args),
        Command::Test(args) => conformance_test(args),
        Command::New(args) => new_plugin(args),
        Command::Dlq(DlqCommand::List(args)) => in_runtime(dlq_list(args)),
        Command::Dlq(DlqCommand::Redrive(args)) => in_runtime(dlq_redrive(args)),
        Command::State(command) => state(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            error_code
        }
    }
}

async fn run(args: RunArgs) -> Result<std::process::ExitCode> {
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

async fn publish(args: PublishArgs) -> Result<std::process::ExitCode> {
    let config = args.connection.load()?;
    let events = events_to_publish(&args)?;
    let settings = config.producer_settings()?;
    let mq = MqRuntime::with_credentials(0, config.credentials()?)?;
    let result = async {
        let mut publisher = Publisher::start(&mq, settings).await?;
        if let Some(queues) = args.create_topic
            && let Err(err) = publisher.create_topic(queues).await
        {
            publisher.shutdown().await;
            return Err(err.into());
        }
        println!(
            "publishing {} event(s) to {}",
            events.events.len(),
            publisher.topic()
        );
        let publisher = Arc::new(publisher);
        let pipeline = Pipeline {
            concurrency: args.concurrency,
            batch: args.batch,
        };
        let published = send_all(&publisher, &events, pipeline).await;
        if let Some(publisher) = Arc::into_inner(publisher) {
            publisher.shutdown().await;
        }
        if published.failed() > 0 {
            // The client's own errors do not say which name server.
            let route = mqplug::mq::RouteClient::start(&mq, &config.name_server).await?;
            if let Err(why) = route.name_server_answers(config.topic()?.wire()).await {
                eprintln!("mqplug: {why}");
            }
            route.shutdown().await;
        }
        if let Some(path) = &args.receipts {
            write_receipts(path, &events, &published)?;
        }
        Ok::<_, anyhow::Error>(published.failed())
    }
    .await;
    mq.shutdown().await;
    let failed = result?;
    Ok(if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// The events to publish, and for events from a file the line each came from.
struct ToPublish {
    events: Arc<[TaskEvent]>,
    /// The file's line number (from 1) of each event, empty unless --file.
    lines: Vec<usize>,
}

impl ToPublish {
    /// How a message names event `index` (from 0): its place among the
    /// events, and for a file the line it came from.
    fn describe(&self, index: usize) -> String {
        match self.lines.get(index) {
            Some(line) => format!("event {} (line {line})", index + 1),
            None => format!("event {}", index + 1),
        }
    }
}

fn events_to_publish(args: &PublishArgs) -> Result<ToPublish> {
    let parse = |text: &str, origin: &str| {
        TaskEvent::decode(text.as_bytes(), DEFAULT_MAX_BODY_BYTES)
            .with_context(|| origin.to_string())
    };
    let mut events = Vec::new();
    let mut lines = Vec::new();
    if let Some(path) = &args.file {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            events.push(parse(
                &line,
                &format!("{} line {}", path.display(), index + 1),
            )?);
            lines.push(index + 1);
        }
    } else if let Some(json) = &args.json {
        events.push(parse(json, "--json")?);
    } else {
        let e = &args.event;
        let event_data: serde_json::Value =
            serde_json::from_str(&e.event_data).context("--event-data is not JSON")?;
        let timestamp = e.timestamp.clone().unwrap_or_else(|| {
            chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        });
        let body = serde_json::json!({
            "event_type": e.event_type, "user_id": e.user_id, "tenant_id": e.tenant_id,
            "app_id": e.app_id, "campaign_id": e.campaign_id, "campaign_name": e.campaign_name,
            "event_data": event_data, "timestamp": timestamp,
        });
        events.push(parse(&body.to_string(), "the event given by flags")?);
    }
    let repeated = events.len() * usize::try_from(args.count).unwrap_or(usize::MAX);
    let lines = if lines.is_empty() {
        lines
    } else {
        lines.into_iter().cycle().take(repeated).collect()
    };
    Ok(ToPublish {
        events: events.into_iter().cycle().take(repeated).collect(),
        lines,
    })
}

/// Sends every event as `pipeline` says, a progress bar
/// with the rate on a terminal, each failure printed as it comes, and a
/// summary line last.
async fn send_all(
    publisher: &Arc<Publisher>,
    to_publish: &ToPublish,
    pipeline: Pipeline,
) -> Published {
    let events = &to_publish.events;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if terminal {
        indicatif::ProgressBar::new(events.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {rate} eta {eta} {msg}")
            .expect("a valid progress template")
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                    let _ = write!(out, "{:.0} msg/s", state.per_sec());
                },
            ),
    );
    if terminal {
        // Redraws (the rate, the eta) while sends wait on a slow broker.
        bar.enable_steady_tick(Duration::from_millis(250));
    }
    let published = mqplug::publish::publish_all(
        publisher,
        Arc::clone(events),
        pipeline,
        |progress, result| {
            match result {
                Ok(receipt) if events.len() == 1 => bar.suspend(|| {
                    println!(
                        "sent {} (message id {}, queue {}, offset {})",
                        events[progress.index].event_type,
                        receipt.message_id,
                        receipt
                            .queue_id
                            .map_or_else(|| "unknown".to_string(), |queue| queue.to_string()),
                        receipt.queue_offset
                    )
                }),
                Ok(_) => {}
                Err(failure) => {
                    bar.set_message(format!("failed {}", progress.failed));
                    // `suspend` prints even when the bar is hidden.
                    bar.suspend(|| {
                        eprintln!(
                            "{}: not sent: {}",
                            to_publish.describe(failure.index),
                            failure.error
                        )
                    });
                }
            }
            bar.inc(1);
        },
    )
    .await;
    bar.finish_and_clear();
    let batches = if published.pipeline.batch > 1 {
        // publish_all sends the first event alone when sends overlap: its
        // answer caches the topic's route for the rest.
        let first_alone = published.pipeline.concurrency > 1 && published.results.len() > 1;
        format!(
            " in {} sends of up to {} events{}",
            published.sends,
            published.pipeline.batch,
            if first_alone {
                ", the first event alone to look up the topic's route"
            } else {
                ""
            }
        )
    } else {
        String::new()
    };
    println!(
        "sent {}, failed {} in {:.2} s ({:.0} msg/s, {} in flight at most{batches})",
        published.sent(),
        published.failed(),
        published.elapsed.as_secs_f64(),
        published.rate(),
        published.max_in_flight
    );
    published
}

/// `--receipts`: a JSON object a line for every event, in the events' order.
fn write_receipts(path: &Path, to_publish: &ToPublish, published: &Published) -> Result<()> {
    let write = || {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (index, result) in published.results.iter().enumerate() {
            let mut line = serde_json::json!({ "event": index + 1 });
            if let Some(number) = to_publish.lines.get(index) {
                line["line"] = (*number).into();
            }
            match result {
                Ok(receipt) => {
                    line["message_id"] = receipt.message_id.clone().into();
                    line["queue_id"] = receipt.queue_id.into();
                    line["queue_offset"] = receipt.queue_offset.into();
                    line["attempts"] = receipt.attempts.into();
                }
                Err(failure) => line["error"] = failure.error.to_string().into(),
            }
            writeln!(out, "{line}")?;
        }
        out.flush()
    };
    write().with_context(|| format!("cannot write the receipts to {}", path.display()))
}

/// Runs `future` on a multi-threaded Tokio runtime.
fn in_runtime(
    future: impl std::future::Future<Output = Result<std::process::ExitCode>>,
) -> Result<std::process::ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

fn replay(args: ReplayArgs) -> Result<std::process::ExitCode> {
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
        TopicName::new(mqplug::topic::DEFAULT_TOPIC)?,
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

/// The config and the entry of `--plugin`, and the plugin's dead letters
/// (`None`: the plugin's group never dead-lettered anything).
async fn dead_letters(
    args: &DlqArgs,
    config: HostConfig,
    mq: &MqRuntime,
) -> Result<(
    HostConfig,
    PluginConfig,
    Option<Vec<mqplug::dlq::DeadLetter>>,
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
    let letters = mqplug::dlq::read(mq, &config.name_server, &entry.group()).await?;
    Ok((config, entry, letters))
}

async fn dlq_list(args: DlqArgs) -> Result<std::process::ExitCode> {
    let config = args.connection.load()?;
    let mq = MqRuntime::with_credentials(1, config.credentials()?)?;
    let result = dead_letters(&args, config, &mq).await;
    mq.shutdown().await;
    let (_, entry, letters) = result?;
    let letters = letters.unwrap_or_default();
    if letters.len() >= mqplug::dlq::MAX_DEAD_LETTERS {
        println!(
            "(only the first {} are read)",
            mqplug::dlq::MAX_DEAD_LETTERS
        );
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
            mqplug::text::inert(&letter.delivery.message_id, 128),
            letter.delivery.reconsume_times,
            letter.summary()
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn dlq_redrive(args: DlqRedriveArgs) -> Result<std::process::ExitCode> {
    let config = args.dlq.connection.load()?;
    let mq = MqRuntime::with_credentials(1, config.credentials()?)?;
    let result = redrive(&args, config, &mq).await;
    mq.shutdown().await;
    result
}

async fn redrive(
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
    let plugin = match mqplug::slot::load_plugin(&runtime, &entry, &Observers::default()) {
        Ok(plugin) => Arc::new(plugin),
        // A running host has the plugin's embedded store open: it runs them.
        Err(mqplug::wasm::PluginLoadError::Store {
            cause: mqplug::store::StoreError::InUse(why),
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
        replayer = replayer.with_outbox(Arc::new(mqplug::mq::PublisherOutbox::new(
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
            mqplug::text::inert(&result.message_id, 128),
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
    letters: &[mqplug::dlq::DeadLetter],
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
        let id = mqplug::text::inert(&delivery.message_id, 128);
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

/// `mqplug state`: the plugin's buckets, read or cleared in its store.
fn state(command: StateCommand) -> Result<std::process::ExitCode> {
    use mqplug::store::{Namespace, StoreError, inspect};
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
    let store = mqplug::wasm::StoreOpener::new(settings)
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
                        mqplug::text::inert(key, 256)
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
                    println!("  {}  {size}", mqplug::text::inert(&listed.key, 512));
                }
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn new_plugin(args: NewArgs) -> Result<std::process::ExitCode> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let sdk = match args.sdk {
        // Written into the project's Cargo.toml, which Cargo reads from the
        // project's folder: absolute, and checked now.
        Some(sdk) => {
            let sdk =
                std::path::absolute(&sdk).with_context(|| format!("--sdk {}", sdk.display()))?;
            let marker = mqplug::scaffold::sdk_marker(args.lang);
            ensure!(
                sdk.join(marker).is_file(),
                "--sdk {}: no {marker} there (give mqplug's plugins/sdk, or plugins/go/sdk for Go)",
                sdk.display()
            );
            Some(sdk)
        }
        None => mqplug::scaffold::default_sdk(args.lang),
    };
    let (files, commands) = mqplug::scaffold::write(&dir, &args.name, args.lang, sdk.as_deref())?;
    println!("wrote {} files in {}:", files.len(), dir.display());
    for file in files {
        println!("  {}", file.display());
    }
    println!("build and test it:\n  cd {}", dir.display());
    for command in commands {
        println!("  {command}");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn conformance_test(args: TestArgs) -> Result<std::process::ExitCode> {
    let text = match &args.fixtures {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read fixtures {}", path.display()))?,
        None => String::new(),
    };
    let fixtures = conformance::fixtures::parse(&text);
    // The fixture file's grants, then the flags on top.
    let mut grants = conformance::fixtures::grants(&text)
        .map_err(|err| anyhow::anyhow!("fixtures, {}: {}", err.name, err.reason))?
        .unwrap_or_default();
    // Origins a fixture file grants are answered by its fixtures, never
    // reached: a file cannot open the network (or an internal address) to
    // the plugin it tests. Only --allow-outbound does.
    let virtual_http = !grants.allowed_outbound_hosts.is_empty();
    grants.config.extend(args.config);
    grants.secrets.extend(args.secrets);
    grants.allowed_outbound_hosts.extend(args.allow_outbound);
    grants.allowed_topics.extend(args.allow_topics);
    let mut buckets = grants.key_value.take().unwrap_or_default().buckets;
    buckets.extend(args.buckets);
    for bucket in &buckets {
        mqplug::store::check_bucket_name(bucket)
            .map_err(|why| anyhow::anyhow!("bucket {bucket:?}: {why}"))?;
    }
    let runtime = WasmRuntime::new(RuntimeSettings::default())
        .map_err(|err| anyhow::anyhow!("cannot start the wasm engine: {err:#}"))?;
    let settings = PluginSettings {
        deadline: Duration::from_millis(args.deadline_ms),
        memory_limit_bytes: args.memory_limit_mib.saturating_mul(1024 * 1024),
        config: Arc::new(ConfigValues::new(&grants.config, grants.secrets)),
        outbound: Arc::new(OutboundGrants::new(
            &plugin_name(&args.plugin),
            grants
                .allowed_outbound_hosts
                .iter()
                .map(|origin| Origin::parse(origin).map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?,
            Vec::new(),
            OutboundLimits::default(),
            Observers::default(),
        )),
        publish: Arc::new(PublishGrants::new(
            grants
                .allowed_topics
                .iter()
                .map(|topic| TopicName::new(topic).map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?,
        )),
        key_value: Arc::new(KeyValueGrants::new(buckets, KeyValueLimits::default())),
        ..PluginSettings::new(plugin_name(&args.plugin))
    };
    let report = conformance::run_with(&runtime, settings, &args.plugin, &fixtures, virtual_http)
        .with_context(|| format!("cannot read {}", args.plugin.display()))?;
    print!("{}", report.table());
    if let Some(path) = &args.junit {
        std::fs::write(path, report.junit())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if report.passed() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// A plugin's name from its file: `reward_logger.wasm` is `reward_logger`.
fn plugin_name(path: &std::path::Path) -> String {
    path.file_stem().map_or_else(
        || "plugin".to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}
