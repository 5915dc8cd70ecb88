//! A cluster that asks for credentials: the Java broker with ACL 2.0 on
//! (authentication and authorization), users and permissions made with
//! mqadmin. The right credentials consume; wrong or missing ones stop the
//! host at once with the broker's reason and the group and topic refused; a
//! user that may consume but not publish sees its follow-ups refused, with
//! why.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mqplug::Host;
use mqplug::config::{CredentialsConfig, HostConfig, PluginConfig, SecretSource};
use mqplug::mq::{Credentials, MqRuntime, ProducerSettings, Publisher};
use mqplug::topic::TopicName;
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event};

const TOPIC: &str = "marketing.task.completed";
const FOLLOW_UP_TOPIC: &str = "marketing.reward.granted";
const GROUP: &str = "mqplug-rewards";
const WAIT: Duration = Duration::from_secs(90);

/// Credentials read from two files in `dir`, as an operator would keep them.
fn credentials_in(dir: &Path, access_key: &str, secret_key: &str) -> Result<CredentialsConfig> {
    let (access, secret) = (dir.join("access_key"), dir.join("secret_key"));
    std::fs::write(&access, format!("{access_key}\n"))?;
    std::fs::write(&secret, format!("{secret_key}\n"))?;
    let file = |path: std::path::PathBuf| SecretSource {
        env: None,
        file: Some(path),
    };
    Ok(CredentialsConfig {
        access_key: file(access),
        secret_key: file(secret),
    })
}

/// A host config for the rewards plugin (chaos), signing as `credentials`,
/// with the producer on for its follow-ups; topics are made by mqadmin.
fn secured_config(
    broker: &LocalBroker,
    credentials: Option<CredentialsConfig>,
) -> Result<HostConfig> {
    let mut config = host_config(
        broker,
        TOPIC,
        vec![PluginConfig {
            allowed_topics: vec![FOLLOW_UP_TOPIC.into()],
            ..PluginConfig::new("rewards", plugin_path("chaos")?)
        }],
    );
    // Creating topics takes a super user; mqadmin made them.
    config.producer.create_topic_queues = None;
    config.credentials = credentials;
    Ok(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_cluster_takes_the_right_credentials_and_names_what_it_refuses() -> Result<()> {
    let broker = LocalBroker::start_secured()?;
    let addr = broker.broker_addr.clone();
    for topic in [TOPIC, FOLLOW_UP_TOPIC] {
        let wire = TopicName::new(topic)?.wire().to_string();
        broker.mqadmin(
            "updateTopic",
            &["-b", &addr, "-t", &wire, "-r", "4", "-w", "4"],
        )?;
    }
    // team-a may consume the topic in its group (and read offsets), and
    // publish the events; it may not publish follow-ups.
    broker.mqadmin(
        "createUser",
        &[
            "-b", &addr, "-u", "team-a", "-p", "secret-a", "-t", "Normal",
        ],
    )?;
    let resources = format!("Topic:{},Group:{GROUP}", TopicName::new(TOPIC)?.wire());
    broker.mqadmin(
        "createAcl",
        &[
            "-b",
            &addr,
            "-s",
            "User:team-a",
            "-r",
            &resources,
            "-a",
            "Pub,Sub,Get",
            "-d",
            "Allow",
        ],
    )?;
    let dir = tempfile::tempdir()?;

    // Wrong secret: the host does not start, and says who refused what.
    let wrong = secured_config(
        &broker,
        Some(credentials_in(dir.path(), "team-a", "not-it")?),
    )?;
    let refused = Host::start(&wrong, Default::default())
        .await
        .err()
        .map(|e| e.to_string());
    // No credentials at all.
    let anonymous = secured_config(&broker, None)?;
    let unnamed = Host::start(&anonymous, Default::default())
        .await
        .err()
        .map(|e| e.to_string());

    // The right ones: events are handled; follow-ups are refused, with why.
    let right = secured_config(
        &broker,
        Some(credentials_in(dir.path(), "team-a", "secret-a")?),
    )?;
    let recorder = Recorder::new();
    let host = Host::start(&right, recorder.observers()).await?;
    let mq = MqRuntime::with_credentials(
        1,
        Some(Credentials {
            access_key: "team-a".into(),
            secret_key: "secret-a".into(),
        }),
    )?;
    let publisher = Publisher::start(
        &mq,
        ProducerSettings::new(broker.name_server.clone(), TopicName::new(TOPIC)?),
    )
    .await?;
    let plain = publisher
        .publish(&sample_event("USER_REGISTER", 1))
        .await?
        .message_id;
    let with_follow_ups = publisher
        .publish(&mqplug_tests::sample_event_with(
            "PUBLISH",
            2,
            serde_json::json!({"topic": FOLLOW_UP_TOPIC, "count": 1}),
        ))
        .await?
        .message_id;
    let seen = recorder.wait_until(WAIT, |r| {
        r.handled_message("rewards", &plain)
            && r.handled_by("rewards").iter().any(|h| {
                h.message_id == with_follow_ups
                    && h.cause
                        .as_deref()
                        .is_some_and(|c| c.contains("no permission"))
            })
    });
    let handled = recorder.handled_by("rewards");
    publisher.shutdown().await;
    mq.shutdown().await;
    host.shutdown().await;

    let refused = refused.context("a wrong secret was accepted")?;
    assert!(
        refused.contains(&format!(
            "refused group {GROUP} on topic marketing_task_completed"
        )) && refused.contains("check signature failed"),
        "{refused}"
    );
    let unnamed = unnamed.context("no credentials were accepted")?;
    assert!(
        unnamed.contains(&format!("refused group {GROUP}")),
        "{unnamed}"
    );
    ensure!(
        seen,
        "the plain event handled and the follow-ups refused with why: {handled:#?}"
    );
    let cause = handled
        .iter()
        .find(|h| h.message_id == with_follow_ups)
        .and_then(|h| h.cause.clone())
        .unwrap_or_default();
    assert!(
        cause.contains("marketing_reward_granted") && cause.contains("may not publish"),
        "{cause}"
    );
    Ok(())
}
