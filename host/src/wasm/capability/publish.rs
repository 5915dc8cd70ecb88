//! The `publish` import: follow-up messages a handler puts in its event's
//! outbox, checked against the plugin's `allowed_topics` and bounded. The
//! dispatcher sends them after `ok`; this module only holds them.

use crate::topic::TopicName;
use crate::wasm::bindings::v0_2::mqplug::plugin::publish;

/// Most messages one event may publish.
pub const MAX_OUTBOX_MESSAGES: u32 = 16;
/// Largest body of one follow-up message.
pub const MAX_OUTBOX_BODY_BYTES: u32 = 4 * 1024 * 1024;
/// Most keys one follow-up message may carry besides the host's.
const MAX_KEYS: usize = 8;
/// Longest tag or key.
const MAX_KEY_BYTES: usize = 256;

/// One follow-up message, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub topic: TopicName,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub body: Vec<u8>,
}

/// The topics a plugin may publish to (none by default).
#[derive(Debug, Clone, Default)]
pub struct PublishGrants {
    topics: Vec<TopicName>,
    /// Topics asked for and refused (at most 32), shared by every copy.
    refused: super::noted::Noted,
}

impl PartialEq for PublishGrants {
    fn eq(&self, other: &Self) -> bool {
        self.topics == other.topics
    }
}

impl Eq for PublishGrants {}

/// Why a message was refused, as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    TopicNotAllowed(String),
    TooLarge(u32),
    TooMany(u32),
    /// The message breaks a rule of RocketMQ's (the reason says which):
    /// a control character in a tag or key (the client joins properties
    /// with U+0001 and U+0002, so one would forge properties), a space in
    /// a key (keys are joined with spaces), `||` in a tag (subscriptions
    /// split on it), an empty tag or key, or an empty body (the client
    /// refuses it). Contract 0.2 has no case for it: the call traps with
    /// the reason, which fails the event and names it in the host's log.
    Invalid(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TopicNotAllowed(topic) => {
                write!(f, "topic {topic:?} is not in the plugin's allowed_topics")
            }
            Refusal::TooLarge(limit) => write!(
                f,
                "over a limit (body {limit} bytes, {MAX_KEYS} keys, {MAX_KEY_BYTES} bytes a tag or key)"
            ),
            Refusal::TooMany(limit) => {
                write!(f, "the event's outbox already holds {limit} messages")
            }
            Refusal::Invalid(why) => f.write_str(why),
        }
    }
}

/// Why RocketMQ could not carry `tag`, `keys` and `body` as given, if so.
fn invalid(tag: Option<&str>, keys: &[String], body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return Some("the body is empty (RocketMQ refuses an empty message)".into());
    }
    if let Some(tag) = tag {
        if tag.is_empty() {
            return Some("the tag is empty (give none instead)".into());
        }
        let splits = ("||", "`||`, which subscriptions split on");
        if let Some(why) = unfit_property("tag", tag, splits) {
            return Some(why);
        }
    }
    for key in keys {
        if key.is_empty() {
            return Some("a key is empty".into());
        }
        let splits = (
            " ",
            "a space (RocketMQ joins keys with spaces: it would be two keys)",
        );
        if let Some(why) = unfit_property("key", key, splits) {
            return Some(why);
        }
    }
    None
}

/// Why `text`, the message's `what` (a tag or a key), cannot be a message
/// property, if so: a control character would forge properties, and
/// `splits` (a separator, and why it matters) would cut it where RocketMQ
/// cuts.
fn unfit_property(what: &str, text: &str, splits: (&str, &str)) -> Option<String> {
    let shown = format!("`{}`", crate::text::inert(text, 64));
    if text.chars().any(char::is_control) {
        return Some(format!(
            "the {what} {shown} has a control character (RocketMQ joins properties with U+0001 and U+0002)"
        ));
    }
    let (separator, why) = splits;
    text.contains(separator)
        .then(|| format!("the {what} {shown} has {why}"))
}

impl PublishGrants {
    pub fn new(topics: Vec<TopicName>) -> Self {
        PublishGrants {
            topics,
            refused: Default::default(),
        }
    }

    /// Topics the plugin published to that its grants refused, so far.
    pub fn refused(&self) -> Vec<String> {
        self.refused.list()
    }

    pub fn topics(&self) -> &[TopicName] {
        &self.topics
    }

    /// Checks one message against the grants and the outbox so far.
    pub fn admit(
        &self,
        outbox: &[OutgoingMessage],
        topic: &str,
        tag: Option<String>,
        keys: Vec<String>,
        body: Vec<u8>,
    ) -> Result<OutgoingMessage, Refusal> {
        let Some(topic) = self
            .topics
            .iter()
            .find(|granted| granted.configured() == topic || granted.wire() == topic)
        else {
            let topic = crate::text::inert_owned(topic.to_string(), MAX_KEY_BYTES);
            self.refused.note(&topic);
            return Err(Refusal::TopicNotAllowed(topic));
        };
        if outbox.len() >= MAX_OUTBOX_MESSAGES as usize {
            return Err(Refusal::TooMany(MAX_OUTBOX_MESSAGES));
        }
        if body.len() > MAX_OUTBOX_BODY_BYTES as usize
            || keys.len() > MAX_KEYS
            || tag.as_ref().is_some_and(|tag| tag.len() > MAX_KEY_BYTES)
            || keys.iter().any(|key| key.len() > MAX_KEY_BYTES)
        {
            return Err(Refusal::TooLarge(MAX_OUTBOX_BODY_BYTES));
        }
        if let Some(why) = invalid(tag.as_deref(), &keys, &body) {
            return Err(Refusal::Invalid(why));
        }
        Ok(OutgoingMessage {
            topic: topic.clone(),
            tag,
            keys,
            body,
        })
    }
}

/// The message id of follow-up message `index` that `plugin` published for
/// the incoming message `message_id`: 32 hex digits, like a client's.
///
/// Derived from all of it: the plugin, the incoming message, the index, and
/// the message itself (topic, tag, keys, body). A redelivered event whose
/// handler publishes the same message again gets the same id, so consumers
/// downstream that drop duplicates by id see it once; two plugins handling
/// one message, or a handler that publishes something else the second
/// time, get distinct ids, so such a consumer never drops a message it has
/// not seen.
pub fn follow_up_id(
    plugin: &str,
    message_id: &str,
    index: usize,
    message: &OutgoingMessage,
) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    // Every field length-prefixed: no two lists of fields hash alike.
    let mut field = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_be_bytes());
        digest.update(bytes);
    };
    field(b"mqplug-outbox-2");
    field(plugin.as_bytes());
    field(message_id.as_bytes());
    field(&(index as u64).to_be_bytes());
    field(message.topic.wire().as_bytes());
    match &message.tag {
        Some(tag) => field(format!("tag:{tag}").as_bytes()),
        None => field(b"no tag"),
    }
    field(&(message.keys.len() as u64).to_be_bytes());
    for key in &message.keys {
        field(key.as_bytes());
    }
    field(&message.body);
    digest.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// The key the host gives follow-up message `index` of `message_id`.
pub fn follow_up_key(message_id: &str, index: usize) -> String {
    format!("{message_id}:{index}")
}

/// One instance's `publish`: the current event's outbox, sent after `ok`.
pub(crate) struct Publish {
    grants: std::sync::Arc<PublishGrants>,
    pub(crate) outbox: Vec<OutgoingMessage>,
}

impl Publish {
    pub(crate) fn new(grants: std::sync::Arc<PublishGrants>) -> Self {
        Publish {
            grants,
            outbox: Vec::new(),
        }
    }

    /// A new event starts with an empty outbox.
    pub(crate) fn begin_event(&mut self) {
        self.outbox.clear();
    }

    /// Links `publish`; `get` picks the instance's outbox out of the
    /// store's data.
    pub(crate) fn add_to_linker<T: Send + 'static>(
        linker: &mut wasmtime::component::Linker<T>,
        get: fn(&mut T) -> &mut Publish,
    ) -> wasmtime::Result<()> {
        publish::add_to_linker::<T, wasmtime::component::HasSelf<Publish>>(linker, get)
    }
}

impl publish::Host for Publish {
    fn send(
        &mut self,
        message: publish::Message,
    ) -> wasmtime::Result<Result<(), publish::PublishError>> {
        use publish::PublishError;
        let admitted = self.grants.admit(
            &self.outbox,
            &message.topic,
            message.tag,
            message.keys,
            message.body,
        );
        match admitted {
            Ok(message) => {
                self.outbox.push(message);
                Ok(Ok(()))
            }
            Err(refusal) => {
                tracing::warn!(target: "mqplug::plugin", "publish refused: {refusal}");
                Ok(Err(match refusal {
                    Refusal::TopicNotAllowed(topic) => PublishError::TopicNotAllowed(topic),
                    Refusal::TooLarge(limit) => PublishError::TooLarge(limit),
                    Refusal::TooMany(limit) => PublishError::TooMany(limit),
                    Refusal::Invalid(why) => {
                        return Err(wasmtime::format_err!("publish refused: {why}"));
                    }
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants() -> PublishGrants {
        PublishGrants::new(vec![TopicName::new("marketing.reward.granted").unwrap()])
    }

    #[test]
    fn only_granted_topics_by_either_name_are_admitted() {
        let grants = grants();
        for name in ["marketing.reward.granted", "marketing_reward_granted"] {
            let admitted = grants
                .admit(&[], name, None, vec![], b"{}".to_vec())
                .unwrap();
            assert_eq!(admitted.topic.wire(), "marketing_reward_granted");
        }
        assert_eq!(
            grants.admit(&[], "marketing.task.completed", None, vec![], vec![]),
            Err(Refusal::TopicNotAllowed("marketing.task.completed".into()))
        );
        assert!(matches!(
            PublishGrants::default().admit(&[], "marketing.reward.granted", None, vec![], vec![]),
            Err(Refusal::TopicNotAllowed(_))
        ));
        assert_eq!(grants.refused(), ["marketing.task.completed"]);
    }

    #[test]
    fn the_outbox_and_each_message_are_bounded() {
        let grants = grants();
        let one = grants
            .admit(
                &[],
                "marketing.reward.granted",
                None,
                vec![],
                b"{}".to_vec(),
            )
            .unwrap();
        let full = vec![one; MAX_OUTBOX_MESSAGES as usize];
        assert_eq!(
            grants.admit(&full, "marketing.reward.granted", None, vec![], vec![]),
            Err(Refusal::TooMany(MAX_OUTBOX_MESSAGES))
        );
        let big = vec![0; MAX_OUTBOX_BODY_BYTES as usize + 1];
        assert!(matches!(
            grants.admit(&[], "marketing.reward.granted", None, vec![], big),
            Err(Refusal::TooLarge(_))
        ));
    }

    #[test]
    fn what_rocketmq_could_not_carry_is_invalid_with_the_reason() {
        let grants = grants();
        let admit = |tag: Option<&str>, keys: &[&str], body: &[u8]| {
            grants.admit(
                &[],
                "marketing.reward.granted",
                tag.map(str::to_string),
                keys.iter().map(|key| key.to_string()).collect(),
                body.to_vec(),
            )
        };
        admit(Some("GRANTED"), &["user-7", "camp:1"], b"{}").unwrap();
        for (tag, keys, body, why) in [
            (None, &[][..], &b""[..], "the body is empty"),
            (Some(""), &[], b"{}", "the tag is empty"),
            (
                Some("A\u{1}B"),
                &[],
                b"{}",
                "the tag `A\\u{1}B` has a control character",
            ),
            (Some("A||B"), &[], b"{}", "`||`"),
            (None, &["k\u{2}"], b"{}", "has a control character"),
            (None, &["a b"], b"{}", "has a space"),
            (None, &[""], b"{}", "a key is empty"),
        ] {
            match admit(tag, keys, body) {
                Err(Refusal::Invalid(reason)) => assert!(reason.contains(why), "{reason}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn follow_up_ids_are_stable_distinct_and_shaped_like_a_clients() {
        let message = OutgoingMessage {
            topic: TopicName::new("marketing.reward.granted").unwrap(),
            tag: Some("GRANTED".into()),
            keys: vec!["user-7".into()],
            body: b"{}".to_vec(),
        };
        let incoming = "C0A80001000000000000000000000001";
        let id = follow_up_id("rewards", incoming, 0, &message);
        // The same message again (a redelivery): the same id.
        assert_eq!(id, follow_up_id("rewards", incoming, 0, &message.clone()));
        // Anything else: another id.
        let mut others = vec![
            follow_up_id("rewards", incoming, 1, &message),
            follow_up_id("rewards", "C0A80001000000000000000000000002", 0, &message),
            // Another team's plugin handling the same message.
            follow_up_id("audit", incoming, 0, &message),
        ];
        let changed = [
            OutgoingMessage {
                topic: TopicName::new("marketing.reward.audited").unwrap(),
                ..message.clone()
            },
            OutgoingMessage {
                tag: None,
                ..message.clone()
            },
            OutgoingMessage {
                keys: vec!["user-8".into()],
                ..message.clone()
            },
            OutgoingMessage {
                body: b"{ }".to_vec(),
                ..message.clone()
            },
        ];
        others.extend(
            changed
                .iter()
                .map(|other| follow_up_id("rewards", incoming, 0, other)),
        );
        others.push(id.clone());
        let distinct: std::collections::HashSet<&String> = others.iter().collect();
        assert_eq!(distinct.len(), others.len(), "{others:?}");
        assert_eq!(id.len(), 32);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
        assert_eq!(follow_up_key("abc", 2), "abc:2");
    }
}
