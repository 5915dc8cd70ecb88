//! Bulk publishing (`mqplug::publish::publish_all`) against a real broker,
//! many sends in flight, each event alone or in RocketMQ batches: every event
//! arrives once, with the receipt the producer kept for it, in the input's
//! order; and every event that cannot be sent comes back as a failure with
//! its index, none dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mqplug::TaskEvent;
use mqplug::mq::{Backoff, MqRuntime, ProducerSettings, PublishReceipt, Publisher};
use mqplug::publish::{Pipeline, Progress, PublishFailure, Published, publish_all};
use mqplug::topic::TopicName;
use mqplug_tests::{Collect, LocalBroker, QUIET_PERIOD, sample_event, sample_event_with};

const WAIT: Duration = Duration::from_secs(90);

/// Each event alone, 32 sends in flight.
const SINGLE: Pipeline = Pipeline {
    concurrency: 32,
    batch: 1,
};
/// Batches of 16 events, 8 sends in flight.
const BATCHED: Pipeline = Pipeline {
    concurrency: 8,
    batch: 16,
};

/// Every progress call, checked against the results afterwards.
#[derive(Default)]
struct Seen {
    calls: Vec<Progress>,
}

impl Seen {
    fn record(&mut self, progress: Progress, result: &Result<PublishReceipt, PublishFailure>) {
        if let Err(failure) = result {
            assert_eq!(failure.index, progress.index, "a failure names its event");
        }
        self.calls.push(progress);
    }

    /// One call per event, counting up to `total` with `failed` failures.
    fn check(&self, total: usize, failed: usize) -> Result<()> {
        ensure!(
            self.calls.len() == total,
            "{} progress calls",
            self.calls.len()
        );
        for (n, call) in self.calls.iter().enumerate() {
            ensure!(
                call.done == n + 1 && call.total == total,
                "call {n}: {call:?}"
            );
        }
        let indices: HashSet<usize> = self.calls.iter().map(|call| call.index).collect();
        ensure!(indices.len() == total, "each event reported once");
        let last = self.calls.last().context("no progress")?;
        ensure!(last.failed == failed, "last progress {last:?}");
        Ok(())
    }
}

/// Publishes `events` as `pipeline` says, checking the progress calls.
async fn publish(
    publisher: &Arc<Publisher>,
    events: &[TaskEvent],
    pipeline: Pipeline,
    failed: usize,
) -> Result<Published> {
    let mut seen = Seen::default();
    let published = publish_all(publisher, events, pipeline, |progress, result| {
        seen.record(progress, result)
    })
    .await;
    seen.check(events.len(), failed)?;
    ensure!(
        published.results.len() == events.len(),
        "{} results for {} events",
        published.results.len(),
        events.len()
    );
    Ok(published)
}

async fn start_publisher(mq: &MqRuntime, settings: ProducerSettings) -> Result<Arc<Publisher>> {
    let mut publisher = Publisher::start(mq, settings).await?;
    publisher.create_topic(4).await?;
    Ok(Arc::new(publisher))
}

/// Publishes 2000 events to a topic of its own as `pipeline` says, reads the
/// topic back and checks that every event arrived once, under the id, queue
/// and offset of its receipt, and that the sends overlapped.
async fn publish_and_read_back(
    broker: &LocalBroker,
    mq: &MqRuntime,
    topic: &str,
    pipeline: Pipeline,
) -> Result<()> {
    const EVENTS: u64 = 2000;
    let topic = TopicName::new(topic)?;
    let publisher = start_publisher(
        mq,
        ProducerSettings::new(broker.name_server.clone(), topic.clone()),
    )
    .await?;
    // Distinct users make distinct keys, and two event types distinct tags:
    // the key and tag say which event a stored message is.
    let events: Vec<TaskEvent> = (0..EVENTS)
        .map(|user| {
            let kind = if user % 2 == 0 {
                "USER_REGISTER"
            } else {
                "DAILY_CHECKIN"
            };
            sample_event(kind, user)
        })
        .collect();
    let published = publish(&publisher, &events, pipeline, 0).await?;
    Arc::into_inner(publisher)
        .context("publisher still shared")?
        .shutdown()
        .await;
    let failures: Vec<String> = published.failures().map(|f| f.to_string()).collect();
    ensure!(failures.is_empty(), "not sent: {failures:?}");
    ensure!(published.pipeline == pipeline);
    // The first event goes alone, the others in runs of `batch`.
    let sends = 1 + (events.len() - 1).div_ceil(pipeline.batch);
    ensure!(
        published.sends == sends,
        "{} sends for {} events in batches of {} (the first event alone)",
        published.sends,
        events.len(),
        pipeline.batch
    );
    // The sends overlapped (all at once, unless the first answers came back
    // before the last sender started).
    ensure!(
        published.max_in_flight > pipeline.concurrency / 2
            && published.max_in_flight <= pipeline.concurrency,
        "at most {} sends were in flight at once",
        published.max_in_flight
    );
    let receipts: Vec<&PublishReceipt> = published
        .results
        .iter()
        .map(|result| result.as_ref().expect("all sent"))
        .collect();
    let ids: HashSet<&str> = receipts.iter().map(|r| r.message_id.as_str()).collect();
    ensure!(
        ids.len() == receipts.len() && !ids.contains(""),
        "{} distinct message ids for {} events",
        ids.len(),
        receipts.len()
    );
    let retried = receipts.iter().filter(|r| r.attempts > 1).count();
    eprintln!(
        "{pipeline:?}: published {EVENTS} events in {} sends, {} in flight at most, \
         in {:.2} s ({:.0} msg/s); {retried} needed a retry",
        published.sends,
        published.max_in_flight,
        published.elapsed.as_secs_f64(),
        published.rate()
    );

    let group = format!("{}-reader", topic.wire().replace('_', "-"));
    let (consumer, collect) = Collect::from_first(mq, &broker.name_server, topic, &group).await?;
    let deadline = Instant::now() + WAIT;
    while collect.deliveries().len() < events.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A duplicate would arrive after the last expected one.
    tokio::time::sleep(QUIET_PERIOD).await;
    consumer.shutdown().await;
    let deliveries = collect.deliveries();
    // Exactly once: as many stored messages as events (a retried send could
    // store a second copy under the same id; on a healthy broker none is).
    ensure!(
        deliveries.len() == events.len(),
        "{} deliveries for {} events ({retried} retried)",
        deliveries.len(),
        events.len()
    );
    let by_id: HashMap<&str, &mqplug::Delivery> = deliveries
        .iter()
        .map(|d| (d.message_id.as_str(), d))
        .collect();
    ensure!(by_id.len() == events.len(), "duplicate message ids stored");
    // Receipt i is event i's: the message stored under its id carries
    // event i's key and tag, at the queue and offset the receipt names.
    for (index, (event, receipt)) in events.iter().zip(&receipts).enumerate() {
        let delivery = by_id
            .get(receipt.message_id.as_str())
            .with_context(|| format!("event {index}: {receipt:?} never arrived"))?;
        ensure!(
            delivery.keys.contains(&event.key())
                && delivery.tags.as_deref() == Some(event.event_type.as_str()),
            "receipt {index} ({receipt:?}) is another event's: stored with keys {:?} and \
             tag {:?}, expected {} and {}",
            delivery.keys,
            delivery.tags,
            event.key(),
            event.event_type
        );
        ensure!(
            receipt.queue_id == Some(delivery.queue_id as i32)
                && receipt.queue_offset as i64 == delivery.queue_offset,
            "receipt {index} ({receipt:?}) names another place than {delivery:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_with_its_receipt_in_input_order() -> Result<()> {
    let broker = LocalBroker::start()?;
    let mq = MqRuntime::new(2)?;
    publish_and_read_back(&broker, &mq, "bulk.single", SINGLE).await?;
    publish_and_read_back(&broker, &mq, "bulk.batched", BATCHED).await?;
    mq.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_that_cannot_be_sent_is_reported_with_its_index() -> Result<()> {
    let mut broker = LocalBroker::start()?;
    let topic = TopicName::new("bulk.failures")?;
    let mq = MqRuntime::new(0)?;
    let publisher = start_publisher(
        &mq,
        ProducerSettings {
            // Too big a body fails at once; an ordinary send that is only
            // slow on a busy machine must not be reported as a failure.
            send_timeout: Duration::from_secs(10),
            // One retry of the host's own, soon: the test waits on every one.
            backoff: Backoff {
                attempts: 1,
                initial: Duration::from_millis(50),
                max: Duration::from_millis(50),
            },
            ..ProducerSettings::new(broker.name_server.clone(), topic.clone())
        },
    )
    .await?;

    // Some events among many are too big for RocketMQ (4 MiB bodies at
    // most): those fail, each under its own index and without a retry, the
    // others are sent (in batches too: an event that big goes alone).
    const EVENTS: u64 = 300;
    let too_big = [0, 17, 150, 299];
    let padding = "x".repeat(4 * 1024 * 1024 + 1);
    let events: Vec<TaskEvent> = (0..EVENTS)
        .map(|user| {
            if too_big.contains(&user) {
                sample_event_with("USER_REGISTER", user, serde_json::json!({"pad": padding}))
            } else {
                sample_event("USER_REGISTER", user)
            }
        })
        .collect();
    for pipeline in [SINGLE, BATCHED] {
        let published = publish(&publisher, &events, pipeline, too_big.len()).await?;
        for (index, result) in published.results.iter().enumerate() {
            match result {
                Err(failure) => {
                    ensure!(
                        too_big.contains(&(index as u64)) && failure.index == index,
                        "{pipeline:?}: event {index}: {failure}"
                    );
                    // No retry can shrink a body: refused at once, and the
                    // client the other sends share is kept.
                    let error = failure.error.to_string();
                    ensure!(
                        error.contains("not retried") && !error.contains("gave up"),
                        "a body too big for RocketMQ was retried: {failure}"
                    );
                }
                Ok(receipt) => ensure!(
                    !too_big.contains(&(index as u64)),
                    "{pipeline:?}: event {index} was too big, yet sent: {receipt:?}"
                ),
            }
        }
        ensure!(published.failed() == too_big.len());
        eprintln!(
            "{pipeline:?}, too big: {}",
            published.failures().next().context("a failure")?
        );
    }

    // With the broker gone, every event fails, alone or in its batch, and
    // every one is reported.
    broker.stop_broker();
    let events: Vec<TaskEvent> = (0..100)
        .map(|user| sample_event("DAILY_CHECKIN", user))
        .collect();
    for pipeline in [SINGLE, BATCHED] {
        let published = publish(&publisher, &events, pipeline, events.len()).await?;
        ensure!(
            published.sent() == 0,
            "{pipeline:?}: sent {} of {} with the broker stopped",
            published.sent(),
            events.len()
        );
        let indices: Vec<usize> = published.failures().map(|f| f.index).collect();
        ensure!(
            indices == (0..events.len()).collect::<Vec<_>>(),
            "{pipeline:?}: failures in the input's order, one per event: {indices:?}"
        );
        eprintln!(
            "{pipeline:?}, broker stopped: {} in {:.2} s",
            published.failures().last().context("a failure")?,
            published.elapsed.as_secs_f64()
        );
    }
    Arc::into_inner(publisher)
        .context("publisher still shared")?
        .shutdown()
        .await;
    mq.shutdown().await;
    Ok(())
}
