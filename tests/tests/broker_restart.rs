//! The broker is stopped and restarted while events are being published and
//! consumed: the push consumer resumes by itself, the built-in producer rides
//! out the outage with its backoff, and every event the producer reported as
//! sent is handled. Nothing is dropped silently: an event is either sent (and
//! then handled) or reported as not sent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mqplug::config::PluginConfig;
use mqplug::mq::{Backoff, MqRuntime, ProducerSettings, Publisher};
use mqplug::{DeliveryOutcome, Host};
use mqplug_tests::{LocalBroker, Recorder, host_config, plugins::plugin_path, sample_event};

/// Events published before the broker is stopped, and at least this many
/// again after it is back.
const BEFORE: u64 = 20;
const AFTER: u64 = 20;
/// Slow events in flight when the broker stops.
const SLOW: u64 = 4;
/// Publishing stops early after this many events in a row were not sent.
const GIVE_UP_AFTER: usize = 3;

/// What the publishing task saw.
#[derive(Default)]
struct Published {
    /// Producer message id -> event number.
    sent: HashMap<String, u64>,
    not_sent: Vec<(u64, String)>,
    /// Sends that needed more than one attempt, and the most attempts one took.
    retried: usize,
    max_attempts: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_no_event() -> Result<()> {
    let mut broker = LocalBroker::start()?;
    let recorder = Recorder::new();
    let mut config = host_config(
        &broker,
        "restart.topic",
        vec![PluginConfig::new("chaos", plugin_path("chaos")?)],
    );
    // Pauses of 0.2, 0.4, 0.8, 1.6, then 2 s: about 45 s of retries, far
    // longer than a broker restart takes.
    config.producer.backoff_attempts = 25;
    config.producer.backoff_initial_ms = 200;
    config.producer.backoff_max_ms = 2000;
    let host = Arc::new(Host::start(&config, recorder.observers()).await?);
    host.publisher().context("the producer is enabled")?;

    let count = Arc::new(AtomicU64::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn({
        let (host, count, restarted) = (host.clone(), count.clone(), restarted.clone());
        async move {
            let publisher = host.publisher().expect("the producer is enabled");
            let mut published = Published::default();
            let mut after_restart = 0;
            for i in 0.. {
                let was_restarted = restarted.load(Ordering::SeqCst);
                let failing = published.not_sent.len() >= GIVE_UP_AFTER
                    && published.not_sent[published.not_sent.len() - GIVE_UP_AFTER].0
                        == i - GIVE_UP_AFTER as u64;
                if (was_restarted && after_restart >= AFTER) || failing {
                    break;
                }
                let mut event = sample_event("USER_REGISTER", 7000 + i);
                event.campaign_name = format!("restart #{i}");
                match publisher.publish(&event).await {
                    Ok(receipt) => {
                        published.retried += usize::from(receipt.attempts > 1);
                        published.max_attempts = published.max_attempts.max(receipt.attempts);
                        published.sent.insert(receipt.message_id, i);
                    }
                    Err(err) => published.not_sent.push((i, err.to_string())),
                }
                after_restart += u64::from(was_restarted);
                count.store(i + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            published
        }
    });

    // The restart runs on the test's own thread: the broker process dies
    // with the thread that started it.
    while count.load(Ordering::SeqCst) < BEFORE && !publishing.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second producer with a short backoff (2 attempts): it reports sends
    // while the broker is down, and shows how soon it sends once it is back.
    let probe_runtime = MqRuntime::new(1)?;
    let mut probe_settings =
        ProducerSettings::new(broker.name_server.clone(), host.topic().clone());
    probe_settings.group = "restart-probe".into();
    probe_settings.backoff = Backoff {
        attempts: 1,
        initial: Duration::from_millis(100),
        max: Duration::from_millis(100),
    };
    let probe = Publisher::start(&probe_runtime, probe_settings).await?;
    let probe_event = |i: u64| sample_event("USER_REGISTER", 8000 + i);
    let probe_before = probe.publish(&probe_event(0)).await?;

    // Handlers that finish while the broker is down: 4 s of work each, half
    // of them failing their first delivery. The client keeps a success's
    // offset until it can commit it, and re-runs a failure locally when it
    // cannot send it back.
    let publisher = host.publisher().context("the producer is enabled")?;
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let mut event = sample_event("BUSY", 9000 + i);
        event.event_data.insert("ms".into(), 4000.into());
        event
            .event_data
            .insert("fail_first".into(), (i % 2 == 0).into());
        slow.push((publisher.publish(&event).await?.message_id, i % 2 == 0));
    }
    let slow_ids: HashSet<String> = slow.iter().map(|(id, _)| id.clone()).collect();
    let slow_started = |r: &Recorder| {
        r.plugin_logs("chaos")
            .iter()
            .filter(|(id, _)| slow_ids.contains(id))
            .count()
    };
    let slow_done = |r: &Recorder| {
        r.handled_by("chaos")
            .iter()
            .filter(|h| slow_ids.contains(&h.message_id))
            .count()
    };
    ensure!(
        recorder.wait_until(Duration::from_secs(60), |r| slow_started(r) >= 2),
        "the slow events never started\n{}",
        broker.logs()
    );
    let runtime = tokio::runtime::Handle::current();
    let done_at_stop = slow_done(&recorder);
    let (done_at_ready, probe_down) = tokio::task::block_in_place(|| -> Result<_> {
        broker.stop_broker();
        // Enough failed connections to trip the probe client's breaker.
        let probe_down: Vec<Result<_, String>> = (1..=3)
            .map(|i| {
                runtime
                    .block_on(probe.publish(&probe_event(i)))
                    .map_err(|err| err.to_string())
            })
            .collect();
        // Down long enough for every client to notice, and for the slow
        // handlers to finish.
        std::thread::sleep(Duration::from_secs(5));
        broker.start_broker()?;
        Ok((slow_done(&recorder), probe_down))
    })?;
    let probe_back = probe.publish(&probe_event(4)).await;
    probe.shutdown().await;
    probe_runtime.shutdown().await;
    let probe_ids: Vec<String> = std::iter::once(&Ok(probe_before))
        .chain(&probe_down)
        .filter_map(|r| r.as_ref().ok().map(|r| r.message_id.clone()))
        .chain(probe_back.as_ref().ok().map(|r| r.message_id.clone()))
        .collect();
    restarted.store(true, Ordering::SeqCst);
    let back = Instant::now();
    let handled_before = recorder.handled_by("chaos").len();
    let resumed = recorder.wait_until(Duration::from_secs(120), |r| {
        r.handled_by("chaos").len() > handled_before
    });
    let resumed_after = back.elapsed();
    let published = publishing.await?;

    let all_handled = recorder.wait_until(Duration::from_secs(120), |r| {
        let handled: HashSet<String> = r
            .handled_by("chaos")
            .into_iter()
            .filter(|h| h.outcome == DeliveryOutcome::ConsumeSuccess)
            .map(|h| h.message_id)
            .collect();
        published
            .sent
            .keys()
            .chain(&slow_ids)
            .chain(&probe_ids)
            .all(|id| handled.contains(id))
    });
    Arc::into_inner(host)
        .context("the publishing task has ended")?
        .shutdown()
        .await;

    let handled = recorder.handled_by("chaos");
    // Acknowledgements per message id: more than one is a duplicate.
    let mut times: HashMap<&str, u32> = HashMap::new();
    for h in &handled {
        let entry = times.entry(h.message_id.as_str()).or_default();
        *entry += u32::from(h.outcome == DeliveryOutcome::ConsumeSuccess);
    }
    let mut missing: Vec<u64> = published
        .sent
        .iter()
        .filter(|(id, _)| !times.contains_key(id.as_str()))
        .map(|(_, i)| *i)
        .collect();
    missing.sort_unstable();
    eprintln!(
        "broker restart: published {}, sent {}, not sent {}, sends that needed a retry {}, \
         at most {} attempts; probe: {} not sent while down, sent in {} attempts once back; consumer resumed {:.1} s after the broker was ready; \
         handled {} distinct in {} deliveries (with {SLOW} slow ones), acknowledged twice {}",
        published.sent.len() + published.not_sent.len(),
        published.sent.len(),
        published.not_sent.len(),
        published.retried,
        published.max_attempts,
        probe_down.iter().filter(|r| r.is_err()).count(),
        probe_back.as_ref().map_or(0, |r| r.attempts),
        resumed_after.as_secs_f64(),
        times.len(),
        handled.len(),
        times.values().filter(|n| **n > 1).count(),
    );
    eprintln!(
        "broker restart: {} results of {SLOW} slow handlers came back while the broker was stopping or down",
        done_at_ready - done_at_stop
    );
    ensure!(resumed, "the consumer did not resume\n{}", broker.logs());
    ensure!(
        all_handled,
        "events sent but never handled: {missing:?}\n{}",
        broker.logs()
    );
    // Each slow event ends acknowledged; those that failed first were retried.
    for (id, fail_first) in &slow {
        let outcomes: Vec<_> = handled
            .iter()
            .filter(|h| &h.message_id == id)
            .map(|h| h.outcome)
            .collect();
        assert_eq!(
            outcomes.last(),
            Some(&DeliveryOutcome::ConsumeSuccess),
            "{id}: {outcomes:?}"
        );
        if *fail_first {
            assert_eq!(outcomes[0], DeliveryOutcome::ConsumeRetryLater, "{id}");
        }
    }
    // Whatever could not be sent was reported, with its cause.
    for (i, err) in &published.not_sent {
        assert!(err.contains("gave up after"), "event {i}: {err}");
    }
    // The stream went on after the restart, and the outage was really hit:
    // some send needed the backoff, or was reported.
    assert!(
        published.not_sent.len() < GIVE_UP_AFTER,
        "publishing never recovered: {:?}",
        published.not_sent
    );
    assert!(
        published.retried > 0 || !published.not_sent.is_empty(),
        "no send noticed the broker restart"
    );
    // While the broker was down, the probe's sends were reported as not
    // sent, with their cause; once it was back, the probe's next send went
    // through within its two attempts, although its client had tripped the
    // 1.0.0 client's circuit breaker (which would refuse the broker for
    // 30 s): the retry ran on a fresh client.
    for result in &probe_down {
        let err = result.as_ref().expect_err("the broker was down");
        assert!(err.contains("gave up after 2 attempts"), "{err}");
    }
    probe_back
        .as_ref()
        .map_err(|err| anyhow::anyhow!("the probe's send once the broker was back: {err}"))?;
    Ok(())
}
