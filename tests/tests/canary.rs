//! Canary builds against a real broker: a candidate beside the current
//! build takes a share of users; a bad one is rolled back by itself with no
//! message lost, a good one is promoted on command with none handled twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use mqplug::canary::{CanaryConfig, user_bucket};
use mqplug::config::PluginConfig;
use mqplug::{DeliveryOutcome, Host};
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event};

const WAIT: Duration = Duration::from_secs(120);

/// One HTTP/1.1 request to the admin listener; the status and body.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}content-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("a status line")?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok((code, body.to_string()))
}

/// The plugin's `canary` object on `/plugins`.
fn canary_status(host: &Host, plugin: &str) -> Result<serde_json::Value> {
    let (_, body) = request(
        host.admin_addr().context("admin is on")?,
        "GET",
        "/plugins",
        "",
    )?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let entry = status["plugins"]
        .as_array()
        .and_then(|plugins| plugins.iter().find(|p| p["name"] == plugin))
        .with_context(|| format!("{plugin} on /plugins: {status}"))?;
    Ok(entry.clone())
}

/// The entry `rewards`: the no-op plugin, with the chaos plugin as its
/// candidate for `percent` of users.
fn entry_with_canary(percent: u8, window: u32, min_events: u32) -> Result<PluginConfig> {
    let mut entry = PluginConfig::new("rewards", plugin_path("noop")?);
    entry.canary = Some(CanaryConfig {
        path: plugin_path("chaos")?,
        percent,
        window,
        min_events,
    });
    Ok(entry)
}

/// The digest of a plugin file, as versions are reported.
fn version_of(plugin: &str) -> Result<String> {
    Ok(mqplug::wasm::Version::of(&std::fs::read(plugin_path(plugin)?)?).0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_failing_every_event_is_rolled_back_and_its_messages_are_retried_by_the_current_build()
-> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "marketing.task.completed",
        vec![entry_with_canary(50, 50, 10)?],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is on")?;
    let (current, candidate) = (version_of("noop")?, version_of("chaos")?);

    // Chaos fails every FAIL event; the no-op plugin accepts them.
    let mut published = HashSet::new();
    for user in 1..=60u64 {
        let receipt = publisher.publish(&sample_event("FAIL", user)).await?;
        published.insert(receipt.message_id);
    }
    let all_succeeded = |r: &Recorder| {
        let ok: HashSet<String> = r
            .handled_by("rewards")
            .into_iter()
            .filter(|h| h.outcome == DeliveryOutcome::ConsumeSuccess)
            .map(|h| h.message_id)
            .collect();
        published.is_subset(&ok)
    };
    let done = recorder.wait_until(WAIT, all_succeeded);
    let status = canary_status(&host, "rewards")?;

    // Published after the rollback: the current build takes every user.
    let mut after = HashSet::new();
    if done {
        for user in 61..=80u64 {
            let receipt = publisher.publish(&sample_event("FAIL", user)).await?;
            after.insert(receipt.message_id);
        }
    }
    let after_done = recorder.wait_until(WAIT, |r| {
        let ok: HashSet<String> = r
            .handled_by("rewards")
            .into_iter()
            .filter(|h| h.outcome == DeliveryOutcome::ConsumeSuccess)
            .map(|h| h.message_id)
            .collect();
        after.is_subset(&ok)
    });
    host.shutdown().await;
    ensure!(
        done && after_done,
        "not every message succeeded: {:#?}\n{status}",
        recorder.handled_by("rewards")
    );

    let canary = &status["canary"];
    assert_eq!(canary["state"], "rolled-back", "{status}");
    assert!(
        canary["reason"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("the candidate failed")),
        "{status}"
    );
    // Judged each time it has min_events (10) more first deliveries: well
    // within its window.
    let tried = canary["candidate"]["handled"].as_u64().unwrap_or(0);
    eprintln!("the candidate handled {tried} messages before and while it was rolled back");
    assert!((10..=50).contains(&tried), "{status}");
    assert_eq!(canary["candidate"]["failed"], tried, "{status}");
    assert_eq!(
        status["version"],
        current.as_str(),
        "the current build serves"
    );

    let handled = recorder.handled_by("rewards");
    let mut by_message: HashMap<&str, Vec<&mqplug_tests::recorder::Handled>> = HashMap::new();
    for h in &handled {
        by_message.entry(&h.message_id).or_default().push(h);
    }
    let mut failed_by_candidate = 0;
    for id in published.iter().chain(&after) {
        let deliveries = &by_message[id.as_str()];
        let successes: Vec<_> = deliveries
            .iter()
            .filter(|h| h.outcome == DeliveryOutcome::ConsumeSuccess)
            .collect();
        assert_eq!(successes.len(), 1, "acknowledged once: {deliveries:#?}");
        assert_eq!(
            successes[0].version.as_deref(),
            Some(current.as_str()),
            "succeeded on the current build: {deliveries:#?}"
        );
        for failure in deliveries
            .iter()
            .filter(|h| h.outcome != DeliveryOutcome::ConsumeSuccess)
        {
            assert_eq!(failure.version.as_deref(), Some(candidate.as_str()));
            assert_eq!(failure.outcome, DeliveryOutcome::ConsumeRetryLater);
            failed_by_candidate += 1;
        }
    }
    assert_eq!(
        failed_by_candidate as u64, tried,
        "every candidate failure was retried"
    );
    for id in &after {
        assert_eq!(
            by_message[id.as_str()].len(),
            1,
            "after the rollback: once, on the current build"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_candidate_takes_its_share_of_users_and_is_promoted_with_no_message_handled_twice()
-> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let config = host_config(
        &broker,
        "marketing.task.completed",
        vec![entry_with_canary(30, 200, 20)?],
    );
    let host = Host::start(&config, recorder.observers()).await?;
    let admin = host.admin_addr().context("admin is on")?;
    let publisher = host.publisher().context("the producer is on")?;
    let (current, candidate) = (version_of("noop")?, version_of("chaos")?);

    // Two events per user: one user's messages go to one build.
    let mut users = BTreeMap::new();
    for round in 0..2 {
        for user in 1..=40u64 {
            let receipt = publisher
                .publish(&sample_event("USER_REGISTER", user))
                .await?;
            users.insert(receipt.message_id, (user, round));
        }
    }
    let before = recorder.wait_until(WAIT, |r| r.handled_by("rewards").len() >= users.len());
    ensure!(
        before,
        "not all handled: {:#?}",
        recorder.handled_by("rewards")
    );

    // Without the header (what a page of another origin could send): refused.
    let (code, body) = request(admin, "POST", "/plugins/rewards/canary/promote", "")?;
    assert_eq!(code, 403, "{body}");
    let (code, body) = request(
        admin,
        "POST",
        "/plugins/nobody/canary/promote",
        "x-mqplug-action: promote\r\n",
    )?;
    assert_eq!(code, 404, "{body}");
    // As an operator does it: `mqplug canary promote`, then an abort that
    // comes too late.
    let canary_command = |verb: &'static str| {
        let admin = admin.to_string();
        tokio::task::spawn_blocking(move || {
            let cli = mqplug::cli::Cli::try_parse_from([
                "mqplug", "canary", verb, "--plugin", "rewards", "--admin", &admin,
            ])?;
            mqplug::cli::execute(cli.command)
        })
    };
    // Promoted while messages are in flight: 20 published just before,
    // 20 just after.
    let mut mid = HashSet::new();
    for user in 1..=20u64 {
        let receipt = publisher
            .publish(&sample_event("USER_REGISTER", user))
            .await?;
        mid.insert(receipt.message_id);
    }
    canary_command("promote").await??;
    for user in 21..=40u64 {
        let receipt = publisher
            .publish(&sample_event("USER_REGISTER", user))
            .await?;
        mid.insert(receipt.message_id);
    }
    let (_, body) = request(admin, "GET", "/plugins", "")?;
    assert!(body.contains("\"state\": \"promoted\""), "{body}");
    let refused = canary_command("abort")
        .await?
        .expect_err("a promoted canary cannot be aborted");
    assert_eq!(
        refused.to_string(),
        "plugin rewards: its canary is promoted"
    );

    let mut later = HashSet::new();
    for user in 1..=40u64 {
        let receipt = publisher
            .publish(&sample_event("USER_REGISTER", user))
            .await?;
        later.insert(receipt.message_id);
    }
    let total = users.len() + mid.len() + later.len();
    let all = recorder.wait_until(WAIT, |r| r.handled_by("rewards").len() >= total);
    tokio::time::sleep(mqplug_tests::QUIET_PERIOD).await;
    let status = canary_status(&host, "rewards")?;
    host.shutdown().await;
    ensure!(
        all,
        "not all handled: {:#?}",
        recorder.handled_by("rewards")
    );

    let handled = recorder.handled_by("rewards");
    assert_eq!(
        handled.len(),
        total,
        "each message handled once: {handled:#?}"
    );
    let ids: HashSet<&str> = handled.iter().map(|h| h.message_id.as_str()).collect();
    assert_eq!(ids.len(), total, "no message handled twice");
    assert!(
        handled
            .iter()
            .all(|h| h.outcome == DeliveryOutcome::ConsumeSuccess)
    );
    // Before the promotion each user's messages went to the build its
    // bucket names; around it, a current-bucket user's to either build; after
    // it, every message to the candidate.
    for h in &handled {
        let version = h.version.as_deref();
        if let Some((user, _)) = users.get(&h.message_id) {
            let expected = if user_bucket(*user) < 30 {
                &candidate
            } else {
                &current
            };
            assert_eq!(version, Some(expected.as_str()), "user {user}: {h:?}");
        } else if mid.contains(&h.message_id) {
            assert!(
                version == Some(candidate.as_str()) || version == Some(current.as_str()),
                "{h:?}"
            );
        } else {
            assert_eq!(
                version,
                Some(candidate.as_str()),
                "after the promotion: {h:?}"
            );
        }
    }
    let on_candidate = (1..=40u64).filter(|user| user_bucket(*user) < 30).count();
    assert!(
        on_candidate > 0 && on_candidate < 40,
        "both builds had users"
    );
    assert_eq!(status["canary"]["state"], "promoted", "{status}");
    assert_eq!(status["version"], candidate.as_str(), "{status}");
    let counted = status["canary"]["candidate"]["handled"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        counted >= (on_candidate * 2) as u64,
        "the candidate's first deliveries before the promotion: {status}"
    );
    assert_eq!(
        status["path"],
        plugin_path("chaos")?.display().to_string(),
        "the candidate's file serves"
    );
    Ok(())
}
