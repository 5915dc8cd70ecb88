//! mqplug beside the platform's own Go clients (rocketmq-client-go v2, as the
//! platform's guide writes them), on the broker the platform runs: events
//! from the Go producer reach plugins intact, and a Go consumer and mqplug
//! share one consumer group while a team migrates.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mqplug::config::PluginConfig;
use mqplug::{DeliveryOutcome, Host};
use mqplug_tests::broker::BrokerKind;
use mqplug_tests::peers::{GoConsumer, go_produce};
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_the_platforms_go_producer_reach_plugins_with_every_field_intact() -> Result<()>
{
    // The platform's clients on the platform's broker, whatever MQPLUG_BROKER says:
    // the Rust 1.0.0 servers refuse the Go client's requests.
    let broker = LocalBroker::start_kind(BrokerKind::Java)?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "marketing.task.completed",
        vec![PluginConfig::new("chaos", plugin_path("chaos")?)],
    );
    let host = Host::start(&config, recorder.observers()).await?;

    let name_server = broker.name_server.clone();
    let sent = tokio::task::spawn_blocking(move || go_produce(&name_server, &["-batch", "edge"]))
        .await??;
    ensure!(!sent.is_empty(), "the Go producer sent nothing");
    let all = recorder.wait_until(WAIT, |r| r.handled_by("chaos").len() >= sent.len());
    host.shutdown().await;
    ensure!(all, "not every Go event was handled:\n{}", broker.logs());

    let handled = recorder.handled_by("chaos");
    for h in &handled {
        assert_eq!(h.outcome, DeliveryOutcome::ConsumeSuccess, "{h:?}");
    }
    let seen: HashMap<String, Value> = recorder
        .plugin_logs("chaos")
        .into_iter()
        .map(|(id, line)| {
            let seen = serde_json::from_str(line.strip_prefix("seen ").expect("a seen line"))
                .expect("seen is JSON");
            (id, seen)
        })
        .collect();
    for go in &sent {
        let seen = seen
            .get(&go.msg_id)
            .with_context(|| format!("the plugin never saw Go message {}", go.msg_id))?;
        let body: Value = serde_json::from_str(&go.body)?;
        assert_eq!(seen["message_id"], go.msg_id.as_str(), "the Go client's id");
        for (go_field, field) in [
            ("EventType", "event_type"),
            ("UserID", "user_id"),
            ("TenantID", "tenant_id"),
            ("AppID", "app_id"),
            ("CampaignID", "campaign_id"),
            ("CampaignName", "campaign_name"),
            ("Timestamp", "timestamp"),
        ] {
            assert_eq!(seen[field], body[go_field], "{field} of {}", go.body);
        }
        // A nil Go map is `null` on the wire and an empty object to plugins.
        let data = match &body["EventData"] {
            Value::Null => json!({}),
            data => data.clone(),
        };
        assert_eq!(seen["event_data"], data, "event data of {}", go.body);
        assert_eq!(seen["topic"], "marketing_task_completed");
    }
    // The batch holds the edge values the platform can send.
    let user_ids: HashSet<u64> = seen
        .values()
        .filter_map(|s| s["user_id"].as_u64())
        .collect();
    for edge in [0, (1 << 53) + 1, i64::MAX as u64] {
        assert!(user_ids.contains(&edge), "user id {edge} not in the batch");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_consumer_and_mqplug_in_one_group_split_the_queues_and_lose_nothing() -> Result<()> {
    const GROUP: &str = "marketing-consumer-group";
    // The platform's clients on the platform's broker, whatever MQPLUG_BROKER says:
    // the Rust 1.0.0 servers refuse the Go client's requests.
    let broker = LocalBroker::start_kind(BrokerKind::Java)?;
    let recorder = Recorder::new();
    let mut plugin = PluginConfig::new("chaos", plugin_path("chaos")?);
    plugin.group = Some(GROUP.to_string());
    let config = host_config(&broker, "marketing.task.completed", vec![plugin]);
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;

    let name_server = broker.name_server.clone();
    let mut go = tokio::task::spawn_blocking(move || {
        GoConsumer::start(&name_server, "marketing_task_completed", GROUP)
    })
    .await??;
    let handled_by_go = |go: &GoConsumer| -> Vec<String> {
        go.deliveries()
            .iter()
            .filter_map(|d| d["msg_id"].as_str().map(str::to_string))
            .collect()
    };
    let handled_by_mqplug = |r: &Recorder| -> Vec<String> {
        r.handled_by("chaos")
            .into_iter()
            .map(|h| h.message_id)
            .collect()
    };

    // Whether every message of `ids` was handled by one member or the other.
    let all_handled = |ids: &HashSet<String>, go: &GoConsumer, r: &Recorder| {
        let seen: HashSet<String> = handled_by_go(go)
            .into_iter()
            .chain(handled_by_mqplug(r))
            .collect();
        ids.iter().all(|id| seen.contains(id))
    };

    // Warm-up: publish batches until the group has settled: a whole batch
    // split between both members, each message handled exactly once. Until
    // then a queue may still move (each client rebalances on its own
    // schedule), so a warm-up message may be handled twice.
    const BATCH: u64 = 20;
    let mut published = Vec::new();
    let mut settled = false;
    for round in 0..30u64 {
        let mut batch = HashSet::new();
        for i in 0..BATCH {
            let receipt = publisher
                .publish(&sample_event("WARM_UP", round * BATCH + i))
                .await?;
            batch.insert(receipt.message_id.clone());
            published.push(receipt.message_id);
        }
        ensure!(
            recorder.wait_until(WAIT, |r| all_handled(&batch, &go, r)),
            "a warm-up batch was not handled"
        );
        tokio::time::sleep(mqplug_tests::QUIET_PERIOD).await;
        let go_ids: Vec<String> = handled_by_go(&go)
            .into_iter()
            .filter(|id| batch.contains(id))
            .collect();
        let mqplug_ids: Vec<String> = handled_by_mqplug(&recorder)
            .into_iter()
            .filter(|id| batch.contains(id))
            .collect();
        if !go_ids.is_empty()
            && !mqplug_ids.is_empty()
            && go_ids.len() + mqplug_ids.len() == batch.len()
        {
            settled = true;
            break;
        }
    }
    ensure!(settled, "the group never settled into a split");

    // Both run: each message goes to exactly one of them, exactly once.
    const BOTH: u64 = 200;
    let mut while_both = HashSet::new();
    for i in 0..BOTH {
        let receipt = publisher
            .publish(&sample_event("USER_REGISTER", 10_000 + i))
            .await?;
        while_both.insert(receipt.message_id.clone());
        published.push(receipt.message_id);
    }
    ensure!(
        recorder.wait_until(WAIT, |r| all_handled(&while_both, &go, r)),
        "not every message was handled while both ran"
    );
    let count = |ids: Vec<String>| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for id in ids.into_iter().filter(|id| while_both.contains(id)) {
            *counts.entry(id).or_default() += 1;
        }
        counts
    };
    let by_go = count(handled_by_go(&go));
    let by_mqplug = count(handled_by_mqplug(&recorder));
    for id in &while_both {
        let times = by_go.get(id).copied().unwrap_or(0) + by_mqplug.get(id).copied().unwrap_or(0);
        assert_eq!(
            times, 1,
            "message {id} handled {times} times while both ran"
        );
    }
    ensure!(
        !by_go.is_empty() && !by_mqplug.is_empty(),
        "both members take a share: Go {}, mqplug {}",
        by_go.len(),
        by_mqplug.len()
    );
    println!(
        "while both ran: Go handled {}, mqplug {} of {BOTH}; warm-up {} events",
        by_go.len(),
        by_mqplug.len(),
        published.len() - BOTH as usize
    );

    // The Go service leaves: mqplug takes over its queues and nothing is lost.
    tokio::task::block_in_place(|| go.stop())?;
    const AFTER: u64 = 100;
    for i in 0..AFTER {
        published.push(
            publisher
                .publish(&sample_event("USER_LOGIN", 20_000 + i))
                .await?
                .message_id,
        );
    }
    let all_ids: HashSet<String> = published.iter().cloned().collect();
    let all_handled = recorder.wait_until(WAIT, |r| {
        let seen: HashSet<String> = handled_by_go(&go)
            .into_iter()
            .chain(handled_by_mqplug(r))
            .collect();
        all_ids.iter().all(|id| seen.contains(id))
    });
    host.shutdown().await;
    ensure!(
        all_handled,
        "after the Go consumer left, some messages were never handled:\n{}",
        broker.logs()
    );
    Ok(())
}
