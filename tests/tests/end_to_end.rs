//! mqplug against a real RocketMQ name server and broker on 127.0.0.1:
//! built-in producer -> broker -> push consumer -> wasm plugin -> ack or retry.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mqplug::config::PluginConfig;
use mqplug::{DeliveryOutcome, Host};
use mqplug_tests::{
    LocalBroker, QUIET_PERIOD, Recorder, host_config, plugins::plugin_path, sample_event,
    sample_event_with,
};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_reach_the_plugin_intact_and_are_all_acknowledged() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "marketing.task.completed",
        vec![PluginConfig::new("chaos", plugin_path("chaos")?)],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    assert_eq!(host.topic().wire(), "marketing_task_completed");
    let publisher = host.publisher().context("the producer is enabled")?;

    const N: u64 = 40;
    let mut published = HashMap::new();
    for i in 0..N {
        let mut event = sample_event("USER_REGISTER", 1000 + i);
        event.campaign_name = format!("测试活动 #{i}");
        event.event_data.insert(
            "nested".into(),
            serde_json::json!({"i": i, "tags": ["a", "é"]}),
        );
        let receipt = publisher.publish(&event).await?;
        published.insert(receipt.message_id, event);
    }

    let all_handled = recorder.wait_until(WAIT, |r| r.handled_by("chaos").len() >= N as usize);
    tokio::time::sleep(QUIET_PERIOD).await;
    host.shutdown().await;
    ensure!(
        all_handled,
        "not every event was handled:\n{}",
        broker.logs()
    );

    let handled = recorder.handled_by("chaos");
    assert_eq!(
        handled.len(),
        N as usize,
        "each event handled once: {handled:#?}"
    );
    for h in &handled {
        assert_eq!(h.outcome, DeliveryOutcome::ConsumeSuccess, "{h:?}");
        assert_eq!(h.reconsume_times, 0, "nothing was retried: {h:?}");
    }
    let handled_ids: HashSet<_> = handled.iter().map(|h| h.message_id.clone()).collect();
    let published_ids: HashSet<_> = published.keys().cloned().collect();
    assert_eq!(
        handled_ids, published_ids,
        "handled ids are the producer's ids"
    );

    for (message_id, line) in recorder.plugin_logs("chaos") {
        let seen: serde_json::Value = serde_json::from_str(line.strip_prefix("seen ").unwrap())?;
        let event = &published[&message_id];
        assert_eq!(seen["message_id"], message_id.as_str());
        assert_eq!(seen["event_type"], event.event_type.as_str());
        assert_eq!(seen["user_id"], event.user_id);
        assert_eq!(seen["tenant_id"], event.tenant_id.as_str());
        assert_eq!(seen["app_id"], event.app_id.as_str());
        assert_eq!(seen["campaign_id"], event.campaign_id.as_str());
        assert_eq!(seen["campaign_name"], event.campaign_name.as_str());
        assert_eq!(
            seen["event_data"],
            serde_json::Value::Object(event.event_data.clone())
        );
        assert_eq!(seen["timestamp"], event.timestamp.as_str());
        assert_eq!(seen["topic"], "marketing_task_completed");
        assert_eq!(seen["tags"], "USER_REGISTER", "the tag is the event type");
        assert_eq!(seen["keys"], serde_json::json!([event.key()]));
        assert!(seen["born_timestamp"].as_i64().unwrap() > 1_700_000_000_000);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_plugin_is_retried_alone_and_succeeds_on_redelivery() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "retry.topic",
        vec![
            PluginConfig::new("chaos", plugin_path("chaos")?),
            PluginConfig::new("rewards", plugin_path("reward-logger")?),
        ],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    const FAILING: u64 = 3;
    let mut ids = HashSet::new();
    for user in 0..FAILING {
        ids.insert(
            publisher
                .publish(&sample_event("FAIL_ONCE", user))
                .await?
                .message_id,
        );
    }

    let count = |r: &Recorder, outcome| {
        r.handled_by("chaos")
            .iter()
            .filter(|h| h.outcome == outcome)
            .count()
    };
    let failed = recorder.wait_until(WAIT, |r| {
        count(r, DeliveryOutcome::ConsumeRetryLater) >= ids.len()
    });
    let failed_at = std::time::Instant::now();
    let retried = recorder.wait_until(WAIT, |r| {
        count(r, DeliveryOutcome::ConsumeSuccess) >= ids.len()
    });
    // The broker's retry schedule (RELIABILITY.md compares the brokers).
    println!(
        "{:?} broker: failed first deliveries came back after {:.1} s",
        broker.kind(),
        failed_at.elapsed().as_secs_f64()
    );
    tokio::time::sleep(QUIET_PERIOD).await;
    host.shutdown().await;
    ensure!(
        failed && retried,
        "the failed deliveries did not come back:\n{}",
        broker.logs()
    );

    let chaos = recorder.handled_by("chaos");
    for id in &ids {
        let mut attempts: Vec<_> = chaos
            .iter()
            .filter(|h| &h.message_id == id)
            .map(|h| (h.reconsume_times, h.outcome))
            .collect();
        attempts.sort_by_key(|(times, _)| *times);
        assert_eq!(
            attempts,
            [
                (0, DeliveryOutcome::ConsumeRetryLater),
                (1, DeliveryOutcome::ConsumeSuccess)
            ],
            "message {id}: fails first, succeeds on the first redelivery"
        );
    }
    let rewards = recorder.handled_by("rewards");
    assert_eq!(
        rewards.len(),
        3,
        "the other plugin is not re-run: {rewards:#?}"
    );
    for h in &rewards {
        assert_eq!(
            (h.reconsume_times, h.outcome),
            (0, DeliveryOutcome::ConsumeSuccess)
        );
        assert!(ids.contains(&h.message_id));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_plugin_is_retried_and_the_next_message_is_handled() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let chaos = PluginConfig {
        // One instance at a time: the event after the panic must get a new Store.
        concurrency: 1,
        max_reconsume_times: 1,
        ..PluginConfig::new("chaos", plugin_path("chaos")?)
    };
    let config = host_config(&broker, "panic_topic", vec![chaos]);
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;

    let panicking = publisher
        .publish(&sample_event("PANIC", 1))
        .await?
        .message_id;
    let trapped = recorder.wait_until(WAIT, |r| {
        r.handled().iter().any(|h| h.message_id == panicking)
    });
    let healthy = publisher
        .publish(&sample_event("USER_REGISTER", 2))
        .await?
        .message_id;
    let recovered = recorder.wait_until(WAIT, |r| {
        r.handled().iter().any(|h| h.message_id == healthy)
    });
    host.shutdown().await;
    ensure!(
        trapped && recovered,
        "messages not handled:\n{}",
        broker.logs()
    );

    let handled = recorder.handled();
    let panic = handled.iter().find(|h| h.message_id == panicking).unwrap();
    assert_eq!(panic.outcome, DeliveryOutcome::ConsumeRetryLater);
    let cause = panic.cause.as_deref().unwrap_or_default();
    assert!(
        cause.starts_with("trap:") && cause.contains("unreachable"),
        "{cause}"
    );
    let next = handled.iter().find(|h| h.message_id == healthy).unwrap();
    assert_eq!(next.outcome, DeliveryOutcome::ConsumeSuccess, "{next:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_ends_in_the_plugin_groups_dead_letter_queue() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let chaos = PluginConfig {
        max_reconsume_times: 1,
        ..PluginConfig::new("chaos", plugin_path("chaos")?)
    };
    let config = host_config(&broker, "poison_topic", vec![chaos]);
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let poison = publisher
        .publish(&sample_event("FAIL", 1))
        .await?
        .message_id;
    let healthy = publisher
        .publish(&sample_event("USER_REGISTER", 2))
        .await?
        .message_id;

    // First delivery and one redelivery (10 s later) both fail.
    let exhausted = recorder.wait_until(WAIT, |r| {
        r.handled()
            .iter()
            .filter(|h| h.message_id == poison)
            .count()
            >= 2
    });
    ensure!(
        exhausted,
        "the poison message was not redelivered:\n{}",
        broker.logs()
    );
    let exhausted_at = std::time::Instant::now();

    let dead = dead_letters(&broker, "mqplug-chaos", &[poison.as_str()]).await?;
    let dead_lettered = dead.iter().any(|d| d.message_id == poison);
    println!(
        "{:?} broker: the poison message read back from %DLQ%mqplug-chaos {:.1} s after its last failure",
        broker.kind(),
        exhausted_at.elapsed().as_secs_f64()
    );
    host.shutdown().await;
    ensure!(
        dead_lettered,
        "the poison message is not in %DLQ%mqplug-chaos:\n{}",
        broker.logs()
    );

    let attempts: Vec<_> = recorder
        .handled()
        .into_iter()
        .filter(|h| h.message_id == poison)
        .map(|h| (h.reconsume_times, h.outcome))
        .collect();
    assert_eq!(
        attempts,
        [
            (0, DeliveryOutcome::ConsumeRetryLater),
            (1, DeliveryOutcome::ConsumeRetryLater)
        ],
        "max_reconsume_times = 1: one redelivery, then the dead-letter queue"
    );
    let ok = recorder.handled();
    let ok = ok.iter().find(|h| h.message_id == healthy).unwrap();
    assert_eq!(
        ok.outcome,
        DeliveryOutcome::ConsumeSuccess,
        "other messages keep flowing"
    );
    Ok(())
}

/// Reads `%DLQ%<group>` as `mqplug dlq list` does (a pull consumer that
/// moves no offset) until every message id in `wanted` is there or [`WAIT`]
/// passes (a dead-letter topic is routed after the broker's next
/// registration); every dead letter read.
async fn dead_letters(
    broker: &LocalBroker,
    group: &str,
    wanted: &[&str],
) -> Result<Vec<mqplug::Delivery>> {
    let mq = mqplug::mq::MqRuntime::new(1)?;
    let deadline = std::time::Instant::now() + WAIT;
    let mut found = Vec::new();
    while std::time::Instant::now() < deadline {
        found = mqplug::dlq::read(&mq, &broker.name_server, group)
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|letter| letter.delivery)
            .collect();
        if wanted
            .iter()
            .all(|id| found.iter().any(|d| d.message_id == *id))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    mq.shutdown().await;
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_sends_a_poison_event_to_the_dead_letter_queue_and_delays_a_retry() -> Result<()>
{
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "disposition_topic",
        vec![PluginConfig::new("chaos", plugin_path("chaos")?)],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let mut poison_event = sample_event("DEAD_LETTER", 1);
    poison_event.campaign_name = "测试活动 poison".into();
    let poison = publisher.publish(&poison_event).await?;
    let later = publisher
        .publish(&sample_event_with(
            "RETRY_AFTER",
            2,
            serde_json::json!({"ms": 5000}),
        ))
        .await?
        .message_id;
    let healthy = publisher
        .publish(&sample_event("USER_REGISTER", 3))
        .await?
        .message_id;

    let retried = recorder.wait_until(WAIT, |r| {
        r.handled()
            .iter()
            .any(|h| h.message_id == later && h.reconsume_times == 1)
    });
    let dead = dead_letters(&broker, "mqplug-chaos", &[poison.message_id.as_str()]).await?;
    // A dead-lettered message must not come back to the plugin.
    tokio::time::sleep(QUIET_PERIOD).await;
    host.shutdown().await;
    ensure!(retried, "the delayed retry never came:\n{}", broker.logs());

    let attempts = |id: &str| -> Vec<_> {
        recorder
            .handled()
            .into_iter()
            .filter(|h| h.message_id == id)
            .collect()
    };
    let poisoned = attempts(&poison.message_id);
    assert_eq!(
        poisoned
            .iter()
            .map(|h| (h.reconsume_times, h.outcome))
            .collect::<Vec<_>>(),
        [(0, DeliveryOutcome::DeadLetter)],
        "handled once, never retried"
    );
    let in_dlq: Vec<_> = dead
        .iter()
        .filter(|d| d.message_id == poison.message_id)
        .collect();
    assert_eq!(
        in_dlq.len(),
        1,
        "the poison message is in %DLQ%mqplug-chaos once: {dead:#?}\n{}",
        broker.logs()
    );
    // The broker keeps the message's properties: its id, tag and keys.
    assert_eq!(in_dlq[0].tags.as_deref(), Some("DEAD_LETTER"));
    assert_eq!(in_dlq[0].keys, [poison_event.key()]);

    let delayed = attempts(&later);
    assert_eq!(
        delayed
            .iter()
            .map(|h| (h.reconsume_times, h.outcome))
            .collect::<Vec<_>>(),
        [
            (0, DeliveryOutcome::RetryAfter { delay_level: 2 }),
            (1, DeliveryOutcome::ConsumeSuccess)
        ],
        "5 s is delay level 2; the retry is acknowledged"
    );
    let waited = delayed[1].at - delayed[0].at;
    println!(
        "{:?} broker: asked for a retry after 5 s, redelivered after {:.1} s",
        broker.kind(),
        waited.as_secs_f64()
    );
    // No sooner than asked (a correctness bound, not a speed one); the
    // broker's own first retry would also come later (10 s), so the order
    // of the two outcomes above is what shows the level was used.
    assert!(waited >= Duration::from_millis(4_500), "{waited:?}");
    let ok = attempts(&healthy);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].outcome, DeliveryOutcome::ConsumeSuccess);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_handler_finish_and_acknowledges_it() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "drain_topic",
        vec![PluginConfig::new("chaos", plugin_path("chaos")?)],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let slow = publisher
        .publish(&sample_event("SLOW", 1))
        .await?
        .message_id;

    // Shut down while the handler is still busy (it takes 2 s).
    let started = recorder.wait_until(WAIT, |r| {
        r.plugin_logs("chaos").iter().any(|(id, _)| id == &slow)
    });
    ensure!(
        started,
        "the slow handler never started:\n{}",
        broker.logs()
    );
    host.shutdown().await;
    let handled = recorder.handled();
    assert_eq!(
        handled
            .iter()
            .map(|h| (h.message_id.as_str(), h.outcome))
            .collect::<Vec<_>>(),
        [(slow.as_str(), DeliveryOutcome::ConsumeSuccess)],
        "the in-flight handler finished before shutdown returned"
    );

    // A new host in the same group must not see the message again.
    let again = Recorder::new();
    let host = Host::start(&config, again.observers()).await?;
    let probe = host
        .publisher()
        .context("the producer is enabled")?
        .publish(&sample_event("USER_REGISTER", 2))
        .await?
        .message_id;
    let probed = again.wait_until(WAIT, |r| r.handled().iter().any(|h| h.message_id == probe));
    tokio::time::sleep(QUIET_PERIOD).await;
    host.shutdown().await;
    ensure!(
        probed,
        "the restarted host consumed nothing:\n{}",
        broker.logs()
    );
    let redelivered: Vec<_> = again
        .handled()
        .into_iter()
        .filter(|h| h.message_id == slow)
        .collect();
    assert!(
        redelivered.is_empty(),
        "an acknowledged message was redelivered: {redelivered:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_with_a_tag_filter_sees_only_its_event_types() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "tagged_topic",
        vec![
            PluginConfig {
                tags: "USER_REGISTER || INVITE_FRIEND".into(),
                ..PluginConfig::new("registrations", plugin_path("chaos")?)
            },
            PluginConfig::new("everything", plugin_path("chaos")?),
        ],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let (mut wanted, mut published) = (HashSet::new(), HashSet::new());
    for (user, event_type) in [
        "USER_REGISTER",
        "DAILY_CHECKIN",
        "INVITE_FRIEND",
        "SHARE_ARTICLE",
    ]
    .into_iter()
    .enumerate()
    {
        let id = publisher
            .publish(&sample_event(event_type, user as u64))
            .await?
            .message_id;
        published.insert(id.clone());
        if event_type != "DAILY_CHECKIN" && event_type != "SHARE_ARTICLE" {
            wanted.insert(id);
        }
    }
    let all = recorder.wait_until(WAIT, |r| {
        r.handled_by("everything").len() >= published.len()
            && r.handled_by("registrations").len() >= wanted.len()
    });
    tokio::time::sleep(QUIET_PERIOD).await;
    host.shutdown().await;
    ensure!(
        all,
        "events not handled: {:#?}\n{}",
        recorder.handled(),
        broker.logs()
    );
    let seen: HashSet<_> = recorder
        .handled_by("registrations")
        .into_iter()
        .map(|h| h.message_id)
        .collect();
    assert_eq!(
        seen, wanted,
        "the filtered plugin sees exactly its event types"
    );
    assert_eq!(recorder.handled_by("registrations").len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_granted_stdio_prints_from_the_consumer_and_is_acknowledged() -> Result<()> {
    // The consumer calls plugins on the client's blocking threads, where
    // wasmtime-wasi's synchronous stdout may block on the runtime.
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "stdio_topic",
        vec![PluginConfig {
            inherit_stdio: true,
            ..PluginConfig::new("loud", plugin_path("chaos")?)
        }],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    publisher.publish(&sample_event("PRINT", 1)).await?;
    let handled = recorder.wait_until(WAIT, |r| !r.handled_by("loud").is_empty());
    host.shutdown().await;
    ensure!(handled, "the event was not handled\n{}", broker.logs());
    let outcomes: Vec<_> = recorder
        .handled_by("loud")
        .into_iter()
        .map(|h| (h.outcome, h.cause))
        .collect();
    assert_eq!(outcomes[0], (DeliveryOutcome::ConsumeSuccess, None));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_plugins_sleeping_past_their_deadline_end_there_and_a_healthy_plugin_flows()
-> Result<()> {
    const SLEEPERS: usize = 10;
    const SLEEPS: u64 = 3;
    const HEALTHY: u64 = 30;
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let mut plugins: Vec<PluginConfig> = (0..SLEEPERS)
        .map(|i| {
            Ok(PluginConfig {
                tags: "SLEEP".into(),
                concurrency: 4,
                deadline_ms: 2_000,
                ..PluginConfig::new(format!("sleeper-{i}"), plugin_path("chaos")?)
            })
        })
        .collect::<Result<_>>()?;
    plugins.push(PluginConfig::new("rewards", plugin_path("reward-logger")?));
    let config = host_config(&broker, "sleepy.topic", plugins);
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;

    let mut sleep_ids = HashSet::new();
    for user in 0..SLEEPS {
        // Each asks to sleep for an hour.
        let mut event = sample_event("SLEEP", user);
        event
            .event_data
            .insert("ms".into(), serde_json::json!(3_600_000));
        sleep_ids.insert(publisher.publish(&event).await?.message_id);
    }
    let mut healthy_ids = HashSet::new();
    for user in 0..HEALTHY {
        healthy_ids.insert(
            publisher
                .publish(&sample_event("USER_REGISTER", 100 + user))
                .await?
                .message_id,
        );
    }

    let sleeper_deadlines = |r: &Recorder, plugin: &str| -> HashSet<String> {
        r.handled_by(plugin)
            .into_iter()
            .filter(|h| {
                h.outcome == DeliveryOutcome::ConsumeRetryLater
                    && h.cause.as_deref().is_some_and(|c| c.contains("deadline"))
            })
            .map(|h| h.message_id)
            .collect()
    };
    let healthy_done = |r: &Recorder| -> HashSet<String> {
        r.handled_by("rewards")
            .into_iter()
            .filter(|h| h.outcome == DeliveryOutcome::ConsumeSuccess)
            .map(|h| h.message_id)
            .collect()
    };
    let all = recorder.wait_until(WAIT, |r| {
        (0..SLEEPERS).all(|i| sleeper_deadlines(r, &format!("sleeper-{i}")) == sleep_ids)
            && healthy_ids.is_subset(&healthy_done(r))
    });
    host.shutdown().await;
    let ended: Vec<usize> = (0..SLEEPERS)
        .map(|i| sleeper_deadlines(&recorder, &format!("sleeper-{i}")).len())
        .collect();
    ensure!(
        all,
        "sleeps ended at the deadline per plugin: {ended:?} of {SLEEPS}; healthy handled {} of {HEALTHY}",
        healthy_ids.intersection(&healthy_done(&recorder)).count()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_every_plugin_at_once_and_acknowledges_their_in_flight_handlers()
-> Result<()> {
    const PLUGINS: usize = 10;
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let plugins = (0..PLUGINS)
        .map(|i| {
            Ok(PluginConfig::new(
                format!("slow-{i}"),
                plugin_path("chaos")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = host_config(&broker, "drain.topic", plugins);
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    // Every plugin has its own group, so each runs this 2 s handler.
    let slow = publisher
        .publish(&sample_event("SLOW", 1))
        .await?
        .message_id;
    let all_started = recorder.wait_until(WAIT, |r| {
        (0..PLUGINS).all(|i| {
            r.plugin_logs(&format!("slow-{i}"))
                .iter()
                .any(|(id, line)| id == &slow && line.starts_with("seen "))
        })
    });
    ensure!(all_started, "not every plugin started the slow event");
    host.shutdown().await;

    let lifecycle = recorder.lifecycle();
    let first_stopped = lifecycle
        .iter()
        .position(|(what, _)| *what == "stopped")
        .context("no consumer reported stopping")?;
    let draining_before: HashSet<&str> = lifecycle[..first_stopped]
        .iter()
        .filter(|(what, _)| *what == "draining")
        .map(|(_, plugin)| plugin.as_str())
        .collect();
    assert_eq!(
        draining_before.len(),
        PLUGINS,
        "every consumer began draining before the first one stopped: {lifecycle:?}"
    );
    for i in 0..PLUGINS {
        let plugin = format!("slow-{i}");
        let handled = recorder.handled_by(&plugin);
        assert!(
            handled
                .iter()
                .any(|h| h.message_id == slow && h.outcome == DeliveryOutcome::ConsumeSuccess),
            "{plugin}'s in-flight handler finished and was acknowledged: {handled:?}"
        );
    }
    Ok(())
}

/// GET `path` from the admin listener: its status code.
async fn admin_status(addr: std::net::SocketAddr, path: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("a status line: {response:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_admin_clients_stop_neither_healthz_nor_messages() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    // Far past the cap (32) however few descriptors the machine allows.
    let idle_connections = mqplug_tests::open_files_allowed(2_000);
    const EVENTS: u64 = 20;
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let mut config = host_config(
        &broker,
        "admin.flood",
        vec![PluginConfig::new("rewards", plugin_path("reward-logger")?)],
    );
    config.admin.max_connections = 32;
    let host = Host::start(&config, recorder.observers()).await?;
    let admin = host.admin_addr().context("the admin listener is on")?;

    // Connections that never send a byte, and one that sends half a request
    // head and stops: together far past the cap.
    let mut idle = Vec::with_capacity(idle_connections);
    for _ in 0..idle_connections {
        idle.push(tokio::net::TcpStream::connect(admin).await?);
    }
    let mut slow = tokio::net::TcpStream::connect(admin).await?;
    slow.write_all(b"GET /metrics HTTP/1.1\r\nhost: sl").await?;

    let publisher = host.publisher().context("the producer is enabled")?;
    let mut published = HashSet::new();
    for user in 0..EVENTS {
        published.insert(
            publisher
                .publish(&sample_event("USER_REGISTER", user))
                .await?
                .message_id,
        );
    }
    let healthz = admin_status(admin, "/healthz").await;
    let readyz = admin_status(admin, "/readyz").await;
    let all = recorder.wait_until(WAIT, |r| {
        let handled: HashSet<String> = r
            .handled_by("rewards")
            .into_iter()
            .filter(|h| h.outcome == DeliveryOutcome::ConsumeSuccess)
            .map(|h| h.message_id)
            .collect();
        published.is_subset(&handled)
    });
    host.shutdown().await;
    drop((idle, slow));
    assert_eq!(
        healthz?, 200,
        "/healthz answers behind {idle_connections} idle connections"
    );
    assert_eq!(readyz?, 200);
    ensure!(
        all,
        "every event handled while the admin listener was flooded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumed_event_calls_a_granted_service_and_a_refused_one_is_retried() -> Result<()> {
    use mqplug_tests::http_server::{Answer, Server};
    const EVENTS: u64 = 5;
    let server = Server::start(Answer::Ok("granted"));
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "outbound.topic",
        vec![PluginConfig {
            allowed_outbound_hosts: vec![server.origin()],
            ..PluginConfig::new("chaos", plugin_path("chaos")?)
        }],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let http_event = |user: u64, url: String| {
        mqplug_tests::sample_event_with(
            "HTTP",
            user,
            serde_json::json!({"url": url, "method": "POST", "body": "{}"}),
        )
    };
    let mut granted = HashSet::new();
    for user in 0..EVENTS {
        let url = format!("{}/grants", server.origin());
        granted.insert(publisher.publish(&http_event(user, url)).await?.message_id);
    }
    // Not granted: another port on the same host.
    let refused_url = format!("http://127.0.0.1:{}/grants", server.addr.port() + 1);
    let refused = publisher
        .publish(&http_event(99, refused_url))
        .await?
        .message_id;
    let done = recorder.wait_until(WAIT, |r| {
        let handled = r.handled_by("chaos");
        granted.iter().all(|id| {
            handled
                .iter()
                .any(|h| &h.message_id == id && h.outcome == DeliveryOutcome::ConsumeSuccess)
        }) && handled
            .iter()
            .any(|h| h.message_id == refused && h.outcome == DeliveryOutcome::ConsumeRetryLater)
    });
    host.shutdown().await;
    ensure!(done, "handled: {:#?}", recorder.handled_by("chaos"));
    let keys: HashSet<String> = server
        .requests()
        .iter()
        .filter_map(|(head, _)| {
            head.lines()
                .find_map(|l| l.strip_prefix("idempotency-key: "))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        keys, granted,
        "each granted event's request, keyed by its message id"
    );
    let cause = recorder
        .handled_by("chaos")
        .into_iter()
        .find(|h| h.message_id == refused)
        .and_then(|h| h.cause)
        .unwrap_or_default();
    assert!(cause.contains("HttpRequestDenied"), "{cause}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_up_messages_go_out_after_ok_with_derived_ids_and_never_after_err() -> Result<()> {
    use mqplug::wasm::{follow_up_id, follow_up_key};
    const FOLLOW_UPS: u64 = 2;
    const FOLLOW_UP_TOPIC: &str = "marketing.reward.granted";
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let mut config = host_config(
        &broker,
        "publishing.topic",
        vec![PluginConfig {
            allowed_topics: vec![FOLLOW_UP_TOPIC.into()],
            ..PluginConfig::new("chaos", plugin_path("chaos")?)
        }],
    );
    config.producer.create_topic_queues = Some(4);
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let (reader, seen) = TopicReader::start(&broker, FOLLOW_UP_TOPIC).await?;

    let publish_event = |user: u64, then: &str| {
        mqplug_tests::sample_event_with(
            "PUBLISH",
            user,
            serde_json::json!({"topic": FOLLOW_UP_TOPIC, "count": FOLLOW_UPS, "then": then}),
        )
    };
    let ok = publisher.publish(&publish_event(1, "ok")).await?.message_id;
    let failing = publisher
        .publish(&publish_event(2, "err"))
        .await?
        .message_id;
    let second_try = publisher
        .publish(&publish_event(3, "err_first"))
        .await?
        .message_id;
    // What chaos publishes for message `id`: its ids derive from the
    // plugin, the incoming message, the index and the message itself.
    let follow_up = |id: &str, i: usize| mqplug::wasm::OutgoingMessage {
        topic: mqplug::topic::TopicName::new(FOLLOW_UP_TOPIC).unwrap(),
        tag: Some("FOLLOW_UP".into()),
        keys: Vec::new(),
        body: serde_json::json!({"for": id, "i": i})
            .to_string()
            .into_bytes(),
    };
    let expected: HashSet<(String, String)> = [&ok, &second_try]
        .into_iter()
        .flat_map(|id| {
            (0..FOLLOW_UPS as usize).map(move |i| {
                (
                    follow_up_id("chaos", id, i, &follow_up(id, i)),
                    follow_up_key(id, i),
                )
            })
        })
        .collect();
    let arrived = |seen: &mqplug_tests::Collect| -> Vec<(String, String)> {
        seen.deliveries()
            .into_iter()
            .map(|d| (d.message_id, d.keys.first().cloned().unwrap_or_default()))
            .collect()
    };
    let all = recorder.wait_until(WAIT, |r| {
        expected.iter().all(|e| arrived(&seen).contains(e))
            && r.handled_by("chaos")
                .iter()
                .any(|h| h.message_id == failing && h.reconsume_times >= 1)
    });
    tokio::time::sleep(QUIET_PERIOD).await;
    let got = arrived(&seen);
    // Counted per topic on /metrics and summed on /plugins.
    let sent = host.metrics().follow_ups("chaos").get("sent").copied();
    let versions: Vec<(String, String)> = Vec::new();
    let scraped = host.metrics().render(&versions);
    reader.stop().await;
    host.shutdown().await;
    ensure!(all, "follow-ups seen: {got:?}; expected {expected:?}");
    assert_eq!(
        sent,
        Some(expected.len() as u64),
        "follow-ups counted as sent"
    );
    assert!(
        scraped.contains(&format!(
            "mqplug_follow_ups_total{{plugin=\"chaos\",topic=\"{FOLLOW_UP_TOPIC}\",result=\"sent\"}} {}",
            expected.len()
        )),
        "{scraped}"
    );
    assert_eq!(
        got.len(),
        expected.len(),
        "each follow-up once, none from the failing event: {got:?}"
    );
    assert!(
        !got.iter().any(|(_, key)| key.starts_with(&failing)),
        "a handler that returned err published nothing: {got:?}"
    );
    Ok(())
}

/// A consumer of its own reading a topic from its first message (the topic
/// is created first, so it can subscribe before anything is published).
struct TopicReader {
    mq: mqplug::mq::MqRuntime,
    consumer: mqplug::mq::PluginConsumer,
}

impl TopicReader {
    async fn start(
        broker: &LocalBroker,
        topic: &str,
    ) -> Result<(TopicReader, mqplug_tests::Collect)> {
        use mqplug::topic::TopicName;
        let mq = mqplug::mq::MqRuntime::new(1)?;
        let topic = TopicName::new(topic)?;
        let mut creator = mqplug::mq::Publisher::start(
            &mq,
            mqplug::mq::ProducerSettings::new(broker.name_server.clone(), topic.clone()),
        )
        .await?;
        creator.create_topic(4).await?;
        creator.shutdown().await;
        let group = format!("reader-{}", topic.wire());
        let (consumer, seen) =
            mqplug_tests::Collect::from_first(&mq, &broker.name_server, topic, &group).await?;
        Ok((TopicReader { mq, consumer }, seen))
    }

    async fn stop(self) {
        self.consumer.shutdown().await;
        self.mq.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reward_granter_grants_once_per_event_through_the_rewards_service_and_announces_it()
-> Result<()> {
    grants_once_per_event_and_announces(plugin_path("reward-granter")?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_reward_granter_grants_once_per_event_through_the_rewards_service_and_announces_it()
-> Result<()> {
    let path = mqplug_tests::plugins::guest_granter_path(mqplug_tests::plugins::Guest::Go)?;
    grants_once_per_event_and_announces(path).await
}

/// The reward granter at `path` against the broker and the rewards service:
/// one grant per event, each announced once, a bad count dead-lettered.
async fn grants_once_per_event_and_announces(path: std::path::PathBuf) -> Result<()> {
    use mqplug_tests::rewards::RewardsService;
    const GRANTED: &str = "marketing.reward.granted";
    const N: u64 = 12;

    let rewards = RewardsService::start("s3cret-token")?;
    let secrets = tempfile::tempdir()?;
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let granter = rewards.granter_config(path, "s3cret-token", secrets.path(), GRANTED)?;
    let config = host_config(&broker, "marketing.task.completed", vec![granter]);
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    let (reader, announced) = TopicReader::start(&broker, GRANTED).await?;

    let mut events = HashMap::new();
    for user in 0..N {
        let event = sample_event_with(
            "USER_REGISTER",
            500 + user,
            serde_json::json!({"count": user % 3 + 1}),
        );
        events.insert(publisher.publish(&event).await?.message_id, event);
    }
    let poison = publisher
        .publish(&mqplug_tests::rewards::bad_count_event())
        .await?
        .message_id;

    let all = recorder.wait_until(WAIT, |r| {
        announced.deliveries().len() >= N as usize
            && r.handled().iter().any(|h| h.message_id == poison)
    });
    tokio::time::sleep(QUIET_PERIOD).await;
    let deliveries = announced.deliveries();
    reader.stop().await;
    host.shutdown().await;
    ensure!(
        all,
        "announced {} of {N}:\n{}",
        deliveries.len(),
        broker.logs()
    );

    let grants = rewards.grants();
    let stats = rewards.stats();
    assert_eq!(stats.grants, N, "one grant per event: {stats:?}");
    assert_eq!(stats.repeated_requests, 0, "{stats:?}");
    for grant in &grants {
        let event = events
            .get(&grant.idempotency_key)
            .unwrap_or_else(|| panic!("the idempotency key is a message id: {grant:?}"));
        assert_eq!(grant.user_id, event.user_id);
        assert_eq!(
            grant.points,
            10 * event.event_data["count"].as_u64().unwrap()
        );
    }
    assert_eq!(deliveries.len(), N as usize, "each grant announced once");
    for delivery in &deliveries {
        assert_eq!(delivery.tags.as_deref(), Some("REWARD_GRANTED"));
        let grant = grants
            .iter()
            .find(|g| delivery.keys.contains(&g.id))
            .unwrap_or_else(|| panic!("announces a recorded grant: {delivery:?}"));
        assert!(
            delivery
                .keys
                .contains(&format!("{}:0", grant.idempotency_key)),
            "keyed by the incoming message id: {delivery:?}"
        );
    }
    let poisoned: Vec<_> = recorder
        .handled()
        .into_iter()
        .filter(|h| h.message_id == poison)
        .map(|h| h.outcome)
        .collect();
    assert_eq!(
        poisoned,
        [DeliveryOutcome::DeadLetter],
        "a bad count is dead-lettered, not granted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_decided_while_the_host_shuts_down_still_reaches_the_queue() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "shutdown_disposition_topic",
        vec![PluginConfig::new("chaos", plugin_path("chaos")?)],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;
    // Busy for 1.5 s, then asks for the dead-letter queue.
    let poison = publisher
        .publish(&sample_event_with(
            "DEAD_LETTER",
            1,
            serde_json::json!({"ms": 1500}),
        ))
        .await?
        .message_id;
    let started = recorder.wait_until(WAIT, |r| {
        r.plugin_logs("chaos")
            .iter()
            .any(|(id, line)| *id == poison && line.starts_with("dead letter"))
    });
    ensure!(started, "the handler did not start:\n{}", broker.logs());
    // Shutdown while the handler runs: it drains, and the message is sent
    // back through the consumer before the consumer goes.
    host.shutdown().await;
    let outcomes: Vec<_> = recorder
        .handled()
        .into_iter()
        .filter(|h| h.message_id == poison)
        .map(|h| h.outcome)
        .collect();
    assert_eq!(outcomes, [DeliveryOutcome::DeadLetter]);
    let dead = dead_letters(&broker, "mqplug-chaos", &[poison.as_str()]).await?;
    assert!(
        dead.iter().any(|d| d.message_id == poison),
        "not in %DLQ%mqplug-chaos: {dead:?}\n{}",
        broker.logs()
    );
    Ok(())
}

/// A host's consumers share one RocketMQ client instance (one client id,
/// its connections and route tables, not one of each per plugin), and two
/// hosts, even in one process, have different ones: the broker tells the
/// members of a group apart by client id, and two hosts under one id would
/// each be handed every queue and handle every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_consumers_share_one_client_and_two_hosts_split_the_queues() -> Result<()> {
    let broker = LocalBroker::start()?;
    let config = host_config(
        &broker,
        "marketing.task.completed",
        vec![
            PluginConfig::new("first", plugin_path("chaos")?),
            PluginConfig::new("second", plugin_path("chaos")?),
        ],
    );
    let groups: Vec<String> = config.plugins.iter().map(|p| p.group()).collect();
    let (one, two) = (Recorder::new(), Recorder::new());
    let host_one = Host::start(&config, one.observers()).await?;
    let host_two = Host::start(&config, two.observers()).await?;

    // Both hosts in both groups, as the broker sees them.
    let deadline = std::time::Instant::now() + WAIT;
    let ids = loop {
        let ids: Vec<Vec<String>> = groups
            .iter()
            .map(|group| mqplug_tests::broker::consumer_client_ids(&broker.broker_addr, group))
            .collect::<Result<_>>()?;
        if ids.iter().all(|ids| ids.len() >= 2) || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Rebalancing follows the membership; give it a moment to settle.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let publisher = host_one.publisher().context("the producer is enabled")?;
    const N: usize = 40;
    for i in 0..N {
        publisher
            .publish(&sample_event("USER_REGISTER", 5000 + i as u64))
            .await?;
    }
    let handled = |plugin: &str| one.handled_by(plugin).len() + two.handled_by(plugin).len();
    let all = one.wait_until(WAIT, |_| handled("first") >= N && handled("second") >= N);
    tokio::time::sleep(QUIET_PERIOD).await;
    host_one.shutdown().await;
    host_two.shutdown().await;

    assert_eq!(
        ids[0].len(),
        2,
        "two clients in group {}: {ids:?}",
        groups[0]
    );
    assert_eq!(
        ids[0], ids[1],
        "each host's plugins share its client id, so both groups list the same two"
    );
    ensure!(all, "not every event was handled:\n{}", broker.logs());
    for plugin in ["first", "second"] {
        let ids = |recorder: &Recorder| -> HashSet<String> {
            recorder
                .handled_by(plugin)
                .into_iter()
                .map(|h| h.message_id)
                .collect()
        };
        let (by_one, by_two) = (ids(&one), ids(&two));
        // Under one client id both hosts take every queue, and about half
        // the events are handled twice (20 of 40 when tried). A rebalance
        // still settling may move a queue with a message in flight, which
        // RocketMQ then delivers again: allow a few.
        let both: Vec<&String> = by_one.intersection(&by_two).collect();
        assert!(
            both.len() <= N / 10,
            "{plugin}: {} events handled by both hosts: {both:?}",
            both.len()
        );
        assert_eq!(
            by_one.union(&by_two).count(),
            N,
            "{plugin}: every event handled"
        );
        assert!(
            !by_one.is_empty() && !by_two.is_empty(),
            "{plugin}: both hosts got queues ({} and {} events)",
            by_one.len(),
            by_two.len()
        );
    }
    Ok(())
}

/// `consume_from = "last"` means from now on for a new group, though the
/// Java broker answers such a group with offset 0 while the topic's first
/// messages are in memory (which made the client start there); a restart
/// of that group keeps its offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_from_last_handles_only_what_is_published_after_it_starts() -> Result<()> {
    use mqplug::mq::{ConsumeFrom, MqRuntime, ProducerSettings, Publisher};
    use mqplug::topic::TopicName;
    let broker = LocalBroker::start()?;
    let topic = "marketing.task.completed";
    let mq = MqRuntime::new(1)?;
    let mut publisher = Publisher::start(
        &mq,
        ProducerSettings::new(broker.name_server.clone(), TopicName::new(topic)?),
    )
    .await?;
    publisher.create_topic(4).await?;
    let mut before = HashSet::new();
    for user in 0..8 {
        before.insert(
            publisher
                .publish(&sample_event("USER_REGISTER", user))
                .await?
                .message_id,
        );
    }

    let recorder = Recorder::new();
    let mut config = host_config(
        &broker,
        topic,
        vec![PluginConfig::new(
            "latecomer",
            plugin_path("reward-logger")?,
        )],
    );
    config.plugins[0].consume_from = ConsumeFrom::Last;
    let host = Host::start(&config, recorder.observers()).await?;
    let mut after = HashSet::new();
    for user in 100..104 {
        after.insert(
            publisher
                .publish(&sample_event("USER_REGISTER", user))
                .await?
                .message_id,
        );
    }
    let handled = recorder.wait_until(Duration::from_secs(90), |r| {
        after.iter().all(|id| r.handled_message("latecomer", id))
    });
    tokio::time::sleep(QUIET_PERIOD).await;
    host.shutdown().await;
    publisher.shutdown().await;
    mq.shutdown().await;
    ensure!(
        handled,
        "the events published after the start were not all handled"
    );
    let old: Vec<&String> = before
        .iter()
        .filter(|id| recorder.handled_message("latecomer", id))
        .collect();
    assert!(
        old.is_empty(),
        "a new group from last handled earlier messages: {old:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_batch_each_message_keeps_its_own_outcome_and_only_failures_come_back() -> Result<()> {
    use mqplug::mq::MqRuntime;
    use mqplug::topic::TopicName;

    let broker = LocalBroker::start()?;
    // A backlog first, so the consumer's listener calls take several each.
    let topic = TopicName::new("batch.topic")?;
    let mq = MqRuntime::new(0)?;
    let publisher = mqplug_tests::topic_publisher(&mq, &broker.name_server, &topic).await?;
    let (mut failing, mut passing) = (HashSet::new(), HashSet::new());
    for user in 0..24 {
        let (event_type, ids) = if user % 4 == 0 {
            ("FAIL_ONCE", &mut failing)
        } else {
            ("USER_REGISTER", &mut passing)
        };
        ids.insert(
            publisher
                .publish(&sample_event(event_type, user))
                .await?
                .message_id,
        );
    }
    publisher.shutdown().await;
    mq.shutdown().await;

    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "batch.topic",
        vec![PluginConfig {
            concurrency: 1,
            batch: 8,
            deadline_ms: 3000,
            ..PluginConfig::new("chaos", plugin_path("chaos")?)
        }],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let succeeded = |r: &Recorder| {
        r.handled_by("chaos")
            .iter()
            .filter(|h| h.outcome == DeliveryOutcome::ConsumeSuccess)
            .count()
    };
    let done = recorder.wait_until(WAIT, |r| succeeded(r) >= failing.len() + passing.len());
    tokio::time::sleep(QUIET_PERIOD).await;
    host.shutdown().await;
    ensure!(done, "not every message succeeded:\n{}", broker.logs());

    let chaos = recorder.handled_by("chaos");
    let attempts = |id: &String| {
        let mut attempts: Vec<_> = chaos
            .iter()
            .filter(|h| &h.message_id == id)
            .map(|h| (h.reconsume_times, h.outcome))
            .collect();
        attempts.sort_by_key(|(times, _)| *times);
        attempts
    };
    for id in &failing {
        assert_eq!(
            attempts(id),
            [
                (0, DeliveryOutcome::ConsumeRetryLater),
                (1, DeliveryOutcome::ConsumeSuccess)
            ],
            "message {id}: fails first, comes back alone and succeeds"
        );
    }
    for id in &passing {
        assert_eq!(
            attempts(id),
            [(0, DeliveryOutcome::ConsumeSuccess)],
            "message {id} succeeded in a batch with a failure and is not run again"
        );
    }
    Ok(())
}
