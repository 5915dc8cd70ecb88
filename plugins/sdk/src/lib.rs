//! Write an mqplug plugin in Rust.
//!
//! A plugin is a type that implements [`Handler`], exported with
//! [`export_handler!`], built as a `cdylib` for `wasm32-wasip2`:
//!
//! ```ignore
//! use mqplug_plugin::{Delivery, Event, Failure, Handler, log};
//!
//! struct Rewards;
//!
//! impl Handler for Rewards {
//!     fn handle(event: Event, delivery: Delivery) -> Result<(), Failure> {
//!         log::info(&format!("reward for user {}", event.user_id));
//!         Ok(())
//!     }
//! }
//!
//! mqplug_plugin::export_handler!(Rewards);
//! ```
//!
//! `Ok(())` acknowledges the message; `Err(reason)` logs the reason on the
//! host and asks the broker to redeliver the message later. A [`Failure`]
//! says more: retry no sooner than a delay, or to the dead-letter queue now.

/// The raw bindings generated from `wit/plugin.wit`; [`Handler`] is the
/// friendlier way in.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        // `plugin` plus state (wasi:keyvalue, dedupe): a plugin that never
        // calls `kv` or `Once` imports none of it.
        world: "plugin-with-state",
        pub_export_macro: true,
        default_bindings_module: "mqplug_plugin::bindings",
        export_macro_name: "export_raw",
        // wasi:config too: the contract imports it.
        generate_all,
    });
}

pub use bindings::mqplug::plugin::types::Delivery;

/// The plugin's settings and secrets: its `[plugin.config]` table and the
/// secrets its `[plugin.secrets]` table names, through the standard
/// `wasi:config/store` interface.
///
/// ```ignore
/// let url = mqplug_plugin::config::get("rewards_url").ok_or("rewards_url is not set")?;
/// ```
pub mod config {
    use crate::bindings::wasi::config::store;

    /// The value of `key`, a key the plugin needs; `None` when the
    /// plugin's entry does not set it, which the host logs once and the
    /// kit (`mqplug test`) fails. For a setting with a default, use
    /// [`optional`].
    pub fn get(key: &str) -> Option<String> {
        // mqplug's store never fails; an error would mean no value either.
        store::get(key).ok().flatten()
    }

    /// The value of `key`, a setting the plugin can do without: unset is
    /// normal, neither logged nor failed by the kit. (Read through
    /// `get-all`, so the host sees no request for a key it lacks.)
    pub fn optional(key: &str) -> Option<String> {
        all()
            .into_iter()
            .find_map(|(name, value)| (name == key).then_some(value))
    }

    /// Every key with its value, secrets included.
    pub fn all() -> Vec<(String, String)> {
        store::get_all().unwrap_or_default()
    }
}

/// Follow-up messages to the topics the plugin's entry grants
/// (`allowed_topics`), sent by the host after the handler returns `Ok` and
/// never after `Err`. Each is keyed `<message-id>:<index>` with a message
/// id derived from the plugin, both of these and the message, so a redelivered
/// event that publishes the same message republishes the same id.
///
/// ```ignore
/// mqplug_plugin::publish::send("marketing.reward.granted", Some("REWARD"), &[], body)?;
/// ```
pub mod publish {
    use crate::bindings::mqplug::plugin::publish::{self as raw, Message, PublishError};

    /// Puts a message in this event's outbox; the error says why not.
    pub fn send(topic: &str, tag: Option<&str>, keys: &[&str], body: &[u8]) -> Result<(), String> {
        raw::send(&Message {
            topic: topic.to_string(),
            tag: tag.map(str::to_string),
            keys: keys.iter().map(|key| key.to_string()).collect(),
            body: body.to_vec(),
        })
        .map_err(|err| match err {
            PublishError::TopicNotAllowed(topic) => {
                format!("topic {topic} is not in this plugin's allowed_topics")
            }
            PublishError::TooLarge(limit) => format!("message over {limit} bytes"),
            PublishError::TooMany(limit) => format!("more than {limit} messages for one event"),
        })
    }
}

/// State in the buckets the plugin's entry grants (`[plugin.key_value]
/// buckets = [...]`), through the standard `wasi:keyvalue` interfaces.
/// Durable: the host's embedded database, or a Redis several hosts share.
/// A bucket the entry does not name cannot be opened; a key or value over
/// the entry's limits is an error, never a trap.
///
/// ```ignore
/// let seen = mqplug_plugin::kv::open("seen")?;
/// let n = seen.increment(&format!("user:{}", event.user_id), 1)?;
/// ```
pub mod kv {
    use std::time::Duration;

    use crate::bindings::mqplug::plugin::dedupe;
    use crate::bindings::wasi::keyvalue::{atomics, store};

    /// An open bucket.
    pub struct Bucket(store::Bucket);

    /// Opens a bucket the entry grants.
    pub fn open(name: &str) -> Result<Bucket, String> {
        store::open(name).map(Bucket).map_err(|err| match err {
            store::Error::AccessDenied => {
                format!("bucket {name:?} is not granted (add it to the plugin's key_value.buckets)")
            }
            other => text(other),
        })
    }

    fn text(err: store::Error) -> String {
        match err {
            store::Error::NoSuchStore => "no such store".into(),
            store::Error::AccessDenied => "access denied".into(),
            store::Error::Other(why) => why,
        }
    }

    fn ms(duration: Duration) -> u64 {
        u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    impl Bucket {
        pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
            self.0.get(key).map_err(text)
        }

        pub fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
            self.0.set(key, value).map_err(text)
        }

        pub fn delete(&self, key: &str) -> Result<(), String> {
            self.0.delete(key).map_err(text)
        }

        pub fn exists(&self, key: &str) -> Result<bool, String> {
            self.0.exists(key).map_err(text)
        }

        /// Every key of the bucket, page by page.
        pub fn keys(&self) -> Result<Vec<String>, String> {
            let mut keys = Vec::new();
            let mut cursor = None;
            loop {
                let page = self.0.list_keys(cursor).map_err(text)?;
                keys.extend(page.keys);
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => return Ok(keys),
                }
            }
        }

        /// Adds `delta` to the decimal counter under `key` (absent is 0).
        pub fn increment(&self, key: &str, delta: u64) -> Result<u64, String> {
            atomics::increment(&self.0, key, delta).map_err(text)
        }

        /// Sets `key` to `value` for `ttl` if nobody holds it: `None`.
        /// Otherwise the value that holds it, unchanged.
        pub fn claim(
            &self,
            key: &str,
            value: &[u8],
            ttl: Duration,
        ) -> Result<Option<Vec<u8>>, String> {
            dedupe::claim(&self.0, key, value, ms(ttl)).map_err(text)
        }

        /// Sets `key` to `value` for `ttl`, held or not.
        pub fn set_expiring(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), String> {
            dedupe::set_expiring(&self.0, key, value, ms(ttl)).map_err(text)
        }

        /// Deletes `key` only if it holds exactly `value` (a claim this
        /// call made), and says whether it did. Needs a host from after
        /// `release` came to contract 0.2.
        pub fn release(&self, key: &str, value: &[u8]) -> Result<bool, String> {
            dedupe::release(&self.0, key, value).map_err(text)
        }
    }
}

/// An effect done once per key (a message id), although RocketMQ may
/// deliver a message twice and several hosts share its queues.
///
/// ```ignore
/// let grant = Once::new("granted").run(&delivery.message_id, || {
///     let grant = call_the_rewards_service()?;
///     Ok(grant.id.into_bytes())
/// })?;
/// if !grant.ran_now { /* done by an earlier delivery: grant.value is its result */ }
/// ```
///
/// How: a claim `pending:<unique>` for the lease (set-if-absent with
/// expiry, atomic across hosts), the effect, then `done` and the effect's
/// result for the ttl. A delivery that finds `done` skips the effect and
/// gets the result; one that finds a claim is retried after the lease
/// (another host is doing it now, or died doing it); an effect that fails
/// gives back its own claim (deleted only if it still holds this call's
/// value), so the retry does it and a claim another delivery made after
/// this one's lease ended stays.
///
/// The lease is the plugin's config `dedupe_lease_ms` when set (the host
/// refuses a config where it is not above the plugin's `deadline_ms`),
/// else 60 s.
///
/// The windows that remain, and what closes them:
/// - the host dies after the effect and before `done` is recorded (or the
///   store fails right then): once the lease ends, a redelivery does the
///   effect again. Pass the effect's own idempotency key (the message id)
///   to the service it calls, as the reward granter does, and the service
///   answers the repeat with the first result.
/// - the effect took effect but reported a failure (a response lost on
///   the way back): the claim is given back and the retry repeats it;
///   again the service's idempotency key closes it.
/// - the effect runs longer than the lease: another delivery may start it
///   too. Keep the lease above the plugin's deadline (the default, 60 s,
///   is above the largest deadline a host allows).
/// - `done` expires after the ttl: a delivery later than that does the
///   effect again. RocketMQ's retries end within about 5 hours; the default
///   ttl is 7 days.
pub mod once {
    use std::time::Duration;

    use crate::Failure;

    const PENDING: &str = "pending:";
    const DONE: &[u8] = b"done:";

    /// A claim value no other call makes: the wall clock in nanoseconds and a
    /// count of this instance's calls (two hosts would have to claim one key in
    /// the same nanosecond, with the same count, to collide).
    fn claim_value() -> Vec<u8> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        format!("{}{nanos:x}.{call:x}", PENDING).into_bytes()
    }

    /// A bucket used for effects done once.
    #[derive(Debug, Clone)]
    pub struct Once {
        bucket: String,
        lease: Duration,
        ttl: Duration,
    }

    /// What [`Once::run`] found or did.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Done {
        /// The effect's result: from this call, or recorded by the delivery
        /// that did it.
        pub value: Vec<u8>,
        /// Whether this call ran the effect.
        pub ran_now: bool,
    }

    impl Once {
        /// Effects recorded in `bucket` (granted in `key_value.buckets`).
        pub fn new(bucket: &str) -> Self {
            let lease = crate::config::optional("dedupe_lease_ms")
                .and_then(|ms| ms.parse().ok())
                .map_or(Duration::from_secs(60), Duration::from_millis);
            Once {
                bucket: bucket.to_string(),
                lease,
                ttl: Duration::from_secs(7 * 24 * 3600),
            }
        }

        /// How long a claim holds while its effect runs (default: config
        /// `dedupe_lease_ms`, else 60 s). Keep it above the deadline.
        pub fn lease(mut self, lease: Duration) -> Self {
            self.lease = lease;
            self
        }

        /// How long a done effect is remembered (default 7 days).
        pub fn ttl(mut self, ttl: Duration) -> Self {
            self.ttl = ttl;
            self
        }

        /// Runs `effect` unless an earlier delivery did it for `key`.
        pub fn run(
            &self,
            key: &str,
            effect: impl FnOnce() -> Result<Vec<u8>, Failure>,
        ) -> Result<Done, Failure> {
            let bucket = crate::kv::open(&self.bucket).map_err(Failure::retry)?;
            let claim = claim_value();
            match bucket
                .claim(key, &claim, self.lease)
                .map_err(|why| Failure::retry(format!("dedupe: {why}")))?
            {
                None => {}
                Some(held) => {
                    if let Some(value) = held.strip_prefix(DONE) {
                        return Ok(Done {
                            value: value.to_vec(),
                            ran_now: false,
                        });
                    }
                    return Err(Failure::retry_after(
                        self.lease,
                        format!(
                            "dedupe: {key} is being handled by another delivery (or its host died doing it)"
                        ),
                    ));
                }
            }
            match effect() {
                Ok(value) => {
                    let mut done = DONE.to_vec();
                    done.extend_from_slice(&value);
                    if let Err(why) = bucket.set_expiring(key, &done, self.ttl) {
                        // Done, but not remembered: a redelivery after the
                        // lease repeats the effect (see the module's docs).
                        crate::log::warn(&format!("dedupe: {key} done but not recorded: {why}"));
                    }
                    Ok(Done {
                        value,
                        ran_now: true,
                    })
                }
                Err(failure) => {
                    // Give this call's claim back so the retry does the
                    // effect; never one another delivery holds now.
                    if let Err(why) = bucket.release(key, &claim) {
                        crate::log::warn(&format!(
                            "dedupe: {key} claim not given back (it ends with its lease): {why}"
                        ));
                    }
                    Err(failure)
                }
            }
        }
    }
}

pub use once::Once;

/// Outbound HTTP through the standard `wasi:http/outgoing-handler`, to the
/// origins the plugin's entry grants (`allowed_outbound_hosts`); any other
/// request fails with `HttpRequestDenied`, an error to handle like any
/// other. Every wait ends at the event's deadline.
///
/// ```ignore
/// let response = mqplug_plugin::http::request(
///     "POST",
///     "http://127.0.0.1:8080/grants",
///     &[("content-type", "application/json"), ("idempotency-key", &delivery.message_id)],
///     Some(br#"{"points": 10}"#),
/// )?;
/// if response.status != 200 { return Err(format!("rewards said {}", response.status)); }
/// ```
pub mod http {
    use crate::bindings::wasi::http::outgoing_handler;
    use crate::bindings::wasi::http::types::{
        Fields, FutureIncomingResponse, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
    };
    use crate::bindings::wasi::io::streams::StreamError;

    /// A response, its body read whole.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Response {
        pub status: u16,
        pub headers: Vec<(String, Vec<u8>)>,
        pub body: Vec<u8>,
    }

    /// A GET request.
    pub fn get(url: &str) -> Result<Response, String> {
        request("GET", url, &[], None)
    }

    /// Sends one request to `url` (`http://` or `https://host:port/path?query`) and reads
    /// the whole response. The error names what failed (`HttpRequestDenied`
    /// when the entry does not grant the origin).
    pub fn request(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, String> {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            return Err(format!("{url}: only http:// and https:// URLs"));
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, "/"),
        };
        let mut entries: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
            .collect();
        // The body's length up front: the request goes out with it, not
        // in chunks.
        if let Some(body) = body
            && !headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        {
            entries.push(("content-length".into(), body.len().to_string().into_bytes()));
        }
        let fields = Fields::from_list(&entries).map_err(|err| format!("header: {err:?}"))?;
        let request = OutgoingRequest::new(fields);
        let method = match method {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            other => Method::Other(other.to_string()),
        };
        let invalid = |what: &str| format!("{url}: invalid {what}");
        request
            .set_method(&method)
            .map_err(|()| invalid("method"))?;
        request
            .set_scheme(Some(&scheme))
            .map_err(|()| invalid("scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(|()| invalid("authority"))?;
        request
            .set_path_with_query(Some(path))
            .map_err(|()| invalid("path"))?;
        let outgoing = request
            .body()
            .map_err(|()| "request body taken".to_string())?;
        let Some(body) = body else {
            // No body: finished before the request is sent, so it goes out
            // as one without a body.
            OutgoingBody::finish(outgoing, None).map_err(|err| format!("{err:?}"))?;
            let future =
                outgoing_handler::handle(request, None).map_err(|err| format!("{err:?}"))?;
            return read_response(future, None);
        };
        let future = outgoing_handler::handle(request, None).map_err(|err| format!("{err:?}"))?;
        // A body that cannot be written is usually the request failing (a
        // refused origin, a closed connection): the response's error says
        // why, the same way every time, so it is reported first.
        let mut write_error = None;
        {
            let stream = outgoing
                .write()
                .map_err(|()| "request body stream taken".to_string())?;
            for chunk in body.chunks(4096) {
                if let Err(err) = stream.blocking_write_and_flush(chunk) {
                    write_error = Some(format!("writing the request body: {err:?}"));
                    break;
                }
            }
        }
        if write_error.is_none() {
            write_error = OutgoingBody::finish(outgoing, None)
                .err()
                .map(|err| format!("{err:?}"));
        } else {
            // Unfinished: the request's body ends in an error.
            drop(outgoing);
        }
        read_response(future, write_error)
    }

    /// Waits for `future`'s response and reads it whole; `write_error`, the
    /// request body's, is reported after the response's own error.
    fn read_response(
        future: FutureIncomingResponse,
        write_error: Option<String>,
    ) -> Result<Response, String> {
        future.subscribe().block();
        let response = future
            .get()
            .ok_or("no response")?
            .map_err(|()| "response taken".to_string())?
            .map_err(|err| format!("{err:?}"))?;
        if let Some(why) = write_error {
            return Err(why);
        }
        let status = response.status();
        let headers = response.headers().entries();
        let incoming = response
            .consume()
            .map_err(|()| "response body taken".to_string())?;
        let mut body = Vec::new();
        {
            let stream = incoming
                .stream()
                .map_err(|()| "response body stream taken".to_string())?;
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(chunk) => body.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(err)) => {
                        return Err(format!("reading the response: {}", err.to_debug_string()));
                    }
                }
            }
        }
        let _ = IncomingBody::finish(incoming);
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

use std::time::Duration;

use bindings::mqplug::plugin::types::{HandlerError, RetryAfter, TaskEvent};

/// A task event with its free-form data parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_type: String,
    pub user_id: u64,
    pub tenant_id: String,
    pub app_id: String,
    pub campaign_id: String,
    pub campaign_name: String,
    /// The event's free-form data, a JSON object.
    pub event_data: serde_json::Value,
    /// RFC 3339 text; the host has checked that it parses.
    pub timestamp: String,
}

impl Event {
    fn from_wit(event: TaskEvent) -> Result<Self, String> {
        let event_data = serde_json::from_str(&event.event_data)
            .map_err(|err| format!("event-data is not valid JSON: {err}"))?;
        Ok(Event {
            event_type: event.event_type,
            user_id: event.user_id,
            tenant_id: event.tenant_id,
            app_id: event.app_id,
            campaign_id: event.campaign_id,
            campaign_name: event.campaign_name,
            event_data,
            timestamp: event.timestamp,
        })
    }
}

/// A plugin's business logic.
pub trait Handler {
    /// Handles one event: `Ok(())` acknowledges it; `Err` puts its reason in
    /// the host's log and retries the message ([`Failure::retry`], what a
    /// `String` error becomes through `?` or `.into()`), retries it no
    /// sooner than a delay ([`Failure::retry_after`]) or moves it to the
    /// dead-letter queue now ([`Failure::dead_letter`]).
    fn handle(event: Event, delivery: Delivery) -> Result<(), Failure>;
}

/// Why a handler did not accept an event, and what becomes of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Redeliver it on the broker's schedule (10 s, 30 s, 1 min, ...).
    Retry(String),
    /// Redeliver it no sooner than `delay` (rounded up to RocketMQ's delay
    /// levels, 2 h at most); it counts as a retry.
    RetryAfter { reason: String, delay: Duration },
    /// No retry can help (a poison event): to the dead-letter queue now.
    DeadLetter(String),
}

impl Failure {
    /// Redeliver on the broker's schedule.
    pub fn retry(reason: impl Into<String>) -> Self {
        Failure::Retry(reason.into())
    }

    /// Redeliver no sooner than `delay`.
    pub fn retry_after(delay: Duration, reason: impl Into<String>) -> Self {
        Failure::RetryAfter {
            reason: reason.into(),
            delay,
        }
    }

    /// To the dead-letter queue now, without retrying.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Failure::DeadLetter(reason.into())
    }

    fn into_wit(self) -> HandlerError {
        match self {
            Failure::Retry(reason) => HandlerError::Retry(reason),
            Failure::RetryAfter { reason, delay } => HandlerError::RetryAfter(RetryAfter {
                reason,
                delay_ms: u32::try_from(delay.as_millis()).unwrap_or(u32::MAX),
            }),
            Failure::DeadLetter(reason) => HandlerError::DeadLetter(reason),
        }
    }
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Failure::Retry(reason)
    }
}

impl From<&str> for Failure {
    fn from(reason: &str) -> Self {
        Failure::Retry(reason.to_string())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Retry(reason) => f.write_str(reason),
            Failure::RetryAfter { reason, delay } => {
                write!(f, "{reason} (retry after {} ms)", delay.as_millis())
            }
            Failure::DeadLetter(reason) => write!(f, "{reason} (dead letter)"),
        }
    }
}

/// Adapts a [`Handler`] to the generated bindings; used by [`export_handler!`].
#[doc(hidden)]
pub fn dispatch<H: Handler>(event: TaskEvent, delivery: Delivery) -> Result<(), HandlerError> {
    // The host always passes JSON; anything else is its bug, which a
    // retry on a fixed host would not meet.
    let event = Event::from_wit(event).map_err(HandlerError::Retry)?;
    H::handle(event, delivery).map_err(Failure::into_wit)
}

/// Exports a [`Handler`] as the plugin's `handle` function.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        struct __MqplugExport;

        impl $crate::bindings::exports::mqplug::plugin::handler::Guest for __MqplugExport {
            fn handle(
                event: $crate::bindings::mqplug::plugin::types::TaskEvent,
                delivery: $crate::bindings::mqplug::plugin::types::Delivery,
            ) -> ::core::result::Result<(), $crate::bindings::mqplug::plugin::types::HandlerError> {
                $crate::dispatch::<$handler>(event, delivery)
            }
        }

        $crate::bindings::export_raw!(__MqplugExport with_types_in $crate::bindings);
    };
}

/// Writes to the host's log, tagged with the plugin's name and the message id.
pub mod log {
    use crate::bindings::mqplug::plugin::log::{Level, log};

    pub fn trace(message: &str) {
        log(Level::Trace, message);
    }
    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }
    pub fn info(message: &str) {
        log(Level::Info, message);
    }
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}
