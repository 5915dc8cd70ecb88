//! Two brokers (two masters, one name server), the topic's queues on both.
//! While events flow, one broker is killed and started again: nothing is
//! lost, the plugin keeps handling what the other broker holds, the
//! producers (the host's, and `mqplug publish`'s pipeline, one event per
//! send and batches) route around the dead broker, and what the killed
//! broker held is handled once it is back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mqplug::Host;
use mqplug::config::PluginConfig;
use mqplug::mq::Publisher;
use mqplug::publish::{Pipeline, publish_all};
use mqplug_tests::{LocalCluster, Recorder, host_config_for, plugins::plugin_path, sample_event};

const WAIT: Duration = Duration::from_secs(120);
/// One event every PACE, before, while and after broker-1 is down.
const PACE: Duration = Duration::from_millis(100);
const UP: Duration = Duration::from_secs(4);
const DOWN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_started_again_loses_nothing_and_the_other_keeps_serving() -> Result<()>
{
    let mut cluster = LocalCluster::start(2)?;
    let recorder = Recorder::new();
    let mut config = host_config_for(
        &cluster.name_server,
        "cluster.topic",
        vec![PluginConfig::new("rewards", plugin_path("reward-logger")?)],
    );
    // A send to the dead broker fails over to the other; these retries only
    // cover the moment the client has not noticed yet.
    config.producer.backoff_attempts = 10;
    config.producer.backoff_max_ms = 1000;
    let host = Arc::new(Host::start(&config, recorder.observers()).await?);
    host.publisher().context("the producer is enabled")?;

    // The topic's queues are on both brokers, and both answer.
    let mq = mqplug::mq::MqRuntime::new(1)?;
    let route = mqplug::mq::RouteClient::start(&mq, &cluster.name_server).await?;
    let probe = route.probe("cluster_topic").await;
    route.shutdown().await;
    mq.shutdown().await;
    let probe = probe.map_err(anyhow::Error::msg)?;
    assert_eq!(probe.brokers.len(), 2, "{probe:?}");
    assert!(
        probe.brokers.iter().all(|(_, state)| state.is_ok()),
        "{probe:?}"
    );

    // A steady stream, one event every PACE, for the whole test.
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let publishing = tokio::spawn({
        let host = host.clone();
        async move {
            let publisher = host.publisher().expect("the producer is enabled");
            let mut sent = Vec::new();
            let mut user = 0;
            while !*stopped.borrow() {
                let at = Instant::now();
                let receipt = publisher
                    .publish(&sample_event("USER_REGISTER", user))
                    .await;
                sent.push((at, receipt.map(|r| r.message_id).map_err(|e| e.to_string())));
                user += 1;
                tokio::select! {
                    _ = stopped.changed() => {}
                    _ = tokio::time::sleep(PACE) => {}
                }
            }
            sent
        }
    });
    // `mqplug publish`'s pipeline, on its own client as the command runs it.
    let tool_mq = mqplug::mq::MqRuntime::new(0)?;
    let tool = Arc::new(Publisher::start(&tool_mq, config.producer_settings()?).await?);
    tokio::time::sleep(UP).await;
    cluster.kill(1);
    let killed_at = Instant::now();
    // While broker-1 is down, 40 events one per send and 40 in batches of 8,
    // 8 sends in flight.
    let mut tool_ids = Vec::new();
    for batch in [1, 8] {
        let events: Vec<_> = (0..40)
            .map(|n| sample_event("TOOL_PUBLISH", 100_000 + batch * 100 + n))
            .collect();
        let published = publish_all(
            &tool,
            events,
            Pipeline {
                concurrency: 8,
                batch: batch as usize,
            },
            |_, _| {},
        )
        .await;
        for result in published.results {
            match result {
                Ok(receipt) => tool_ids.push(receipt.message_id),
                Err(failure) => anyhow::bail!("mqplug publish (batch {batch}): {failure:?}"),
            }
        }
    }
    let tool_done = killed_at.elapsed();
    ensure!(
        tool_done < DOWN,
        "publishing took {tool_done:?}, past the outage"
    );
    tokio::time::sleep(DOWN - tool_done).await;
    cluster.start_broker(1)?;
    let back_at = Instant::now();
    tokio::time::sleep(UP).await;
    stop.send(true)?;
    let sent = publishing.await?;

    if let Ok(tool) = Arc::try_unwrap(tool) {
        tool.shutdown().await;
    }
    tool_mq.shutdown().await;
    let mut ids: Vec<String> = sent.iter().filter_map(|(_, r)| r.clone().ok()).collect();
    ids.extend(tool_ids.iter().cloned());
    let not_sent: Vec<&String> = sent.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    let all = recorder.wait_until(WAIT, |r| {
        ids.iter().all(|id| r.handled_message("rewards", id))
    });
    let handled = recorder.handled_by("rewards");
    Arc::try_unwrap(host)
        .ok()
        .context("the host is not shared any more")?
        .shutdown()
        .await;
    ensure!(not_sent.is_empty(), "sends failed: {not_sent:?}");
    let missing = ids
        .iter()
        .filter(|id| !handled.iter().any(|h| &h.message_id == *id))
        .count();
    ensure!(
        all,
        "{missing} of {} events lost:\n{}",
        ids.len(),
        cluster.logs()
    );
    // Published while broker-1 was down, and handled before it came back:
    // broker-0 kept serving.
    let while_down: Vec<&String> = sent
        .iter()
        .filter(|(at, _)| *at > killed_at && *at + Duration::from_secs(1) < back_at)
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let served_while_down = while_down
        .iter()
        .filter(|id| {
            handled
                .iter()
                .any(|h| &h.message_id == **id && h.at < back_at)
        })
        .count();
    assert!(
        !while_down.is_empty() && served_while_down * 2 >= while_down.len(),
        "of {} events published while broker-1 was down, {served_while_down} were handled before it came back",
        while_down.len()
    );
    println!(
        "cluster: {} events sent one every {} ms and {} more through mqplug publish's pipeline while broker-1 was down, none lost; broker-1 killed for {} s: {} of the {} sent one by one meanwhile handled before it came back; longest pause between two handled events {:.2} s",
        ids.len() - tool_ids.len(),
        PACE.as_millis(),
        tool_ids.len(),
        DOWN.as_secs(),
        served_while_down,
        while_down.len(),
        longest_gap(&handled).as_secs_f64()
    );
    Ok(())
}

/// The longest time between two handled events.
fn longest_gap(handled: &[mqplug_tests::recorder::Handled]) -> Duration {
    let mut at: Vec<Instant> = handled.iter().map(|h| h.at).collect();
    at.sort();
    at.windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default()
}
