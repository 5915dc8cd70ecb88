//! Added cost of a follow-up message per event: the chaos plugin's `PUBLISH`
//! event dispatched with one follow-up (put in the outbox, then sent through
//! the built-in producer to a real broker on 127.0.0.1 before the event is
//! acknowledged) against the same event with none, and against the same
//! message sent with the producer alone, in the same run.
//!
//!   cargo bench -p mqplug-tests --bench outbox

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use mqplug::config::PluginConfig;
use mqplug::delivery::Delivery;
use mqplug::dispatch::Dispatcher;
use mqplug::mq::{MqRuntime, ProducerSettings, Publisher, PublisherOutbox};
use mqplug::observe::Observers;
use mqplug::outcome::{DeliveryOutcome, UndecodablePolicy};
use mqplug::slot::load_plugin;
use mqplug::topic::TopicName;
use mqplug::wasm::{RuntimeSettings, WasmRuntime};
use mqplug_tests::LocalBroker;
use mqplug_tests::plugins::plugin_path;

const FOLLOW_UP_TOPIC: &str = "bench.follow.up";

fn bench(c: &mut Criterion) {
    let broker = LocalBroker::start().unwrap();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mq = MqRuntime::new(1).unwrap();
    let topic = TopicName::new(FOLLOW_UP_TOPIC).unwrap();
    let publisher = tokio.block_on(async {
        let mut publisher = Publisher::start(
            &mq,
            ProducerSettings::new(broker.name_server.clone(), topic.clone()),
        )
        .await
        .unwrap();
        publisher.create_topic(4).await.unwrap();
        Arc::new(publisher)
    });

    let runtime = WasmRuntime::new(RuntimeSettings::default()).unwrap();
    let entry = PluginConfig {
        allowed_topics: vec![FOLLOW_UP_TOPIC.into()],
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let plugin = load_plugin(&runtime, &entry, &Default::default()).unwrap();
    let dispatcher = Dispatcher::new(
        "chaos",
        Arc::new(plugin),
        UndecodablePolicy::Retry,
        usize::MAX,
        Observers::default(),
    )
    .with_outbox(Arc::new(PublisherOutbox::new(
        publisher.clone(),
        tokio.handle().clone(),
    )));
    let body = |count: u32| {
        mqplug_tests::sample_event_with(
            "PUBLISH",
            7,
            serde_json::json!({"topic": FOLLOW_UP_TOPIC, "count": count}),
        )
        .encode()
    };
    let (none, one) = (body(0), body(1));
    let delivery = Delivery {
        message_id: "C0A8000100002A9F0000000000000001".into(),
        ..Delivery::default()
    };
    // What the plugin publishes, sent with the producer alone.
    let follow_up = br#"{"for":"C0A8000100002A9F0000000000000001","i":0}"#.to_vec();

    let mut group = c.benchmark_group("outbox");
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("event_without_follow_up", |b| {
        b.iter(|| {
            assert_eq!(
                dispatcher.dispatch(&delivery, &none),
                DeliveryOutcome::ConsumeSuccess
            )
        })
    });
    group.bench_function("event_with_one_follow_up", |b| {
        b.iter(|| {
            assert_eq!(
                dispatcher.dispatch(&delivery, &one),
                DeliveryOutcome::ConsumeSuccess
            )
        })
    });
    group.bench_function("producer_send_alone", |b| {
        b.iter(|| {
            tokio
                .block_on(publisher.publish_to(
                    &topic,
                    follow_up.clone(),
                    Some("FOLLOW_UP"),
                    vec!["C0A8000100002A9F0000000000000001:0".into()],
                    None,
                ))
                .unwrap()
        })
    });
    group.finish();
    drop(dispatcher);
    tokio.block_on(async {
        if let Ok(publisher) = Arc::try_unwrap(publisher) {
            publisher.shutdown().await;
        }
        mq.shutdown().await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
