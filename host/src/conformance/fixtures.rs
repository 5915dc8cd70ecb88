//! The plugin author's fixtures: JSON Lines, one event a line with the
//! outcome the plugin must give it.
//!
//! ```json
//! {"name": "grants points", "event": {"event_type": "USER_REGISTER", ...}, "expect": "ok"}
//! {"event": {...}, "expect": "err", "reason": "count must be", "delivery": {"reconsume_times": 3}}
//! ```
//!
//! `event` is a `TaskEventMessage` in either field spelling; `expect` is
//! `ok`, `err` (any error), or one kind of error: `retry`, `retry-after`,
//! `dead-letter`; `reason` is a regular expression the handler's error must
//! match; `delivery` sets any of the delivery fields, the rest take test
//! defaults.
//!
//! Capabilities, virtualised:
//!
//! ```json
//! {"event": {...}, "expect": "ok",
//!  "http": [{"method": "POST", "url": "http://rewards.test/grants", "status": 201, "body": {"grant_id": "g-1"}}],
//!  "requests": [{"method": "POST", "url": "http://rewards.test/grants", "headers": {"idempotency-key": "fixture-1"}, "body": "\"points\":10"}],
//!  "published": [{"topic": "marketing.reward.granted", "tag": "REWARD_GRANTED", "body": "g-1"}]}
//! ```
//!
//! `http` answers requests by method and URL (status, optional `headers`,
//! `body` as text or JSON); `requests` lists the requests the handler must
//! make, in order (`headers` it must carry, `body` a pattern), `published`
//! the messages it must publish, in order (`tag`, `keys` and `body`, a
//! pattern, are optional). Either list, when present, must match exactly.
//!
//! State, in the kit's own in-memory store, emptied before every event:
//!
//! ```json
//! {"event": {...}, "expect": "ok",
//!  "kv": {"granted": {"other-message": "done:{}"}},
//!  "expect_kv": {"granted": {"fixture-1": "^done:", "other-message": "^done:", "gone": null}}}
//! ```
//!
//! `kv` presets keys (bucket, key, value as text) before the event;
//! `expect_kv` checks keys after it: a value matching a pattern, or `null`
//! for absent. The buckets must be granted (the grants line's `key_value`).

use std::collections::BTreeMap;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::delivery::Delivery;
use crate::event::{DEFAULT_MAX_BODY_BYTES, TaskEvent};

/// What the handler must answer.
#[derive(Debug, Clone)]
pub enum Expect {
    Ok,
    /// `err` of this kind, with a reason matching the pattern when one is
    /// given.
    Err {
        kind: ErrKind,
        reason: Option<Regex>,
    },
}

/// Which `err` a fixture expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrKind {
    /// Any of them (`"err"`).
    Any,
    Retry,
    RetryAfter,
    DeadLetter,
}

/// An answer the kit gives a request, in place of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// Any method when absent.
    pub method: Option<String>,
    pub url: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A request the handler must make.
#[derive(Debug, Clone)]
pub struct ExpectedRequest {
    pub method: String,
    pub url: String,
    /// Headers it must carry (names compared without case), values exact.
    pub headers: Vec<(String, String)>,
    pub body: Option<Regex>,
}

/// A message the handler must publish.
#[derive(Debug, Clone)]
pub struct ExpectedMessage {
    pub topic: String,
    pub tag: Option<String>,
    pub keys: Option<Vec<String>>,
    pub body: Option<Regex>,
}

/// One fixture, ready to run.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub event: TaskEvent,
    pub delivery: Delivery,
    pub expect: Expect,
    pub http: Vec<HttpAnswer>,
    /// Checked when given: exactly these requests, in order.
    pub requests: Option<Vec<ExpectedRequest>>,
    /// Checked when given: exactly these messages, in order.
    pub published: Option<Vec<ExpectedMessage>>,
    /// Keys set before the event: (bucket, key, value).
    pub kv: Vec<(String, String, Vec<u8>)>,
    /// Keys checked after it: (bucket, key, a pattern its value matches, or
    /// `None` for absent).
    pub expect_kv: Vec<(String, String, Option<Regex>)>,
}

impl Fixture {
    /// Whether the fixture answers or checks HTTP requests: then the kit
    /// answers every request itself and none goes out.
    pub fn virtualises_http(&self) -> bool {
        !self.http.is_empty() || self.requests.is_some()
    }
}

/// A line that is not a usable fixture; the kit reports it as a failed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixtureError {
    pub name: String,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    name: Option<String>,
    event: Value,
    expect: ExpectWord,
    reason: Option<String>,
    #[serde(default)]
    delivery: DeliveryFields,
    #[serde(default)]
    http: Vec<AnswerLine>,
    requests: Option<Vec<RequestLine>>,
    published: Option<Vec<MessageLine>>,
    #[serde(default)]
    kv: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    expect_kv: BTreeMap<String, BTreeMap<String, Option<String>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ExpectWord {
    Ok,
    Err,
    Retry,
    RetryAfter,
    DeadLetter,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerLine {
    method: Option<String>,
    url: String,
    status: u16,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    method: String,
    url: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    body: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageLine {
    topic: String,
    tag: Option<String>,
    keys: Option<Vec<String>>,
    body: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeliveryFields {
    message_id: Option<String>,
    topic: Option<String>,
    tags: Option<String>,
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    reconsume_times: u32,
    #[serde(default)]
    queue_id: u32,
    queue_offset: Option<i64>,
    born_timestamp: Option<i64>,
}

/// What the plugin's config entry would grant, given in the fixture file
/// itself so that `mqplug test plugin.wasm --fixtures f.jsonl` needs no
/// flags: one line `{"grants": {...}}` anywhere in the file. The kit's
/// `--config`, `--secret`, `--allow-outbound` and `--allow-topic` add to it
/// (and win for the same key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureGrants {
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
    /// Test values of the secrets (never real ones: a fixture file is
    /// checked in).
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    #[serde(default)]
    pub allowed_topics: Vec<String>,
    /// Buckets the plugin may open, as in its `key_value.buckets`.
    #[serde(default)]
    pub key_value: Option<FixtureBuckets>,
}

/// The grants line's `key_value`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureBuckets {
    pub buckets: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsLine {
    grants: FixtureGrants,
}

/// Whether a line is the grants line (an object whose key is `grants`).
fn is_grants_line(line: &str) -> bool {
    line.trim_start().starts_with('{')
        && serde_json::from_str::<serde_json::Map<String, Value>>(line)
            .is_ok_and(|object| object.contains_key("grants"))
}

/// The lines that hold fixtures or grants: neither blank nor a comment,
/// with their line numbers.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(index, line)| {
        let trimmed = line.trim();
        (!trimmed.is_empty() && !trimmed.starts_with('#')).then_some((index + 1, line))
    })
}

/// The file's grants line, if it has one; the error names the line.
pub fn grants(text: &str) -> Result<Option<FixtureGrants>, FixtureError> {
    let mut found = None;
    for (number, line) in lines(text).filter(|(_, line)| is_grants_line(line)) {
        let fail = |reason: String| FixtureError {
            name: format!("line {number}"),
            reason,
        };
        if found.is_some() {
            return Err(fail("a second grants line; give one".into()));
        }
        let line: GrantsLine =
            serde_json::from_str(line).map_err(|err| fail(format!("not a grants line: {err}")))?;
        found = Some(line.grants);
    }
    Ok(found)
}

/// Parses fixture text; blank lines, lines starting with `#` and the
/// grants line ([`grants`]) are skipped. Every other line gives a fixture
/// or an error naming its line.
pub fn parse(text: &str) -> Vec<Result<Fixture, FixtureError>> {
    lines(text)
        .filter(|(_, line)| !is_grants_line(line))
        .map(|(number, line)| parse_line(number, line))
        .collect()
}

fn parse_line(number: usize, text: &str) -> Result<Fixture, FixtureError> {
    let fallback = format!("line {number}");
    let fail = |name: &str, reason: String| FixtureError {
        name: name.to_string(),
        reason,
    };
    let line: Line = serde_json::from_str(text)
        .map_err(|err| fail(&fallback, format!("not a fixture: {err}")))?;
    let name = match line.name {
        Some(name) => format!("{fallback}: {name}"),
        None => fallback,
    };
    let body = serde_json::to_vec(&line.event).expect("a JSON value always serializes");
    let event = TaskEvent::decode(&body, DEFAULT_MAX_BODY_BYTES)
        .map_err(|err| fail(&name, format!("`event` is not a task event: {err}")))?;
    let pattern = |what: &str, text: Option<String>| {
        text.map(|text| {
            Regex::new(&text)
                .map_err(|err| fail(&name, format!("`{what}` is not a valid pattern: {err}")))
        })
        .transpose()
    };
    let kind = match line.expect {
        ExpectWord::Ok => None,
        ExpectWord::Err => Some(ErrKind::Any),
        ExpectWord::Retry => Some(ErrKind::Retry),
        ExpectWord::RetryAfter => Some(ErrKind::RetryAfter),
        ExpectWord::DeadLetter => Some(ErrKind::DeadLetter),
    };
    let expect = match (kind, line.reason) {
        (None, None) => Expect::Ok,
        (None, Some(_)) => {
            return Err(fail(
                &name,
                "`reason` goes with an error, not \"ok\"".into(),
            ));
        }
        (Some(kind), reason) => Expect::Err {
            kind,
            reason: pattern("reason", reason)?,
        },
    };
    let http = line
        .http
        .into_iter()
        .map(|answer| HttpAnswer {
            method: answer.method,
            url: answer.url,
            status: answer.status,
            headers: answer.headers.into_iter().collect(),
            body: match answer.body {
                Value::Null => Vec::new(),
                Value::String(text) => text.into_bytes(),
                json => json.to_string().into_bytes(),
            },
        })
        .collect();
    let requests = match line.requests {
        None => None,
        Some(lines) => Some(
            lines
                .into_iter()
                .map(|request| {
                    Ok(ExpectedRequest {
                        method: request.method,
                        url: request.url,
                        headers: request.headers.into_iter().collect(),
                        body: pattern("requests[].body", request.body)?,
                    })
                })
                .collect::<Result<Vec<_>, FixtureError>>()?,
        ),
    };
    let published = match line.published {
        None => None,
        Some(lines) => Some(
            lines
                .into_iter()
                .map(|message| {
                    Ok(ExpectedMessage {
                        topic: message.topic,
                        tag: message.tag,
                        keys: message.keys,
                        body: pattern("published[].body", message.body)?,
                    })
                })
                .collect::<Result<Vec<_>, FixtureError>>()?,
        ),
    };
    let kv = line
        .kv
        .into_iter()
        .flat_map(|(bucket, keys)| {
            keys.into_iter()
                .map(move |(key, value)| (bucket.clone(), key, value.into_bytes()))
        })
        .collect();
    let mut expect_kv = Vec::new();
    for (bucket, keys) in line.expect_kv {
        for (key, value) in keys {
            let value = pattern("expect_kv value", value)?;
            expect_kv.push((bucket.clone(), key, value));
        }
    }
    let fields = line.delivery;
    let delivery = Delivery {
        message_id: fields
            .message_id
            .unwrap_or_else(|| format!("fixture-{number}")),
        topic: fields
            .topic
            .unwrap_or_else(|| "marketing_task_completed".into()),
        tags: fields.tags.or_else(|| Some(event.event_type.clone())),
        keys: fields.keys,
        reconsume_times: fields.reconsume_times,
        queue_id: fields.queue_id,
        queue_offset: fields
            .queue_offset
            .unwrap_or_else(|| i64::try_from(number).unwrap_or(i64::MAX)),
        born_timestamp: fields.born_timestamp.unwrap_or(1_764_051_555_000),
        trace: Default::default(),
    };
    Ok(Fixture {
        name,
        event,
        delivery,
        expect,
        http,
        requests,
        published,
        kv,
        expect_kv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"EventType":"USER_REGISTER","UserID":1,"TenantID":"t","AppID":"a",
        "CampaignID":"c","CampaignName":"测试活动","Timestamp":"2026-11-25T14:19:15+08:00"}"#;

    fn line(rest: &str) -> String {
        format!(r#"{{"event":{},{rest}}}"#, EVENT.replace('\n', ""))
    }

    #[test]
    fn reads_expectations_and_delivery_fields() {
        let text = [
            "# comment",
            "",
            &line(r#""name":"grants","expect":"ok""#),
            &line(r#""expect":"err","reason":"^count","delivery":{"reconsume_times":3}"#),
        ]
        .join("\n");
        let fixtures: Vec<Fixture> = parse(&text).into_iter().map(Result::unwrap).collect();
        assert_eq!(fixtures[0].name, "line 3: grants");
        assert!(matches!(fixtures[0].expect, Expect::Ok));
        assert_eq!(fixtures[0].event.campaign_name, "测试活动");
        assert_eq!(fixtures[0].delivery.tags.as_deref(), Some("USER_REGISTER"));
        assert_eq!(fixtures[1].name, "line 4");
        assert_eq!(fixtures[1].delivery.reconsume_times, 3);
        match &fixtures[1].expect {
            Expect::Err {
                kind: ErrKind::Any,
                reason: Some(pattern),
            } => assert!(pattern.is_match("count is bad")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_lines_name_their_line_and_fault() {
        let text = [
            "not json",
            &line(r#""expect":"maybe""#),
            &line(r#""expect":"ok","reason":"x""#),
            &line(r#""expect":"err","reason":"(""#),
            r#"{"event":{"event_type":"X"},"expect":"ok"}"#,
            &line(r#""expect":"ok","delivery":{"retries":1}"#),
        ]
        .join("\n");
        let errors: Vec<FixtureError> = parse(&text).into_iter().map(Result::unwrap_err).collect();
        assert_eq!(errors.len(), 6);
        for (index, error) in errors.iter().enumerate() {
            assert!(
                error.name.starts_with(&format!("line {}", index + 1)),
                "{error:?}"
            );
        }
        assert!(errors[0].reason.starts_with("not a fixture"), "{errors:?}");
        assert!(errors[1].reason.contains("maybe"), "{errors:?}");
        assert!(
            errors[2].reason.contains("`reason` goes with an error"),
            "{errors:?}"
        );
        assert!(
            errors[3].reason.contains("not a valid pattern"),
            "{errors:?}"
        );
        assert!(errors[4].reason.contains("missing field"), "{errors:?}");
        assert!(errors[5].reason.contains("retries"), "{errors:?}");
    }

    #[test]
    fn a_grants_line_is_read_apart_from_the_fixtures() {
        let text = [
            r#"{"grants": {"config": {"rewards_url": "http://r.test"}, "secrets": {"token": "t"}, "allowed_outbound_hosts": ["http://r.test"], "allowed_topics": ["marketing.reward.granted"]}}"#,
            &line(r#""expect":"ok""#),
        ]
        .join("\n");
        let given = grants_of(&text).unwrap();
        assert_eq!(given.config["rewards_url"], "http://r.test");
        assert_eq!(given.secrets["token"], "t");
        assert_eq!(given.allowed_topics, ["marketing.reward.granted"]);
        let fixtures = parse(&text);
        assert_eq!(fixtures.len(), 1);
        assert_eq!(fixtures[0].as_ref().unwrap().name, "line 2");
        assert_eq!(grants_of(""), None);

        let twice = format!("{}\n{}", r#"{"grants": {}}"#, r#"{"grants": {}}"#);
        assert!(grants(&twice).unwrap_err().reason.contains("second"));
        let unknown = r#"{"grants": {"allowed_everything": true}}"#;
        assert!(
            grants(unknown)
                .unwrap_err()
                .reason
                .contains("allowed_everything")
        );
    }

    fn grants_of(text: &str) -> Option<FixtureGrants> {
        grants(text).unwrap()
    }

    #[test]
    fn reads_http_answers_and_expected_requests_and_messages() {
        let text = line(
            r#""expect":"dead-letter","http":[{"url":"http://r.test/grants","status":201,"body":{"grant_id":"g-1"}}],"requests":[{"method":"POST","url":"http://r.test/grants","headers":{"Idempotency-Key":"fixture-1"},"body":"points"}],"published":[{"topic":"marketing.reward.granted","tag":"REWARD_GRANTED","body":"g-1"}]"#,
        );
        let fixture = parse(&text).remove(0).unwrap();
        assert!(matches!(
            fixture.expect,
            Expect::Err {
                kind: ErrKind::DeadLetter,
                reason: None
            }
        ));
        assert_eq!(fixture.http[0].method, None);
        assert_eq!(fixture.http[0].body, br#"{"grant_id":"g-1"}"#);
        let requests = fixture.requests.as_ref().unwrap();
        assert_eq!(
            requests[0].headers,
            [("Idempotency-Key".to_string(), "fixture-1".to_string())]
        );
        assert!(
            requests[0]
                .body
                .as_ref()
                .unwrap()
                .is_match(r#"{"points":10}"#)
        );
        let published = fixture.published.as_ref().unwrap();
        assert_eq!(published[0].tag.as_deref(), Some("REWARD_GRANTED"));
        assert!(fixture.virtualises_http());

        let bad = line(r#""expect":"ok","requests":[{"method":"GET","url":"u","body":"("}]"#);
        let error = parse(&bad).remove(0).unwrap_err();
        assert!(error.reason.contains("requests[].body"), "{error:?}");
    }
}
