//! From a message body to a RocketMQ outcome: decode, call the handler, map,
//! log. Plain functions over small traits, testable without a broker or wasm.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tracing::{Instrument, debug, error, info_span, warn};

use crate::delivery::Delivery;
use crate::event::TaskEvent;
use crate::mq::MessageHandler;
use crate::observe::{FailureKind, HostEvent, Observers};
use crate::outcome::{
    DeliveryOutcome, Disposition, HandlerFailure, HandlerOutcome, UndecodablePolicy,
    delivery_outcome, undecodable_outcome,
};
use crate::text::{MAX_UNTRUSTED_BYTES, inert, inert_owned};
use crate::traces::ProcessSpan;
use crate::wasm::{OutgoingMessage, Plugin};

/// A message id is 32 hex digits when a RocketMQ client sets it; anything
/// much longer is cut in the log.
const MAX_MESSAGE_ID_BYTES: usize = 128;

/// Something that handles decoded events: a wasm plugin, or a fake in tests.
pub trait EventHandler: Send + Sync + 'static {
    fn handle(&self, event: &TaskEvent, delivery: &Delivery) -> HandlerOutcome;

    /// Handles the event and says which build of the handler did, for
    /// handlers that are swapped at run time.
    fn handle_versioned(
        &self,
        event: &TaskEvent,
        delivery: &Delivery,
    ) -> (HandlerOutcome, Option<Arc<str>>) {
        (self.handle(event, delivery), None)
    }

    /// Handles the event: its outcome, the build that handled it, and the
    /// follow-up messages to send if it was accepted.
    fn handle_full(&self, event: &TaskEvent, delivery: &Delivery) -> Handled {
        let (outcome, version) = self.handle_versioned(event, delivery);
        Handled {
            outcome,
            version,
            outbox: Vec::new(),
        }
    }

    /// [`EventHandler::handle_full`] as a future, which the dispatcher
    /// awaits. A wasm plugin waits in it without holding a thread; the
    /// default runs the blocking call.
    fn handle_full_async<'a>(
        &'a self,
        event: &'a TaskEvent,
        delivery: &'a Delivery,
    ) -> HandledFuture<'a> {
        // Called when polled, where the dispatcher catches a panic.
        Box::pin(async move { self.handle_full(event, delivery) })
    }
}

/// What [`EventHandler::handle_full_async`] returns.
pub type HandledFuture<'a> = Pin<Box<dyn Future<Output = Handled> + Send + 'a>>;

/// What [`EventHandler::handle_full`] reports.
pub struct Handled {
    pub outcome: HandlerOutcome,
    pub version: Option<Arc<str>>,
    /// Follow-up messages, to send before acknowledging (empty unless the
    /// outcome is `Accepted`).
    pub outbox: Vec<OutgoingMessage>,
}

/// Sends an accepted event's follow-up messages: the built-in producer, or
/// a fake in tests.
pub trait OutboxSender: Send + Sync + 'static {
    /// Sends the `messages` that `plugin` published for the incoming
    /// message `delivery`, each keyed and identified by
    /// [`crate::wasm::follow_up_key`] and [`crate::wasm::follow_up_id`];
    /// the first failure, with what was sent before it.
    /// All of it within `budget`: what is left of the client's listener
    /// timeout once the handler returned (see [`outbox_budget`]).
    fn send(
        &self,
        plugin: &str,
        delivery: &Delivery,
        messages: &[OutgoingMessage],
        budget: Duration,
    ) -> Result<(), String>;
}

/// How long an event's follow-ups may take to send when its handler
/// returned `handled` after the listener began: what is left of the time
/// the whole message may take ([`crate::config::MAX_DEADLINE_MS`], 2 s below
/// the client's 30 s listener timeout, room for the answer or a send-back).
/// Past it the client would count the message failed and run it again
/// while its follow-ups were still going out.
pub fn outbox_budget(handled: Duration) -> Duration {
    Duration::from_millis(crate::config::MAX_DEADLINE_MS).saturating_sub(handled)
}

impl EventHandler for Plugin {
    fn handle(&self, event: &TaskEvent, delivery: &Delivery) -> HandlerOutcome {
        Plugin::handle(self, event, delivery)
    }

    // A plugin used directly (not through a slot) keeps its follow-ups too.
    fn handle_full(&self, event: &TaskEvent, delivery: &Delivery) -> Handled {
        wasmtime_wasi::runtime::in_tokio(self.handle_full_async(event, delivery))
    }

    fn handle_full_async<'a>(
        &'a self,
        event: &'a TaskEvent,
        delivery: &'a Delivery,
    ) -> HandledFuture<'a> {
        Box::pin(async move {
            let handling = self.handle_async(event, delivery).await;
            Handled {
                outcome: handling.outcome,
                version: None,
                outbox: handling.outbox,
            }
        })
    }
}

/// Hands one plugin's messages to its handler and decides their outcome.
pub struct Dispatcher {
    plugin: Arc<str>,
    handler: Arc<dyn EventHandler>,
    undecodable: UndecodablePolicy,
    max_body_bytes: usize,
    observers: Observers,
    outbox: Option<Arc<dyn OutboxSender>>,
    /// The plugin's consumer group, named on its spans.
    group: Option<Arc<str>>,
}

impl Dispatcher {
    pub fn new(
        plugin: &str,
        handler: Arc<dyn EventHandler>,
        undecodable: UndecodablePolicy,
        max_body_bytes: usize,
        observers: Observers,
    ) -> Self {
        Dispatcher {
            plugin: Arc::from(plugin),
            handler,
            undecodable,
            max_body_bytes,
            observers,
            outbox: None,
            group: None,
        }
    }

    /// Names `group`, the plugin's consumer group, on its spans.
    pub fn with_group(mut self, group: &str) -> Self {
        self.group = Some(Arc::from(group));
        self
    }

    /// Sends accepted events' follow-up messages through `sender`.
    pub fn with_outbox(mut self, sender: Arc<dyn OutboxSender>) -> Self {
        self.outbox = Some(sender);
        self
    }

    /// Decodes the body, runs the handler, logs what happened and returns
    /// what to tell the broker. Never panics. Blocks: call it from a thread
    /// that runs no async tasks (a listener thread).
    pub fn dispatch(&self, delivery: &Delivery, body: &[u8]) -> DeliveryOutcome {
        wasmtime_wasi::runtime::in_tokio(self.dispatch_async(delivery, body))
    }

    /// [`Dispatcher::dispatch`] as a future: a plugin that waits (a sleep,
    /// an HTTP response) holds no thread meanwhile, so one thread can keep
    /// many messages in their handlers at once.
    pub async fn dispatch_async(&self, delivery: &Delivery, body: &[u8]) -> DeliveryOutcome {
        let started = Instant::now();
        // The handler and the follow-ups see the plugin's span's context.
        let trace = ProcessSpan::start(&self.plugin, self.group.as_deref(), delivery, body.len());
        let delivery = trace.delivery(delivery);
        let span = info_span!(
            "message",
            plugin = %self.plugin,
            version = tracing::field::Empty,
            // The producer sets the id: escaped like any untrusted text.
            message_id = %inert(&delivery.message_id, MAX_MESSAGE_ID_BYTES),
            reconsume_times = delivery.reconsume_times,
        );
        let mut version = None;
        let mut failure = None;
        let decoded = span.in_scope(|| TaskEvent::decode(body, self.max_body_bytes));
        let (outcome, cause) = match decoded {
            Err(err) => {
                let _entered = span.enter();
                let outcome = undecodable_outcome(self.undecodable);
                // serde's message can quote the body.
                let err = inert_owned(err.to_string(), MAX_UNTRUSTED_BYTES);
                error!(
                    body_bytes = body.len(),
                    ?outcome,
                    "undecodable message: {err}; fix the producer (this plugin's handler was not called)"
                );
                failure = Some(FailureKind::Undecodable);
                (outcome, Some(format!("undecodable: {err}")))
            }
            Ok(event) => {
                // A versioned handler records its build into this span itself,
                // before it runs, so the plugin's log lines carry it.
                //
                // A panic in the host while handling (a bug of ours or of a
                // library) must not take the listener thread with it: it is
                // a host failure, the message is retried, and the instance
                // that was in use is dropped as the panic unwinds.
                let handled = CatchUnwind(self.handler.handle_full_async(&event, delivery))
                    .instrument(span.clone())
                    .await
                    .unwrap_or_else(|panic| {
                        let detail = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into());
                        Handled {
                            outcome: HandlerOutcome::Failed(HandlerFailure::Host {
                                detail: format!("panicked while handling the event: {detail}"),
                            }),
                            version: None,
                            outbox: Vec::new(),
                        }
                    });
                let _entered = span.enter();
                version = handled.version;
                let outcome = delivery_outcome(&handled.outcome);
                let cause = match handled.outcome {
                    HandlerOutcome::Accepted => {
                        debug!(event_type = %event.event_type, "handled");
                        None
                    }
                    HandlerOutcome::Rejected {
                        reason,
                        disposition,
                    } => {
                        failure = Some(FailureKind::Rejected);
                        let cause = match disposition {
                            Disposition::Retry => format!("handler error: {reason}"),
                            Disposition::RetryAfter(delay) => format!(
                                "handler error, retry after {} ms: {reason}",
                                delay.as_millis()
                            ),
                            Disposition::DeadLetter => {
                                format!("handler error, dead letter: {reason}")
                            }
                        };
                        warn!(?outcome, "{cause}");
                        Some(cause)
                    }
                    HandlerOutcome::Failed(why) => {
                        failure = Some(match why {
                            HandlerFailure::Trap { .. } => FailureKind::Trap,
                            HandlerFailure::Deadline { .. } => FailureKind::Deadline,
                            HandlerFailure::MemoryLimit { .. } => FailureKind::MemoryLimit,
                            HandlerFailure::OutOfFuel { .. } => FailureKind::OutOfFuel,
                            HandlerFailure::Host { .. } => FailureKind::Host,
                        });
                        error!(?outcome, "handler failed ({why}); instance discarded");
                        Some(why.to_string())
                    }
                };
                // Follow-up messages go out before the event is acknowledged;
                // if they cannot, the event is retried and republishes them
                // with the same ids.
                // Not entered across the send's await.
                drop(_entered);
                let unsent =
                    if outcome == DeliveryOutcome::ConsumeSuccess && !handled.outbox.is_empty() {
                        let sent = self
                            .send_outbox(delivery, &handled.outbox, started.elapsed())
                            .instrument(span.clone())
                            .await;
                        span.in_scope(|| {
                            self.observers.emit(|| HostEvent::FollowUps {
                                plugin: self.plugin.clone(),
                                topics: handled
                                    .outbox
                                    .iter()
                                    .map(|message| message.topic.configured().to_string())
                                    .collect(),
                                sent: sent.is_ok(),
                            })
                        });
                        sent.err()
                    } else {
                        None
                    };
                let _entered = span.enter();
                match unsent {
                    None => (outcome, cause),
                    Some(why) => {
                        failure = Some(FailureKind::Publish);
                        let outcome = DeliveryOutcome::ConsumeRetryLater;
                        error!(
                            ?outcome,
                            messages = handled.outbox.len(),
                            "follow-up messages not sent: {why}"
                        );
                        (outcome, Some(format!("follow-up messages not sent: {why}")))
                    }
                }
            }
        };
        trace.end(version.as_deref(), outcome, cause.as_deref());
        self.observers.emit(|| HostEvent::Handled {
            plugin: self.plugin.clone(),
            message_id: delivery.message_id.clone(),
            reconsume_times: delivery.reconsume_times,
            outcome,
            cause,
            version,
            failure,
            duration: started.elapsed(),
        });
        outcome
    }
}

impl Dispatcher {
    /// Sends on a blocking thread: the sender waits for the broker.
    async fn send_outbox(
        &self,
        delivery: &Delivery,
        outbox: &[OutgoingMessage],
        handled: Duration,
    ) -> Result<(), String> {
        let Some(sender) = &self.outbox else {
            return Err("the built-in producer is off ([producer] enabled = false)".into());
        };
        let budget = outbox_budget(handled);
        if budget.is_zero() {
            return Err(format!(
                "no time left to send them: the handler took {} ms of the {} ms a message may take",
                handled.as_millis(),
                crate::config::MAX_DEADLINE_MS
            ));
        }
        let (sender, plugin) = (sender.clone(), self.plugin.clone());
        let (delivery, outbox) = (delivery.clone(), outbox.to_vec());
        tokio::task::spawn_blocking(move || sender.send(&plugin, &delivery, &outbox, budget))
            .await
            .unwrap_or_else(|err| Err(format!("the send stopped: {err}")))
    }
}

/// A future that turns a panic while it is polled into an `Err`, as
/// `std::panic::catch_unwind` does for a call.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

impl MessageHandler for Dispatcher {
    fn on_message(&self, delivery: &Delivery, body: &[u8]) -> DeliveryOutcome {
        self.dispatch(delivery, body)
    }

    fn on_message_async<'a>(
        &'a self,
        delivery: &'a Delivery,
        body: &'a [u8],
    ) -> crate::mq::OutcomeFuture<'a> {
        Box::pin(self.dispatch_async(delivery, body))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::event::DEFAULT_MAX_BODY_BYTES;
    use crate::observe::Observer;
    use crate::outcome::HandlerFailure;

    /// Answers with a fixed outcome and remembers the events it saw.
    struct Scripted {
        outcome: HandlerOutcome,
        seen: Mutex<Vec<TaskEvent>>,
    }

    impl EventHandler for Scripted {
        fn handle(&self, event: &TaskEvent, _delivery: &Delivery) -> HandlerOutcome {
            self.seen.lock().unwrap().push(event.clone());
            self.outcome.clone()
        }
    }

    const BODY: &[u8] = br#"{"EventType":"USER_REGISTER","UserID":123,"TenantID":"tenant1",
        "AppID":"app1","CampaignID":"campaign-1","CampaignName":"x","EventData":{},
        "Timestamp":"2026-11-25T14:19:15Z"}"#;

    fn dispatcher(
        outcome: HandlerOutcome,
        policy: UndecodablePolicy,
    ) -> (Dispatcher, Arc<Scripted>, Arc<Mutex<Vec<HostEvent>>>) {
        let handler = Arc::new(Scripted {
            outcome,
            seen: Mutex::default(),
        });
        let (dispatcher, events) = dispatching_to(handler.clone(), policy);
        (dispatcher, handler, events)
    }

    /// A dispatcher for `handler` and the host events it emits.
    fn dispatching_to(
        handler: Arc<dyn EventHandler>,
        policy: UndecodablePolicy,
    ) -> (Dispatcher, Arc<Mutex<Vec<HostEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let observer: Observer = Arc::new(move |event| sink.lock().unwrap().push(event.clone()));
        let dispatcher = Dispatcher::new(
            "test-plugin",
            handler,
            policy,
            DEFAULT_MAX_BODY_BYTES,
            Observers::new(vec![observer]),
        );
        (dispatcher, events)
    }

    fn delivery() -> Delivery {
        Delivery {
            message_id: "m-1".into(),
            reconsume_times: 2,
            ..Delivery::default()
        }
    }

    #[test]
    fn an_accepted_event_is_acknowledged_and_reported() {
        let (dispatcher, handler, events) =
            dispatcher(HandlerOutcome::Accepted, UndecodablePolicy::Retry);
        assert_eq!(
            dispatcher.dispatch(&delivery(), BODY),
            DeliveryOutcome::ConsumeSuccess
        );
        assert_eq!(handler.seen.lock().unwrap()[0].user_id, 123);
        let events = events.lock().unwrap();
        let [
            HostEvent::Handled {
                plugin,
                message_id,
                reconsume_times,
                outcome,
                cause,
                version,
                failure,
                ..
            },
        ] = events.as_slice()
        else {
            panic!("expected one Handled event, got {events:?}");
        };
        assert_eq!(&**plugin, "test-plugin");
        assert_eq!(message_id, "m-1");
        assert_eq!(*reconsume_times, 2);
        assert_eq!(*outcome, DeliveryOutcome::ConsumeSuccess);
        assert_eq!(*cause, None);
        assert_eq!(*version, None, "a plain handler has no version");
        assert_eq!(*failure, None);
    }

    #[test]
    fn a_rejected_or_failed_event_is_retried_with_its_cause() {
        for (outcome, expected_cause) in [
            (
                HandlerOutcome::rejected("out of stock"),
                "handler error: out of stock",
            ),
            (
                HandlerOutcome::Failed(HandlerFailure::Trap {
                    detail: "unreachable".into(),
                }),
                "trap: unreachable",
            ),
        ] {
            let (dispatcher, _, events) = dispatcher(outcome, UndecodablePolicy::Retry);
            assert_eq!(
                dispatcher.dispatch(&delivery(), BODY),
                DeliveryOutcome::ConsumeRetryLater
            );
            let events = events.lock().unwrap();
            let HostEvent::Handled { cause, failure, .. } = &events[0] else {
                panic!("expected a Handled event, got {events:?}");
            };
            assert_eq!(cause.as_deref(), Some(expected_cause));
            assert!(failure.is_some());
        }
    }

    #[test]
    fn a_panic_in_the_host_while_handling_is_a_retried_host_failure() {
        struct Panics;
        impl EventHandler for Panics {
            fn handle(&self, _event: &TaskEvent, _delivery: &Delivery) -> HandlerOutcome {
                panic!("a bug");
            }
        }
        let (dispatcher, events) = dispatching_to(Arc::new(Panics), UndecodablePolicy::Retry);
        assert_eq!(
            dispatcher.dispatch(&delivery(), BODY),
            DeliveryOutcome::ConsumeRetryLater
        );
        let events = events.lock().unwrap();
        let HostEvent::Handled { cause, failure, .. } = &events[0] else {
            panic!("expected a Handled event, got {events:?}");
        };
        assert_eq!(*failure, Some(FailureKind::Host));
        assert_eq!(
            cause.as_deref(),
            Some("host failure: panicked while handling the event: a bug")
        );
    }

    #[test]
    fn an_undecodable_body_never_reaches_the_handler() {
        let (dispatcher, handler, events) =
            dispatcher(HandlerOutcome::Accepted, UndecodablePolicy::Retry);
        assert_eq!(
            dispatcher.dispatch(&delivery(), b"{not json"),
            DeliveryOutcome::ConsumeRetryLater
        );
        assert!(handler.seen.lock().unwrap().is_empty());
        let events = events.lock().unwrap();
        let HostEvent::Handled { cause, .. } = &events[0] else {
            panic!("expected a Handled event, got {events:?}");
        };
        assert!(
            cause.as_deref().unwrap().starts_with("undecodable: "),
            "{cause:?}"
        );
    }

    #[test]
    fn the_drop_policy_acknowledges_an_undecodable_body() {
        let (dispatcher, _, _) = dispatcher(HandlerOutcome::Accepted, UndecodablePolicy::Drop);
        assert_eq!(
            dispatcher.dispatch(&delivery(), b"\xff"),
            DeliveryOutcome::ConsumeSuccess
        );
    }

    /// Accepts every event with one follow-up message in its outbox.
    struct Publishing;

    impl EventHandler for Publishing {
        fn handle(&self, _event: &TaskEvent, _delivery: &Delivery) -> HandlerOutcome {
            HandlerOutcome::Accepted
        }

        fn handle_full(&self, _event: &TaskEvent, _delivery: &Delivery) -> Handled {
            Handled {
                outcome: HandlerOutcome::Accepted,
                version: None,
                outbox: vec![OutgoingMessage {
                    topic: crate::topic::TopicName::new("marketing.reward.granted").unwrap(),
                    tag: None,
                    keys: Vec::new(),
                    body: b"{}".to_vec(),
                }],
            }
        }
    }

    /// Records what it is asked to send; fails when told to.
    struct Sender {
        fail: bool,
        sent: Mutex<Vec<(String, usize)>>,
    }

    impl OutboxSender for Sender {
        fn send(
            &self,
            plugin: &str,
            delivery: &Delivery,
            messages: &[OutgoingMessage],
            budget: Duration,
        ) -> Result<(), String> {
            assert_eq!(plugin, "test-plugin", "the sender is told whose they are");
            assert!(
                !budget.is_zero() && budget <= outbox_budget(Duration::ZERO),
                "{budget:?}"
            );
            self.sent
                .lock()
                .unwrap()
                .push((delivery.message_id.clone(), messages.len()));
            if self.fail {
                Err("the broker is away".into())
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn follow_ups_get_what_is_left_of_the_listener_timeout_and_nothing_past_it() {
        let whole = Duration::from_millis(crate::config::MAX_DEADLINE_MS);
        assert_eq!(outbox_budget(Duration::ZERO), whole);
        assert_eq!(
            outbox_budget(whole - Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(outbox_budget(whole), Duration::ZERO);
        assert_eq!(outbox_budget(whole * 2), Duration::ZERO);
    }

    #[test]
    fn an_accepted_events_follow_ups_are_sent_before_it_is_acknowledged() {
        let (dispatcher, _) = dispatching_to(Arc::new(Publishing), UndecodablePolicy::Retry);
        let sender = Arc::new(Sender {
            fail: false,
            sent: Mutex::default(),
        });
        let dispatcher = dispatcher.with_outbox(sender.clone());
        assert_eq!(
            dispatcher.dispatch(&delivery(), BODY),
            DeliveryOutcome::ConsumeSuccess
        );
        assert_eq!(*sender.sent.lock().unwrap(), [("m-1".to_string(), 1)]);
    }

    #[test]
    fn follow_ups_that_cannot_be_sent_retry_the_event_and_say_why() {
        let (dispatcher, events) = dispatching_to(Arc::new(Publishing), UndecodablePolicy::Retry);
        let failing = Arc::new(Sender {
            fail: true,
            sent: Mutex::default(),
        });
        let dispatcher = dispatcher.with_outbox(failing);
        assert_eq!(
            dispatcher.dispatch(&delivery(), BODY),
            DeliveryOutcome::ConsumeRetryLater
        );
        let events = events.lock().unwrap();
        let (cause, failure) = events
            .iter()
            .find_map(|event| match event {
                HostEvent::Handled { cause, failure, .. } => Some((cause.clone(), *failure)),
                _ => None,
            })
            .unwrap();
        assert_eq!(failure, Some(FailureKind::Publish));
        assert!(cause.unwrap().contains("the broker is away"));
        // Without a producer at all, the same.
        let (no_producer, _) = dispatching_to(Arc::new(Publishing), UndecodablePolicy::Retry);
        assert_eq!(
            no_producer.dispatch(&delivery(), BODY),
            DeliveryOutcome::ConsumeRetryLater
        );
    }
}
