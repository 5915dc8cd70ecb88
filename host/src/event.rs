//! The task event model shared by the RocketMQ adapter and the wasm runtime.
//!
//! Depends on neither: it is plain data plus the JSON decoding rules of the
//! marketing platform's `TaskEventMessage`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Bodies larger than this are rejected before parsing. RocketMQ's own default
/// maximum message size is 4 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// One `TaskEventMessage`: a user completed a campaign task.
///
/// On the wire the fields carry the Go names the platform's `TaskTriggerService`
/// emits (its struct has no json tags: `EventType`, `UserID`, ...), and that is
/// what encoding writes, so the platform's own Go consumers decode what mqplug
/// publishes. Decoding also accepts snake_case (`event_type`, `user_id`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    #[serde(rename = "EventType", alias = "event_type")]
    pub event_type: String,
    #[serde(rename = "UserID", alias = "user_id")]
    pub user_id: u64,
    #[serde(rename = "TenantID", alias = "tenant_id")]
    pub tenant_id: String,
    #[serde(rename = "AppID", alias = "app_id")]
    pub app_id: String,
    #[serde(rename = "CampaignID", alias = "campaign_id")]
    pub campaign_id: String,
    #[serde(rename = "CampaignName", alias = "campaign_name")]
    pub campaign_name: String,
    /// Free-form data; absent or `null` (a nil Go map) decodes as `{}`.
    #[serde(
        rename = "EventData",
        alias = "event_data",
        default,
        deserialize_with = "object_or_null"
    )]
    pub event_data: Map<String, Value>,
    /// RFC 3339 text, kept as sent; decoding checks that it parses.
    #[serde(rename = "Timestamp", alias = "timestamp")]
    pub timestamp: String,
}

/// Why a message body is not a task event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("body is not a valid task event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`timestamp` {value:?} is not RFC 3339 ({reason})")]
    Timestamp { value: String, reason: String },
}

impl TaskEvent {
    /// Decodes a message body, rejecting bodies over `max_body_bytes`.
    pub fn decode(body: &[u8], max_body_bytes: usize) -> Result<TaskEvent, DecodeError> {
        if body.len() > max_body_bytes {
            return Err(DecodeError::TooLarge {
                size: body.len(),
                limit: max_body_bytes,
            });
        }
        let event: TaskEvent = serde_json::from_slice(body)?;
        if let Err(err) = chrono::DateTime::parse_from_rfc3339(&event.timestamp) {
            return Err(DecodeError::Timestamp {
                value: event.timestamp,
                reason: err.to_string(),
            });
        }
        Ok(event)
    }

    /// The JSON body as the platform's Go producer writes it (Go field names),
    /// which is how mqplug's producer publishes it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a TaskEvent always serializes")
    }

    /// The event data as JSON text, as plugins receive it.
    pub fn event_data_json(&self) -> String {
        serde_json::to_string(&self.event_data).expect("a JSON map always serializes")
    }

    /// A key that identifies the event across producers and retries: the
    /// same completion of the same task always gets the same key.
    pub fn key(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}",
            self.tenant_id, self.campaign_id, self.user_id, self.event_type, self.timestamp
        )
    }
}

fn object_or_null<'de, D>(deserializer: D) -> Result<Map<String, Value>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(Map::new()),
        Value::Object(map) => Ok(map),
        other => Err(serde::de::Error::custom(format!(
            "`event_data` must be a JSON object, got {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNAKE: &str = r#"{"event_type":"USER_REGISTER","user_id":123,"tenant_id":"tenant1",
        "app_id":"app1","campaign_id":"campaign-1","campaign_name":"测试活动",
        "event_data":{"count":1},"timestamp":"2026-11-25T14:19:15+08:00"}"#;

    const GO: &str = r#"{"EventType":"USER_REGISTER","UserID":123,"TenantID":"tenant1",
        "AppID":"app1","CampaignID":"campaign-1","CampaignName":"测试活动",
        "EventData":{"count":1},"Timestamp":"2026-11-25T14:19:15+08:00"}"#;

    fn decode(body: &str) -> Result<TaskEvent, DecodeError> {
        TaskEvent::decode(body.as_bytes(), DEFAULT_MAX_BODY_BYTES)
    }

    #[test]
    fn snake_case_and_go_spellings_decode_to_the_same_event() {
        let snake = decode(SNAKE).unwrap();
        assert_eq!(snake, decode(GO).unwrap());
        assert_eq!(snake.event_type, "USER_REGISTER");
        assert_eq!(snake.user_id, 123);
        assert_eq!(snake.campaign_name, "测试活动");
        assert_eq!(snake.event_data_json(), r#"{"count":1}"#);
    }

    #[test]
    fn encoding_writes_the_go_field_names_and_round_trips() {
        let event = decode(SNAKE).unwrap();
        let body = String::from_utf8(event.encode()).unwrap();
        let written: Value = serde_json::from_str(&body).unwrap();
        let go: Value = serde_json::from_str(GO).unwrap();
        assert_eq!(written, go, "the platform's own spelling, field for field");
        assert_eq!(decode(&body).unwrap(), event);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let body = SNAKE.replacen('{', r#"{"trace_id":"abc","extra":{"x":[1]},"#, 1);
        assert_eq!(decode(&body).unwrap(), decode(SNAKE).unwrap());
    }

    #[test]
    fn absent_or_null_event_data_is_an_empty_object() {
        let absent = SNAKE.replace(r#""event_data":{"count":1},"#, "");
        assert_eq!(decode(&absent).unwrap().event_data_json(), "{}");
        let null = SNAKE.replace(r#"{"count":1}"#, "null");
        assert_eq!(decode(&null).unwrap().event_data_json(), "{}");
    }

    #[test]
    fn a_missing_field_is_named() {
        let body = SNAKE.replace(r#""tenant_id":"tenant1","#, "");
        let err = decode(&body).unwrap_err().to_string();
        // Named as it is on the wire, in the platform's spelling.
        assert!(err.contains("missing field `TenantID`"), "{err}");
    }

    #[test]
    fn wrong_types_are_rejected_with_the_reason() {
        let cases = [
            (r#""user_id":123"#, r#""user_id":"123""#, "expected u64"),
            (r#""user_id":123"#, r#""user_id":-1"#, "expected u64"),
            (r#""user_id":123"#, r#""user_id":1.5"#, "expected u64"),
            (
                r#"{"count":1}"#,
                "[1]",
                "must be a JSON object, got an array",
            ),
            (
                r#""event_type":"USER_REGISTER""#,
                r#""event_type":7"#,
                "expected a string",
            ),
        ];
        for (from, to, expected) in cases {
            let err = decode(&SNAKE.replace(from, to)).unwrap_err().to_string();
            assert!(err.contains(expected), "{to}: {err}");
        }
    }

    #[test]
    fn a_timestamp_that_is_not_rfc3339_is_rejected() {
        let body = SNAKE.replace("2026-11-25T14:19:15+08:00", "2026-11-25 14:19:15");
        let err = decode(&body).unwrap_err();
        assert!(matches!(err, DecodeError::Timestamp { .. }), "{err}");
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"not json",
            b"\xff\xfe",
            b"[]",
            b"null",
            b"{\"user_id\":",
        ] {
            assert!(TaskEvent::decode(body, DEFAULT_MAX_BODY_BYTES).is_err());
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let body = SNAKE.replace(r#"{"count":1}"#, &format!(r#"{{"deep":{deep}}}"#));
        assert!(decode(&body).is_err());
    }

    #[test]
    fn bodies_over_the_limit_are_rejected_before_parsing() {
        let err = TaskEvent::decode(SNAKE.as_bytes(), 10).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLarge { limit: 10, .. }),
            "{err}"
        );
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        /// Valid bodies with a byte flipped, cut short or grown: the decoder's
        /// hardest inputs are the near misses.
        fn arb_event() -> impl Strategy<Value = TaskEvent> {
            (
                ".{0,20}",
                any::<u64>(),
                ".{0,12}",
                ".{0,12}",
                ".{0,12}",
                ".{0,20}",
                proptest::collection::btree_map(".{0,8}", any::<i64>(), 0..4),
                (0u32..9999, 1u32..13, 1u32..29, 0u32..24, 0u32..60, 0u32..60),
            )
                .prop_map(
                    |(
                        event_type,
                        user_id,
                        tenant_id,
                        app_id,
                        campaign_id,
                        campaign_name,
                        data,
                        t,
                    )| {
                        TaskEvent {
                            event_type,
                            user_id,
                            tenant_id,
                            app_id,
                            campaign_id,
                            campaign_name,
                            event_data: data
                                .into_iter()
                                .map(|(k, v)| (k, Value::from(v)))
                                .collect(),
                            timestamp: format!(
                                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                                t.0, t.1, t.2, t.3, t.4, t.5
                            ),
                        }
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::fuzz_cases()))]

            #[test]
            fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = TaskEvent::decode(&body, DEFAULT_MAX_BODY_BYTES);
            }

            #[test]
            fn near_misses_of_a_valid_body_never_panic(
                position in any::<usize>(), byte in any::<u8>(), cut in any::<bool>(),
                go_spelling in any::<bool>(),
            ) {
                let body = if go_spelling { GO } else { SNAKE };
                let _ = TaskEvent::decode(&crate::mutated(body.as_bytes(), position, byte, cut), DEFAULT_MAX_BODY_BYTES);
            }

            #[test]
            fn every_valid_event_survives_encode_and_decode(event in arb_event()) {
                let decoded = TaskEvent::decode(&event.encode(), DEFAULT_MAX_BODY_BYTES).unwrap();
                prop_assert_eq!(decoded, event);
            }
        }
    }
}
