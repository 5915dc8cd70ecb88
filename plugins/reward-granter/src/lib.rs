//! Example plugin: grants the points a completed task earns by calling the
//! team's rewards service, then announces the grant on
//! `marketing.reward.granted`. The same plugin is in Python
//! (`plugins/python/reward_granter`) and JavaScript
//! (`plugins/js/reward-granter`).
//!
//! Its entry grants what it uses:
//!
//! ```toml
//! [[plugin]]
//! name = "reward-granter"
//! path = "reward_granter.wasm"
//! allowed_outbound_hosts = ["http://127.0.0.1:8080"]
//! allowed_topics = ["marketing.reward.granted"]
//! [plugin.config]
//! rewards_url = "http://127.0.0.1:8080"
//! [plugin.secrets]
//! rewards_token = { env = "REWARDS_TOKEN" }
//! ```
//!
//! - Points: 10 per unit of `event_data.count` (default 1). A count that is
//!   not a non-negative integer will not become one on a retry: the event
//!   goes to the dead-letter queue.
//! - `POST <rewards_url>/grants` with the message id as `idempotency-key`:
//!   a redelivered event (the host crashed after the grant, say) asks again
//!   with the same key and the service answers with the first grant instead
//!   of granting twice.
//! - 201 or 200: publishes `{"grant_id", "user_id", "points",
//!   "campaign_id", "message_id"}` with tag `REWARD_GRANTED`; the host sends
//!   it once the handler returns `ok`.
//! - 429 or 503: retry no sooner than the service's `retry-after` seconds
//!   (default 30 s). Any other 5xx, or no answer: retry on the broker's
//!   schedule. 400: the request will not get better, dead-letter. 401 or
//!   403: retry, since fixing the token in the config mends it.
//! - With config `dedupe_bucket` (a bucket its `key_value` entry grants;
//!   empty or unset: off),
//!   the grant is done once per message id ([`mqplug_plugin::Once`]): a
//!   redelivery of a granted event does not call the service again; it
//!   announces the grant it recorded. The idempotency key still closes the
//!   window `Once` leaves (a crash between the grant and its record).
//!   `dedupe_lease_ms` (default 60000) is how long a delivery's claim holds
//!   while it grants; keep it above the plugin's `deadline_ms`.

use std::time::Duration;

use mqplug_plugin::{Delivery, Event, Failure, Handler, Once, config, http, log, publish};
use serde_json::{Value, json};

/// Where the follow-up goes.
const GRANTED_TOPIC: &str = "marketing.reward.granted";

struct RewardGranter;

impl Handler for RewardGranter {
    fn handle(event: Event, delivery: Delivery) -> Result<(), Failure> {
        let count = match event.event_data.get("count") {
            None => 1,
            Some(value) => value.as_u64().ok_or_else(|| {
                Failure::dead_letter(format!(
                    "event_data.count must be a non-negative integer, got {value}"
                ))
            })?,
        };
        let points = count.saturating_mul(10);
        let url = config::get("rewards_url").ok_or("config rewards_url is not set")?;
        let token = config::get("rewards_token").ok_or("secret rewards_token is not set")?;

        let grant = || request_grant(&url, &token, &event, points, &delivery.message_id);
        let bucket = config::optional("dedupe_bucket").filter(|bucket| !bucket.is_empty());
        let (body, how) = match bucket {
            Some(bucket) => {
                // The claim's lease is config `dedupe_lease_ms` (60 s
                // by default), above the plugin's deadline.
                let done = Once::new(&bucket)
                    .run(&delivery.message_id, || grant().map(|(body, _)| body))?;
                let how = if done.ran_now {
                    ""
                } else {
                    ", recorded before"
                };
                (done.value, how)
            }
            None => grant()?,
        };
        let grant: Value = serde_json::from_slice(&body)
            .map_err(|err| format!("rewards service sent no JSON: {err}"))?;
        let grant_id = grant["grant_id"].as_str().unwrap_or_default();
        let announcement = json!({
            "grant_id": grant_id,
            "user_id": event.user_id,
            "points": points,
            "campaign_id": event.campaign_id,
            "message_id": delivery.message_id,
        })
        .to_string();
        // No grant id (a service that sent none): no key, rather than an
        // empty one, which the host refuses.
        let keys: &[&str] = if grant_id.is_empty() {
            &[]
        } else {
            std::slice::from_ref(&grant_id)
        };
        publish::send(
            GRANTED_TOPIC,
            Some("REWARD_GRANTED"),
            keys,
            announcement.as_bytes(),
        )?;
        log::info(&format!(
            "granted {points} points to user {} in campaign {} (grant {grant_id}{how})",
            event.user_id, event.campaign_id,
        ));
        Ok(())
    }
}

/// Asks the rewards service for the grant; the grant's JSON, and how it
/// was answered for the log.
fn request_grant(
    url: &str,
    token: &str,
    event: &Event,
    points: u64,
    message_id: &str,
) -> Result<(Vec<u8>, &'static str), Failure> {
    let body = json!({
        "user_id": event.user_id,
        "points": points,
        "campaign_id": event.campaign_id,
    })
    .to_string();
    let authorization = format!("Bearer {token}");
    let response = http::request(
        "POST",
        &format!("{}/grants", url.trim_end_matches('/')),
        &[
            ("content-type", "application/json"),
            ("authorization", &authorization),
            ("idempotency-key", message_id),
        ],
        Some(body.as_bytes()),
    )
    .map_err(|why| format!("rewards service: {why}"))?;
    match response.status {
        201 => Ok((response.body, "")),
        200 => Ok((response.body, ", already granted before")),
        429 | 503 => {
            let seconds = header(&response, "retry-after")
                .and_then(|value| value.trim().parse::<u64>().ok())
                .unwrap_or(30);
            Err(Failure::retry_after(
                Duration::from_secs(seconds),
                format!("rewards service busy ({})", response.status),
            ))
        }
        400 => Err(Failure::dead_letter(format!(
            "rewards service refused the grant: {}",
            String::from_utf8_lossy(&response.body)
        ))),
        status => Err(format!("rewards service answered {status}").into()),
    }
}

/// A response header's value as text.
fn header<'a>(response: &'a http::Response, name: &str) -> Option<&'a str> {
    response
        .headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
}

mqplug_plugin::export_handler!(RewardGranter);
