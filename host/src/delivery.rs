//! Delivery metadata: where and how a message reached mqplug.

/// Everything a plugin may want to know about a message besides its event.
/// Built by the RocketMQ adapter; read by the dispatcher and the wasm runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The producer's id for the message (RocketMQ's `UNIQ_KEY` property):
    /// stable across redeliveries, unlike the broker's offset id.
    pub message_id: String,
    /// The wire topic the message came from.
    pub topic: String,
    pub tags: Option<String>,
    pub keys: Vec<String>,
    /// 0 on first delivery, 1 on the first redelivery, ...
    pub reconsume_times: u32,
    pub queue_id: u32,
    pub queue_offset: i64,
    /// Milliseconds since the Unix epoch.
    pub born_timestamp: i64,
    /// The W3C trace context the message carries (its `traceparent` and
    /// `tracestate` properties); while a plugin handles it, that plugin's
    /// span's (see [`crate::traces`]).
    pub trace: crate::traces::TraceContext,
}
