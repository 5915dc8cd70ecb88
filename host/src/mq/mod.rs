//! The RocketMQ adapter: a push consumer per plugin and the built-in producer.
//!
//! Knows the event model, nothing about wasmtime: a consumer hands each
//! message to a [`MessageHandler`] and reports its [`DeliveryOutcome`].

mod client;
mod consumer;
mod error;
mod publisher;
mod reader;
mod route;

pub use client::{Credentials, MqRuntime};
pub use consumer::{ConsumeFrom, ConsumerSettings, MessageHandler, OutcomeFuture, PluginConsumer};
pub use error::{MqError, error_chain};
pub use publisher::{
    Backoff, DEFAULT_PRODUCER_GROUP, ProducerSettings, PublishReceipt, Publisher, PublisherOutbox,
};
pub use reader::read_topic;
pub use route::{Probe, RouteClient};

pub use crate::outcome::DeliveryOutcome;
