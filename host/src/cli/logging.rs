//! The command line's logs: MQPLUG_LOG or each command's default level,
//! text or JSON on stderr, and the RocketMQ client's warnings about what
//! mqplug reports itself, in its own words, kept out of the default view.

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use super::{Cli, LogFormat};

/// Sets up the process's logs for `cli`. With MQPLUG_LOG set the user's
/// filter is the whole rule, the client's warnings included.
pub fn init(cli: &Cli) {
    let (filter, quiet_client) = match EnvFilter::try_from_env("MQPLUG_LOG") {
        Ok(filter) => (filter, false),
        Err(_) => (EnvFilter::new(cli.command.default_log_filter()), true),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let noise = quiet_client.then_some(ClientNoise);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish()
            .with(noise)
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .with(noise)
            .init(),
    }
}

/// What rocketmq-client-rust warns about, again and again, while a topic
/// is not on the broker yet or a group has not reached it: mqplug's probe
/// says that once, with what to do (`Shared::probe`). A broker that does not
/// answer is reported by the probe too.
const CLIENT_NOISE: &[&str] = &[
    "RouteInfoFromNameServer is not exist value",
    "getTopicRouteInfoFromNameServer return null",
    "get consumer id list failed",
    "getConsumerIdListByGroup exception",
    "] not exist.",
];

/// Drops the client's [`CLIENT_NOISE`] warnings; every other event passes.
struct ClientNoise;

impl<S: Subscriber> Layer<S> for ClientNoise {
    fn event_enabled(&self, event: &Event<'_>, _: Context<'_, S>) -> bool {
        !is_client_noise(event)
    }
}

fn is_client_noise(event: &Event<'_>) -> bool {
    let metadata = event.metadata();
    if *metadata.level() != Level::WARN || !metadata.target().starts_with("rocketmq_client_rust") {
        return false;
    }
    let mut message = Message(String::new());
    event.record(&mut message);
    CLIENT_NOISE.iter().any(|noise| message.0.contains(noise))
}

/// An event's `message` field, as text.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::ClientNoise;

    /// Collects the messages of the events that reach it.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut message = super::Message(String::new());
            event.record(&mut message);
            self.0.lock().unwrap().push(message.0);
        }
    }

    #[test]
    fn the_clients_missing_topic_warnings_are_dropped_and_everything_else_passes() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(seen.clone())
            .with(ClientNoise);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                target: "rocketmq_client_rust::implementation::mq_client_api_impl::route",
                "get Topic [{}] RouteInfoFromNameServer is not exist value",
                "marketing_task_completed"
            );
            tracing::warn!(
                target: "rocketmq_client_rust::consumer::consumer_impl::re_balance::rebalance_impl",
                "doRebalance, {}, but the topic[{}] not exist.",
                "mqplug-rewards",
                "marketing_task_completed"
            );
            // The same words at another level, from mqplug, and another
            // warning of the client's: all kept.
            tracing::error!(
                target: "rocketmq_client_rust::implementation::mq_client_api_impl::route",
                "get Topic [x] RouteInfoFromNameServer is not exist value"
            );
            tracing::warn!(target: "mqplug::host", "get consumer id list failed");
            tracing::warn!(
                target: "rocketmq_client_rust::factory::mq_client_instance",
                "connect to 127.0.0.1:1 failed"
            );
        });
        let seen = seen.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "get Topic [x] RouteInfoFromNameServer is not exist value",
                "get consumer id list failed",
                "connect to 127.0.0.1:1 failed",
            ]
        );
    }
}
