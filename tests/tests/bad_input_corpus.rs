//! A corpus of malformed bodies through a real broker: each one gets the
//! documented outcome (ConsumeRetryLater) with a cause that says what is
//! wrong, no handler runs, and the host keeps handling good messages.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mqplug::config::PluginConfig;
use mqplug::{DeliveryOutcome, Host};
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event};

const MIB: usize = 1024 * 1024;

/// A valid body with `field` replaced by `value` (raw JSON).
fn with(field: &str, value: &str) -> Vec<u8> {
    let mut body: serde_json::Value =
        serde_json::from_slice(&sample_event("USER_REGISTER", 1).encode()).unwrap();
    body[field] = serde_json::from_str(value).unwrap();
    serde_json::to_vec(&body).unwrap()
}

fn corpus() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let nested = format!(
        "{}{}",
        "{\"a\":".repeat(200),
        "1".to_string() + &"}".repeat(200)
    );
    let mut huge = sample_event("USER_REGISTER", 1).encode();
    huge.pop(); // the closing brace
    huge.extend_from_slice(b",\"padding\":\"");
    huge.resize(4_000_000, b'x');
    huge.extend_from_slice(b"\"}");
    vec![
        ("not JSON", b"hello, broker".to_vec(), "expected value"),
        (
            "invalid UTF-8",
            b"{\"event_type\":\"\xff\xfe\"}".to_vec(),
            "invalid unicode",
        ),
        (
            "wrong type",
            with("UserID", "\"abc\""),
            "invalid type: string \"abc\"",
        ),
        (
            "missing field",
            br#"{"event_type":"USER_REGISTER"}"#.to_vec(),
            "missing field",
        ),
        ("4 MB body", huge, "over the 3145728-byte limit"),
        (
            "nested 200 deep",
            format!(
                r#"{{"event_type":"X","user_id":1,"tenant_id":"t","app_id":"a","campaign_id":"c","campaign_name":"n","event_data":{nested},"timestamp":"2026-11-25T14:19:15+08:00"}}"#
            )
            .into_bytes(),
            "recursion limit exceeded",
        ),
        (
            "not RFC 3339",
            with("Timestamp", "\"25/11/2026 14:19\""),
            "is not RFC 3339",
        ),
        (
            "fractional user id",
            with("UserID", "1.5"),
            "invalid type: floating point",
        ),
        (
            "negative user id",
            with("UserID", "-1"),
            "invalid value: integer `-1`",
        ),
        (
            "event data not an object",
            with("EventData", "[1,2]"),
            "must be a JSON object",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_body_is_retried_with_its_cause_and_good_ones_still_flow() -> Result<()> {
    let broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let mut config = host_config(
        &broker,
        "bad_input_corpus",
        vec![PluginConfig::new("rewards", plugin_path("reward-logger")?)],
    );
    config.max_body_bytes = 3 * MIB;
    let host = Host::start(&config, recorder.observers()).await?;
    let publisher = host.publisher().context("the producer is enabled")?;

    let mut sent = Vec::new();
    for (what, body, cause) in corpus() {
        let id = publisher.publish_body(body, None, vec![]).await?.message_id;
        sent.push((what, id, cause));
    }
    let good = publisher
        .publish(&sample_event("USER_REGISTER", 7))
        .await?
        .message_id;
    let all = recorder.wait_until(Duration::from_secs(90), |r| {
        let handled = r.handled();
        sent.iter()
            .map(|(_, id, _)| id)
            .chain([&good])
            .all(|id| handled.iter().any(|h| &h.message_id == id))
    });
    host.shutdown().await;
    ensure!(all, "not every message was handled:\n{}", broker.logs());

    let handled = recorder.handled();
    for (what, id, expected) in &sent {
        let first = handled
            .iter()
            .find(|h| &h.message_id == id)
            .context("handled")?;
        assert_eq!(first.outcome, DeliveryOutcome::ConsumeRetryLater, "{what}");
        let cause = first.cause.as_deref().unwrap_or_default();
        assert!(cause.starts_with("undecodable: "), "{what}: {cause}");
        assert!(
            cause.contains(expected),
            "{what}: {cause:?} lacks {expected:?}"
        );
        assert_eq!(first.version, None, "{what}: no handler ran");
    }
    let ok = handled
        .iter()
        .find(|h| h.message_id == good)
        .context("handled")?;
    assert_eq!(ok.outcome, DeliveryOutcome::ConsumeSuccess);
    println!(
        "{} malformed bodies, each retried with its cause; the good one acknowledged",
        sent.len()
    );
    Ok(())
}
