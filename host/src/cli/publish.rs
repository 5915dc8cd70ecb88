//! `mqplug publish`: task events through the built-in producer's pipeline,
//! with a progress bar, each failure named, and receipts.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::Connection;
use crate::event::{DEFAULT_MAX_BODY_BYTES, TaskEvent};
use crate::mq::{MqRuntime, Publisher};
use crate::publish::{Pipeline, Published};

#[derive(Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// One event as JSON (snake_case or Go field names).
    #[arg(long, conflicts_with = "file")]
    pub json: Option<String>,
    /// Many events, one JSON object a line.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Publish the same event this many times.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Create the topic with this many queues first (local brokers only).
    #[arg(long, value_name = "QUEUES")]
    pub create_topic: Option<i32>,
    /// Synchronous sends in flight at once, each with its own retries; 1
    /// sends one event after the other.
    #[arg(long, default_value_t = crate::publish::DEFAULT_CONCURRENCY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub concurrency: usize,
    /// Events in one send: 1 sends each event alone; more sends RocketMQ
    /// batches of up to this many consecutive events (and 1 MiB), each stored
    /// or refused, and retried, as a whole.
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub batch: usize,
    /// Write every event's receipt (message id, queue, offset, attempts) or
    /// failure here, one JSON object a line in the events' order.
    #[arg(long, value_name = "FILE")]
    pub receipts: Option<PathBuf>,
    #[command(flatten)]
    pub event: EventArgs,
}

/// The event to publish when neither --json nor --file is given; defaults
/// are the marketing platform's example event.
#[derive(Args)]
pub struct EventArgs {
    #[arg(long, default_value = "USER_REGISTER")]
    pub event_type: String,
    #[arg(long, default_value_t = 123)]
    pub user_id: u64,
    #[arg(long, default_value = "tenant1")]
    pub tenant_id: String,
    #[arg(long, default_value = "app1")]
    pub app_id: String,
    #[arg(long, default_value = "campaign-1")]
    pub campaign_id: String,
    #[arg(long, default_value = "测试活动")]
    pub campaign_name: String,
    /// A JSON object.
    #[arg(long, default_value = r#"{"count":1}"#)]
    pub event_data: String,
    /// RFC 3339 [default: now].
    #[arg(long)]
    pub timestamp: Option<String>,
}

pub async fn publish(args: PublishArgs) -> Result<std::process::ExitCode> {
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
            let route = crate::mq::RouteClient::start(&mq, &config.name_server).await?;
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
pub struct ToPublish {
    pub events: Arc<[TaskEvent]>,
    /// The file's line number (from 1) of each event, empty unless --file.
    pub lines: Vec<usize>,
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

pub fn events_to_publish(args: &PublishArgs) -> Result<ToPublish> {
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
pub async fn send_all(
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
    let published = crate::publish::publish_all(
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
pub fn write_receipts(path: &Path, to_publish: &ToPublish, published: &Published) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn publish_args(args: &[&str]) -> PublishArgs {
        let cli = Cli::try_parse_from([&["mqplug", "publish"], args].concat()).unwrap();
        match cli.command {
            Command::Publish(args) => *args,
            _ => unreachable!("parsed as publish"),
        }
    }

    #[test]
    fn events_from_a_file_skip_blank_lines_repeat_with_count_and_keep_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("events.jsonl");
        let event = |user: u64| {
            format!(
                r#"{{"event_type":"USER_REGISTER","user_id":{user},"tenant_id":"t","app_id":"a","campaign_id":"c","campaign_name":"n","event_data":{{}},"timestamp":"2026-11-25T14:19:15Z"}}"#
            )
        };
        std::fs::write(&file, format!("{}\n\n{}\n", event(1), event(2))).unwrap();
        let args = publish_args(&["--file", file.to_str().unwrap(), "--count", "2"]);
        let to_publish = events_to_publish(&args).unwrap();
        let users: Vec<u64> = to_publish.events.iter().map(|e| e.user_id).collect();
        assert_eq!(users, [1, 2, 1, 2]);
        assert_eq!(to_publish.lines, [1, 3, 1, 3]);
        assert_eq!(to_publish.describe(1), "event 2 (line 3)");

        std::fs::write(&file, format!("{}\nnot json\n", event(1))).unwrap();
        let Err(err) = events_to_publish(&args) else {
            panic!("a line that is not JSON is an error");
        };
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    }

    #[test]
    fn without_a_file_the_flags_make_the_platforms_example_event() {
        let to_publish = events_to_publish(&publish_args(&["--user-id", "7"])).unwrap();
        assert_eq!(to_publish.events.len(), 1);
        assert_eq!(to_publish.events[0].user_id, 7);
        assert_eq!(to_publish.events[0].event_type, "USER_REGISTER");
        assert!(to_publish.lines.is_empty());
    }
}
