//! The plugin author's fixtures: JSON Lines, one event a line with the
//! outcome the plugin must give it.
//!
//! ```json
//! {"name": "grants points", "event": {"event_type": "USER_REGISTER", ...}, "expect": "ok"}
//! {"event": {...}, "expect": "err", "reason": "count must be", "delivery": {"reconsume_times": 3}}
//! ```
//!
//! `event` is a `TaskEventMessage` in either field spelling; `reason` is a
//! regular expression the handler's error must match; `delivery` sets any of
//! the delivery fields, the rest take test defaults.

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::delivery::Delivery;
use crate::event::{DEFAULT_MAX_BODY_BYTES, TaskEvent};

/// What the handler must answer.
#[derive(Debug, Clone)]
pub enum Expect {
    Ok,
    /// `err`, with a reason matching the pattern when one is given.
    Err(Option<Regex>),
}

/// One fixture, ready to run.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub name: String,
    pub event: TaskEvent,
    pub delivery: Delivery,
    pub expect: Expect,
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
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ExpectWord {
    Ok,
    Err,
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

/// Parses fixture text; blank lines and lines starting with `#` are skipped.
/// Every other line gives a fixture or an error naming its line.
pub fn parse(text: &str) -> Vec<Result<Fixture, FixtureError>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with('#')
        })
        .map(|(index, line)| parse_line(index + 1, line))
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
    let expect = match (line.expect, line.reason) {
        (ExpectWord::Ok, None) => Expect::Ok,
        (ExpectWord::Ok, Some(_)) => {
            return Err(fail(&name, "`reason` goes with \"expect\": \"err\"".into()));
        }
        (ExpectWord::Err, None) => Expect::Err(None),
        (ExpectWord::Err, Some(pattern)) => {
            Expect::Err(Some(Regex::new(&pattern).map_err(|err| {
                fail(&name, format!("`reason` is not a valid pattern: {err}"))
            })?))
        }
    };
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
    };
    Ok(Fixture {
        name,
        event,
        delivery,
        expect,
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
            Expect::Err(Some(pattern)) => assert!(pattern.is_match("count is bad")),
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
            errors[2].reason.contains("`reason` goes with"),
            "{errors:?}"
        );
        assert!(
            errors[3].reason.contains("not a valid pattern"),
            "{errors:?}"
        );
        assert!(errors[4].reason.contains("missing field"), "{errors:?}");
        assert!(errors[5].reason.contains("retries"), "{errors:?}");
    }
}
