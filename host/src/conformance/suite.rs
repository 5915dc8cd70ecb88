//! The built-in events: every field of the contract at its edges. A plugin
//! may accept or reject each (`ok` or `err`), but must not trap, run out of
//! memory or overrun its deadline on any of them.

use serde_json::{Map, Value, json};

use crate::delivery::Delivery;
use crate::event::{DEFAULT_MAX_BODY_BYTES, TaskEvent};

/// One built-in case.
pub struct Case {
    pub name: &'static str,
    pub event: TaskEvent,
    pub delivery: Delivery,
}

/// The marketing platform's own example event (its RocketMQ guide).
pub fn platform_example() -> TaskEvent {
    TaskEvent {
        event_type: "USER_REGISTER".into(),
        user_id: 123,
        tenant_id: "tenant1".into(),
        app_id: "app1".into(),
        campaign_id: "campaign-1".into(),
        campaign_name: "测试活动".into(),
        event_data: object(json!({"source": "web", "invite_code": "ABC123"})),
        timestamp: "2026-11-25T14:19:15+08:00".into(),
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("the suite's event data are objects"),
    }
}

fn delivery(number: usize) -> Delivery {
    let example = platform_example();
    Delivery {
        message_id: format!("conformance-{number}"),
        topic: "marketing_task_completed".into(),
        keys: vec![example.key()],
        tags: Some(example.event_type),
        reconsume_times: 0,
        queue_id: 0,
        queue_offset: i64::try_from(number).unwrap_or(i64::MAX),
        born_timestamp: 1_764_051_555_000,
        trace: Default::default(),
    }
}

/// Decodes a body the way the consumer does, so the spellings are tested
/// through the real decoder.
fn decoded(body: &str) -> TaskEvent {
    TaskEvent::decode(body.as_bytes(), DEFAULT_MAX_BODY_BYTES)
        .expect("the suite's bodies are valid task events")
}

/// Event data of about `bytes` bytes of JSON: many small records.
fn large_event_data(bytes: usize) -> Map<String, Value> {
    let record = json!({"sku": "SKU-0000000", "qty": 1, "note": "a reasonably ordinary line item"});
    let per_record = serde_json::to_string(&record).map_or(64, |text| text.len() + 1);
    let items: Vec<Value> = (0..bytes / per_record)
        .map(|i| json!({"sku": format!("SKU-{i:07}"), "qty": i % 9, "note": "a reasonably ordinary line item"}))
        .collect();
    object(json!({ "items": items }))
}

/// Event data nested `depth` objects deep, within the decoder's limits.
fn nested_event_data(depth: usize) -> Map<String, Value> {
    let mut value = json!({"leaf": true});
    for level in 0..depth {
        value = json!({ format!("level{level}"): value });
    }
    object(value)
}

/// The built-in cases, in a fixed order.
pub fn cases() -> Vec<Case> {
    let example = platform_example();
    let mut cases = vec![
        Case {
            name: "platform example (USER_REGISTER, 测试活动)",
            event: example.clone(),
            delivery: delivery(0),
        },
        Case {
            name: "snake_case field names",
            event: decoded(
                r#"{"event_type":"TASK_DONE","user_id":42,"tenant_id":"tenant1","app_id":"app1",
                "campaign_id":"campaign-2","campaign_name":"Spring","event_data":{"count":2},
                "timestamp":"2026-11-25T06:19:15Z"}"#,
            ),
            delivery: delivery(1),
        },
        Case {
            name: "Go field names (EventType, UserID, ...) and null event data",
            event: decoded(
                r#"{"EventType":"TASK_DONE","UserID":42,"TenantID":"tenant1","AppID":"app1",
                "CampaignID":"campaign-2","CampaignName":"Spring","EventData":null,
                "Timestamp":"2026-11-25T14:19:15.123456789+08:00"}"#,
            ),
            delivery: delivery(2),
        },
        Case {
            name: "empty strings and empty event data",
            event: TaskEvent {
                event_type: String::new(),
                tenant_id: String::new(),
                app_id: String::new(),
                campaign_id: String::new(),
                campaign_name: String::new(),
                event_data: Map::new(),
                ..example.clone()
            },
            delivery: Delivery {
                tags: None,
                keys: Vec::new(),
                ..delivery(3)
            },
        },
        Case {
            name: "smallest user id (0)",
            event: TaskEvent {
                user_id: 0,
                ..example.clone()
            },
            delivery: delivery(4),
        },
        Case {
            name: "largest user id (2^64 - 1)",
            event: TaskEvent {
                user_id: u64::MAX,
                ..example.clone()
            },
            delivery: delivery(5),
        },
        Case {
            name: "non-ASCII text in every string",
            event: TaskEvent {
                event_type: "任务完成".into(),
                tenant_id: "租户-ü-١".into(),
                app_id: "app-😀".into(),
                campaign_id: "кампания-1".into(),
                campaign_name: "测试活动 🎉 café \u{202e}gnol\u{202c} e\u{301}".into(),
                event_data: object(json!({"备注": "满减 ✓", "emoji": "👩‍👩‍👧", "nul": "a\u{0}b"})),
                ..example.clone()
            },
            delivery: delivery(6),
        },
        Case {
            name: "large event data (1 MiB)",
            event: TaskEvent {
                event_data: large_event_data(1024 * 1024),
                ..example.clone()
            },
            delivery: delivery(7),
        },
        Case {
            name: "deeply nested event data (100 levels)",
            event: TaskEvent {
                event_data: nested_event_data(100),
                ..example.clone()
            },
            delivery: delivery(8),
        },
    ];
    cases.push(Case {
        name: "a redelivery (reconsume times 16, the broker's default maximum)",
        event: example,
        delivery: Delivery {
            reconsume_times: 16,
            queue_id: u32::from(u16::MAX),
            queue_offset: i64::MAX,
            ..delivery(9)
        },
    });
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_survives_the_consumers_encoding() {
        for case in cases() {
            let body = case.event.encode();
            assert!(body.len() <= DEFAULT_MAX_BODY_BYTES, "{}", case.name);
            let again = TaskEvent::decode(&body, DEFAULT_MAX_BODY_BYTES).unwrap();
            assert_eq!(again, case.event, "{}", case.name);
        }
    }

    #[test]
    fn the_large_case_is_large_and_the_nested_case_is_deep() {
        let cases = cases();
        let large = cases
            .iter()
            .find(|c| c.name.starts_with("large event data"))
            .unwrap();
        let size = large.event.event_data_json().len();
        assert!(size >= 1000 * 1024, "{size}");
        let nested = cases.iter().find(|c| c.name.starts_with("deeply")).unwrap();
        let text = nested.event.event_data_json();
        assert_eq!(text.matches('{').count(), 101);
    }
}
