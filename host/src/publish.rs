//! Bulk publishing: many task events through one [`Publisher`], with up to
//! `concurrency` sends in flight, each carrying one event or a RocketMQ
//! batch of several.
//!
//! Every send is synchronous (SendSync) with the client's retries and then
//! the host's own retries with backoff on a fresh client, every message id
//! fixed before the first attempt, as [`Publisher::publish`] does for one
//! event. What overlaps is the waiting: one synchronous send is a round trip
//! to the broker, and the broker answers many of them at once.
//!
//! Batches ([`Pipeline::batch`] above 1) save the broker and the client most
//! of their work per event, at a price: a batch is stored or refused as a
//! whole, in one queue, so one failed send fails every event in it (each
//! reported with its index) and a retried batch is sent again whole. Each
//! event is still its own message with its own tag, key, id and receipt.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::event::TaskEvent;
use crate::mq::{MqError, PublishReceipt, Publisher};

/// The default number of sends in flight: well past what one send's round
/// trip needs to be hidden, far below anything that queues in the client.
pub const DEFAULT_CONCURRENCY: usize = 32;

/// At most this many bytes of event bodies go in one batch; an event larger
/// than this is sent alone. RocketMQ refuses a send of more than 4 MiB
/// (`maxMessageSize`), a batch's messages counted together.
pub const BATCH_BYTES: usize = 1024 * 1024;

/// How [`publish_all`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pipeline {
    /// Sends in flight at once (at least 1; 1 sends one after the other, as
    /// a single task would).
    pub concurrency: usize,
    /// Events in one send (at least 1; 1 sends each event alone, more sends
    /// RocketMQ batches of up to this many consecutive events and
    /// [`BATCH_BYTES`]).
    pub batch: usize,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline {
            concurrency: DEFAULT_CONCURRENCY,
            batch: 1,
        }
    }
}

/// An event [`publish_all`] could not send, after every retry.
#[derive(Debug, thiserror::Error)]
#[error("event at index {index} not sent: {error}")]
pub struct PublishFailure {
    /// The event's place in the input, from 0.
    pub index: usize,
    #[source]
    pub error: MqError,
}

/// Where [`publish_all`] stands after one more event's send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The event whose send just ended, from 0.
    pub index: usize,
    /// Events whose send ended, sent or not.
    pub done: usize,
    /// Of those, the ones not sent.
    pub failed: usize,
    pub total: usize,
}

/// What [`publish_all`] did: one result per event, in the input's order.
#[derive(Debug)]
pub struct Published {
    pub results: Vec<Result<PublishReceipt, PublishFailure>>,
    /// From the first send to the last answer.
    pub elapsed: Duration,
    /// How it sent (the concurrency at most the number of events).
    pub pipeline: Pipeline,
    /// The most sends that were in flight at once.
    pub max_in_flight: usize,
    /// Sends made (first attempts; a batch is one).
    pub sends: usize,
}

impl Published {
    /// Events the broker stored.
    pub fn sent(&self) -> usize {
        self.results.iter().filter(|result| result.is_ok()).count()
    }

    /// Events not sent.
    pub fn failed(&self) -> usize {
        self.results.len() - self.sent()
    }

    /// The failures, in the input's order.
    pub fn failures(&self) -> impl Iterator<Item = &PublishFailure> {
        self.results
            .iter()
            .filter_map(|result| result.as_ref().err())
    }

    /// Events sent per second.
    pub fn rate(&self) -> f64 {
        self.sent() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One event's answer, from a sender to the caller.
type Answer = (usize, Result<PublishReceipt, MqError>);

/// Publishes `events` as `pipeline` says. Returns when every event was sent
/// or given up on, with a result for each, in the input's order: every
/// receipt and every failure with its event's index.
///
/// `progress` runs on the caller's task after each event's send ended, in
/// the order the answers came (not the input's), with that event's result.
///
/// `concurrency` tasks on the current Tokio runtime each take the next
/// events not yet taken and send them, so a send starts as soon as a slot is
/// free, without waiting for the caller to see the last answer. Dropping the
/// returned future aborts the sends still in flight.
pub async fn publish_all(
    publisher: &Arc<Publisher>,
    events: impl Into<Arc<[TaskEvent]>>,
    pipeline: Pipeline,
    mut progress: impl FnMut(Progress, &Result<PublishReceipt, PublishFailure>),
) -> Published {
    let events: Arc<[TaskEvent]> = events.into();
    let total = events.len();
    let pipeline = Pipeline {
        concurrency: pipeline.concurrency.clamp(1, total.max(1)),
        batch: pipeline.batch.max(1),
    };
    let shared = Arc::new(Shared {
        events,
        batch: pipeline.batch,
        next: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        most_in_flight: AtomicUsize::new(0),
        sends: AtomicUsize::new(0),
    });
    let (answers, mut answered) = mpsc::unbounded_channel();
    let started = Instant::now();
    tracing::debug!(total, ?pipeline, topic = %publisher.topic(), "publishing");
    if pipeline.concurrency > 1 && total > 1 {
        // The first event alone: its send looks up the topic's route, which
        // every other send then finds cached, instead of each of the first
        // `concurrency` sends asking the name server at once.
        shared.next.store(1, Ordering::Relaxed);
        let (publisher, shared, answers) =
            (Arc::clone(publisher), Arc::clone(&shared), answers.clone());
        // On a task of its own, as every send is: the client's futures nest
        // deeper than callers' crates allow by default.
        let mut first = JoinSet::new();
        first.spawn(async move { shared.send(&publisher, 0..1, &answers).await });
        if let Some(Err(err)) = first.join_next().await
            && err.is_panic()
        {
            std::panic::resume_unwind(err.into_panic());
        }
    }
    let mut senders = JoinSet::new();
    for _ in 0..pipeline.concurrency {
        let (publisher, shared, answers) =
            (Arc::clone(publisher), Arc::clone(&shared), answers.clone());
        senders.spawn(async move {
            while let Some(taken) = shared.take() {
                for send in shared.sends_of(taken) {
                    if !shared.send(&publisher, send, &answers).await {
                        return;
                    }
                }
            }
        });
    }
    drop(answers);
    let mut results: Vec<Option<Result<PublishReceipt, PublishFailure>>> =
        std::iter::repeat_with(|| None).take(total).collect();
    let (mut done, mut failed) = (0, 0);
    const AT_ONCE: usize = 1024;
    let mut ended = Vec::with_capacity(AT_ONCE);
    // Every sender holds a sending half: the channel closes when all ended.
    while answered.recv_many(&mut ended, AT_ONCE).await > 0 {
        for (index, result) in ended.drain(..) {
            let result = result.map_err(|error| PublishFailure { index, error });
            done += 1;
            if result.is_err() {
                failed += 1;
            }
            progress(
                Progress {
                    index,
                    done,
                    failed,
                    total,
                },
                &result,
            );
            results[index] = Some(result);
        }
    }
    while let Some(ended) = senders.join_next().await {
        // A send that panicked is a bug; nothing else ends these tasks early
        // (dropping the set aborts them, but that drops this future too).
        if let Err(err) = ended
            && err.is_panic()
        {
            std::panic::resume_unwind(err.into_panic());
        }
    }
    let published = Published {
        results: results
            .into_iter()
            .map(|result| result.expect("every event's send ended"))
            .collect(),
        elapsed: started.elapsed(),
        pipeline,
        max_in_flight: shared.most_in_flight.load(Ordering::Relaxed),
        sends: shared.sends.load(Ordering::Relaxed),
    };
    tracing::debug!(
        sent = published.sent(),
        failed = published.failed(),
        sends = published.sends,
        rate = published.rate().round(),
        "published"
    );
    published
}

/// What the senders share: the events, the next one not taken, counters.
struct Shared {
    events: Arc<[TaskEvent]>,
    batch: usize,
    next: AtomicUsize,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    sends: AtomicUsize,
}

impl Shared {
    /// The next `batch` events (fewer at the end), if any are left.
    fn take(&self) -> Option<Range<usize>> {
        let total = self.events.len();
        let start = self.next.fetch_add(self.batch, Ordering::Relaxed);
        (start < total).then(|| start..(start + self.batch).min(total))
    }

    /// `taken` cut into sends: runs of consecutive events of at most
    /// [`BATCH_BYTES`] together, an event over that alone.
    fn sends_of(&self, taken: Range<usize>) -> Vec<Range<usize>> {
        if taken.len() == 1 {
            return vec![taken];
        }
        let mut sends = Vec::new();
        let (mut start, mut bytes) = (taken.start, 0);
        for index in taken.clone() {
            // An estimate of the body's size; `encode` is what is sent.
            let size = self.events[index].encode().len();
            if index > start && bytes + size > BATCH_BYTES {
                sends.push(start..index);
                (start, bytes) = (index, 0);
            }
            bytes += size;
        }
        sends.push(start..taken.end);
        sends
    }

    /// Sends the events in `range` (one alone, more as a batch) and answers
    /// for each; false when the caller stopped listening.
    async fn send(
        &self,
        publisher: &Publisher,
        range: Range<usize>,
        answers: &mpsc::UnboundedSender<Answer>,
    ) -> bool {
        self.sends.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.most_in_flight.fetch_max(now, Ordering::Relaxed);
        let events = &self.events[range.clone()];
        let answered: Vec<Answer> = if let [event] = events {
            vec![(range.start, publisher.publish(event).await)]
        } else {
            match publisher.publish_batch(events).await {
                Ok(receipts) => range.zip(receipts.into_iter().map(Ok)).collect(),
                // The whole batch was refused: every event in it failed.
                Err(err) => range
                    .map(|index| {
                        let error = MqError {
                            action: err.action.clone(),
                            cause: err.cause.clone(),
                        };
                        (index, Err(error))
                    })
                    .collect(),
            }
        };
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        answered
            .into_iter()
            .all(|answer| answers.send(answer).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: u64, pad: usize) -> TaskEvent {
        let body = serde_json::json!({
            "event_type": "USER_REGISTER", "user_id": user, "tenant_id": "t", "app_id": "a",
            "campaign_id": "c", "campaign_name": "n", "event_data": {"pad": "x".repeat(pad)},
            "timestamp": "2026-11-25T14:19:15+08:00",
        });
        TaskEvent::decode(body.to_string().as_bytes(), usize::MAX).expect("a valid event")
    }

    fn shared(events: Vec<TaskEvent>, batch: usize) -> Shared {
        Shared {
            events: events.into(),
            batch,
            next: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            sends: AtomicUsize::new(0),
        }
    }

    #[test]
    fn senders_take_consecutive_runs_of_batch_events_until_none_are_left() {
        let shared = shared((0..40).map(|user| event(user, 0)).collect(), 16);
        let taken: Vec<_> = std::iter::from_fn(|| shared.take()).collect();
        assert_eq!(taken, [0..16, 16..32, 32..40]);
        assert_eq!(shared.take(), None, "still none after the end");
    }

    #[test]
    fn a_batch_stays_under_its_byte_limit_and_a_larger_event_goes_alone() {
        let third = BATCH_BYTES / 3;
        let events = vec![
            event(0, 10),
            event(1, third),
            event(2, third),
            event(3, third),
            event(4, BATCH_BYTES),
            event(5, 10),
            event(6, 10),
        ];
        let shared = shared(events, 7);
        assert_eq!(shared.sends_of(0..7), [0..3, 3..4, 4..5, 5..7]);
        let alone = shared.sends_of(5..6);
        assert_eq!(alone.len(), 1);
        assert_eq!(alone[0], 5..6, "one event is one send");
    }
}
