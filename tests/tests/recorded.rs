//! Recorded failures against a real broker: the reward granter fails an
//! event because the rewards service answers 500; the failure is written
//! down with what the plugin saw, `mqplug dlq export` makes it a kit
//! fixture, and `mqplug test` replays it with the service gone: the same
//! failure, and a pass for a build that handles the event.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use mqplug::{DeliveryOutcome, Host};
use mqplug_tests::rewards::RewardsService;
use mqplug_tests::{LocalBroker, Recorder, plugins::plugin_path, sample_event, test_cache_dir};

const WAIT: Duration = Duration::from_secs(90);
const TOKEN: &str = "token-never-written-down";

/// Runs `mqplug ARGS` as the binary would, in the library.
fn mqplug(args: &[&str]) -> Result<std::process::ExitCode> {
    let cli =
        mqplug::cli::Cli::try_parse_from(std::iter::once("mqplug").chain(args.iter().copied()))?;
    mqplug::cli::execute(cli.command)
}

/// The `<testcase>` of a JUnit report whose name contains `name`, with its
/// failure if it has one.
fn testcase<'a>(junit: &'a str, name: &str) -> Option<&'a str> {
    let start = junit.find(name)?;
    let rest = &junit[start..];
    let end = rest.find("<testcase").unwrap_or(rest.len());
    Some(&rest[..end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_from_a_500_becomes_a_fixture_that_fails_the_same_way_with_no_network()
-> Result<()> {
    let broker = LocalBroker::start()?;
    let rewards = RewardsService::start(TOKEN)?;
    rewards.fail_with(Some((500, "ledger unavailable")));
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("rewards_token"), format!("{TOKEN}\n"))?;
    let config_path = dir.path().join("mqplug.toml");
    std::fs::write(
        &config_path,
        format!(
            "name_server = \"{}\"\n\
             [producer]\nenabled = true\ncreate_topic_queues = 4\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [runtime]\ncache_dir = {:?}\n\
             [[plugin]]\nname = \"reward-granter\"\npath = {:?}\nconsume_from = \"first\"\n\
             allowed_outbound_hosts = [\"{url}\"]\nallowed_topics = [\"marketing.reward.granted\"]\n\
             [plugin.config]\nrewards_url = \"{url}\"\n\
             [plugin.secrets]\nrewards_token = {{ file = \"rewards_token\" }}\n\
             [plugin.record_failures]\ndir = \"failures\"\nmax_mb = 1\n",
            broker.name_server,
            test_cache_dir(),
            plugin_path("reward-granter")?,
            url = rewards.url(),
        ),
    )?;
    let config = mqplug::config::HostConfig::from_file(&config_path)?;
    let recorder = Recorder::new();
    let host = Host::start(&config, recorder.observers()).await?;
    let receipt = host
        .publisher()
        .context("the producer is on")?
        .publish(&sample_event("USER_REGISTER", 42))
        .await?;
    let id = receipt.message_id.clone();
    let failed = recorder.wait_until(WAIT, |r| {
        r.handled_by("reward-granter")
            .iter()
            .any(|h| h.message_id == id && h.outcome == DeliveryOutcome::ConsumeRetryLater)
    });
    host.shutdown().await;
    ensure!(
        failed,
        "not failed: {:?}",
        recorder.handled_by("reward-granter")
    );

    // What was written down: the event, the 500, the config read; the
    // secret by name only.
    let file = dir
        .path()
        .join("failures/reward-granter")
        .join(format!("{id}.json"));
    let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
    // The service echoed the token in its answer: blanked.
    assert!(text.contains("Bearer [secret]"), "{text}");
    assert!(
        !text.contains(TOKEN),
        "the secret is never written down: {text}"
    );
    let recording: mqplug::recorded::Recording = serde_json::from_str(&text)?;
    assert_eq!(recording.outcome, "retry");
    assert_eq!(recording.reason, "rewards service answered 500");
    assert_eq!(recording.event.user_id, 42);
    assert_eq!(recording.seen.http.len(), 1, "{recording:#?}");
    assert_eq!(recording.seen.http[0].status, Some(500));
    assert!(recording.seen.http[0].body.contains("ledger unavailable"));
    assert_eq!(
        recording.seen.config["rewards_url"].as_deref(),
        Some(rewards.url().as_str())
    );
    assert!(
        recording.seen.secrets.contains("rewards_token"),
        "{recording:#?}"
    );

    // Exported as a fixture, then replayed with the service gone.
    let fixture = dir.path().join("failure.jsonl");
    let (config_arg, fixture_arg) = (
        config_path.display().to_string(),
        fixture.display().to_string(),
    );
    mqplug(&[
        "dlq",
        "export",
        "--config",
        &config_arg,
        "--plugin",
        "reward-granter",
        "--id",
        &id,
        "--out",
        &fixture_arg,
    ])?;
    drop(rewards);
    // The kit runs wasm that blocks on WASI: off the async threads.
    let replay = |plugin: &'static str, junit: std::path::PathBuf| {
        let fixture = fixture_arg.clone();
        tokio::task::spawn_blocking(move || -> Result<String> {
            let (plugin, junit_arg) = (
                plugin_path(plugin)?.display().to_string(),
                junit.display().to_string(),
            );
            mqplug(&[
                "test",
                &plugin,
                "--fixtures",
                &fixture,
                "--junit",
                &junit_arg,
            ])?;
            Ok(std::fs::read_to_string(&junit)?)
        })
    };
    let buggy = replay("reward-granter", dir.path().join("granter.xml")).await??;
    let case = testcase(&buggy, "recorded failure of message").context("the fixture ran")?;
    assert!(
        case.contains("<failure") && case.contains("rewards service answered 500"),
        "the replay fails as the broker saw it: {case}"
    );
    // A build that handles the event (the no-op plugin stands in for a
    // fixed granter): the same fixture passes.
    let fixed = replay("noop", dir.path().join("fixed.xml")).await??;
    let case = testcase(&fixed, "recorded failure of message").context("the fixture ran")?;
    assert!(!case.contains("<failure"), "{case}");
    Ok(())
}
