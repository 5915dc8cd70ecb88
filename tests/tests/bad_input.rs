//! A body that is not a task event, on a real broker: the documented outcome
//! (ConsumeRetryLater), a clear log line, and a host that keeps running.
//! Alone in its file because it captures the process's log output.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mqplug::config::PluginConfig;
use mqplug::{DeliveryOutcome, Host};
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_body_is_retried_with_a_clear_log_line_and_the_host_keeps_running() -> Result<()>
{
    mqplug_tests::host_log("mqplug=info");

    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "bad_input_topic",
        vec![PluginConfig::new("rewards", plugin_path("reward-logger")?)],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;

    let malformed = publisher
        .publish_body(
            b"{\"EventType\": \"USER_REGISTER\", \"UserID\": \"abc\"}".to_vec(),
            None,
            vec![],
        )
        .await?
        .message_id;
    let good = publisher
        .publish(&sample_event("USER_REGISTER", 7))
        .await?
        .message_id;
    let both = recorder.wait_until(Duration::from_secs(90), |r| {
        let handled = r.handled();
        [&malformed, &good]
            .iter()
            .all(|id| handled.iter().any(|h| &h.message_id == *id))
    });
    host.shutdown().await;
    ensure!(both, "messages not handled:\n{}", broker.logs());

    let handled = recorder.handled();
    let bad = handled.iter().find(|h| h.message_id == malformed).unwrap();
    assert_eq!(bad.outcome, DeliveryOutcome::ConsumeRetryLater);
    let cause = bad.cause.as_deref().unwrap();
    assert!(
        cause.contains("UserID") || cause.contains("expected u64"),
        "{cause}"
    );
    let ok = handled.iter().find(|h| h.message_id == good).unwrap();
    assert_eq!(ok.outcome, DeliveryOutcome::ConsumeSuccess);

    let log = mqplug_tests::host_log("mqplug=info");
    let line = log
        .lines()
        .find(|line| line.contains("undecodable message"))
        .with_context(|| format!("no log line about the malformed body in:\n{log}"))?;
    for expected in [
        "plugin=rewards",
        &format!("message_id={malformed}"),
        "reconsume_times=0",
        "ConsumeRetryLater",
        "invalid type",
    ] {
        assert!(line.contains(expected), "{expected:?} missing from: {line}");
    }
    Ok(())
}
