//! One message id per event across the built-in producer's retries: a send
//! the broker stored but whose answer never arrived is sent again, and both
//! stored copies carry the id the producer reported, so consumers that
//! deduplicate on the message id see one event.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mqplug::mq::{Backoff, MqRuntime, ProducerSettings, Publisher};
use mqplug::topic::TopicName;
use mqplug_tests::broker::BrokerKind;
use mqplug_tests::proxy::DropSendReplies;
use mqplug_tests::{Collect, LocalBroker, sample_event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_answer_is_lost_is_retried_with_the_same_message_id() -> Result<()> {
    // Clients reach the broker at 127.0.0.2, through a proxy that loses the
    // broker's answer to the first send.
    let proxied = Ipv4Addr::new(127, 0, 0, 2);
    let broker = LocalBroker::start_with(BrokerKind::from_env()?, proxied)?;
    let (listen, fast) = broker.listen_addr();
    let proxy = DropSendReplies::start(SocketAddr::from((proxied, listen.port())), listen, 1)?;
    let fast_proxy = DropSendReplies::start(SocketAddr::from((proxied, fast.port())), fast, 0)?;

    let topic = TopicName::new("identity.topic")?;
    let mq = MqRuntime::new(1)?;
    let mut publisher = Publisher::start(
        &mq,
        ProducerSettings {
            // No retries inside the client: the host's own retry, on a fresh
            // client with a clone of the message, is what is under test.
            retries: 0,
            // The dropped answer costs one whole timeout; a later attempt
            // that is merely slow should not time out too.
            send_timeout: Duration::from_secs(3),
            backoff: Backoff {
                attempts: 3,
                initial: Duration::from_millis(100),
                max: Duration::from_millis(500),
            },
            ..ProducerSettings::new(broker.name_server.clone(), topic.clone())
        },
    )
    .await?;
    publisher.create_topic(4).await?;
    let receipt = publisher.publish(&sample_event("USER_REGISTER", 7)).await?;
    publisher.shutdown().await;
    ensure!(
        proxy.dropped() == 1,
        "the proxy dropped {} answers",
        proxy.dropped()
    );
    ensure!(
        receipt.attempts >= 2,
        "the lost answer made the producer send again: {receipt:?}"
    );

    let (consumer, collect) =
        Collect::from_first(&mq, &broker.name_server, topic, "identity-reader").await?;
    // Every send that reached the broker was stored: as many as the
    // proxies passed on (an attempt that timed out on a slow machine too
    // counts, whether or not its answer came).
    let stored = proxy.forwarded() + fast_proxy.forwarded();
    ensure!(
        stored >= 2 && stored <= receipt.attempts as usize,
        "{stored} sends reached the broker in {} attempts",
        receipt.attempts
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while collect.deliveries().len() < stored && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.shutdown().await;
    mq.shutdown().await;
    let deliveries = collect.deliveries();
    ensure!(
        deliveries.len() == stored,
        "{} stored copies read back, expected {stored}: {deliveries:?}\n{}",
        deliveries.len(),
        broker.logs()
    );
    for delivery in &deliveries {
        assert_eq!(
            delivery.message_id, receipt.message_id,
            "every stored copy carries the id the producer reported"
        );
    }
    Ok(())
}
