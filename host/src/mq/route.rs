//! The cluster as the name server describes it: whether the name server
//! answers and the brokers holding the topic take requests (readiness), and
//! where a new consumer group starts (`consume_from = "last"`).
//!
//! One client instance of its own on the host's client runtime, which holds
//! no producer or consumer, so its requests never wait behind theirs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rocketmq_client_rust::{ClientConfig, ClientInstanceHandle};
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_protocol::RequestCode;
use rocketmq_protocol::protocol::header::query_consumer_offset_request_header::QueryConsumerOffsetRequestHeader;
use rocketmq_protocol::protocol::header::update_consumer_offset_header::UpdateConsumerOffsetRequestHeader;
use rocketmq_protocol::protocol::remoting_command_compat::{
    create_remoting_command, create_request_command,
};
use rocketmq_protocol::protocol::route::topic_route_data::TopicRouteData;

use super::client::MqRuntime;
use super::error::{MqError, error_chain};

/// Each request's own bound: a probe or a pin never waits on a silent
/// server longer than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// RocketMQ's `QUERY_NOT_FOUND`: the group has no offset in that queue.
const QUERY_NOT_FOUND: i32 = 22;
/// RocketMQ's `NO_PERMISSION`: what ACL 2.0 answers a request it refuses.
const NO_PERMISSION: i32 = 16;
/// The broker id of a broker set's master.
const MASTER: u64 = 0;

/// Domains (client instances) made in this process.
static DOMAINS: AtomicU64 = AtomicU64::new(1);

/// What a probe found: every broker set holding the topic, and whether its
/// master answered. No broker set at all: the topic is not created yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub topic: String,
    pub brokers: Vec<(String, Result<(), String>)>,
}

impl Probe {
    /// Ready while at least one broker holding the topic answers (the
    /// others' queues wait, but messages flow), or while no broker holds it
    /// yet (the consumers are subscribed; its first message reaches them).
    /// `Err` names what does not answer.
    pub fn health(&self) -> Result<(), String> {
        let down = self.down();
        if !self.brokers.is_empty() && down.len() == self.brokers.len() {
            Err(format!(
                "no broker holding topic {} answers ({})",
                self.topic,
                down.join("; ")
            ))
        } else {
            Ok(())
        }
    }

    /// What is wrong while the host is still ready: brokers that do not
    /// answer while others do, a topic no broker holds yet.
    pub fn notes(&self) -> Vec<String> {
        if self.brokers.is_empty() {
            return vec![format!(
                "topic {}: no broker holds it yet (its first producer or mqadmin updateTopic creates it)",
                self.topic
            )];
        }
        if self.health().is_err() {
            return Vec::new();
        }
        self.down()
            .into_iter()
            .map(|down| format!("broker {down}; the other brokers serve"))
            .collect()
    }

    /// The broker sets whose master did not answer.
    pub fn silent(&self) -> Vec<String> {
        self.brokers
            .iter()
            .filter(|(_, state)| state.is_err())
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn down(&self) -> Vec<String> {
        self.brokers
            .iter()
            .filter_map(|(name, state)| state.as_ref().err().map(|why| format!("{name}: {why}")))
            .collect()
    }
}

/// A client instance for route and offset requests.
pub struct RouteClient {
    handle: ClientInstanceHandle,
    name_server: String,
}

impl RouteClient {
    pub async fn start(runtime: &MqRuntime, name_server: &str) -> Result<Self, MqError> {
        let mut config = ClientConfig::default();
        config.set_namesrv_addr(name_server.to_string().into());
        config.set_instance_name(format!("{}-route", runtime.instance_name()).into());
        let handle = ClientInstanceHandle::get_or_create(
            &runtime.client(),
            DOMAINS.fetch_add(1, Ordering::Relaxed),
            config,
            runtime.rpc_hook(),
        )
        .map_err(|err| MqError::new("create the route client", &err))?;
        handle
            .start()
            .await
            .map_err(|err| MqError::new("start the route client", &err))?;
        Ok(RouteClient {
            handle,
            name_server: name_server.to_string(),
        })
    }

    /// The topic's route; `Ok(None)` when the name server knows no broker
    /// holding it.
    async fn route(&self, wire: &str) -> Result<Option<TopicRouteData>, String> {
        match self.handle.topic_route(wire, millis(REQUEST_TIMEOUT)).await {
            Ok(route) => Ok(route.filter(|route| !route.broker_datas.is_empty())),
            Err(err) => {
                let chain = error_chain(&err);
                if chain.to_ascii_lowercase().contains("not exist")
                    || err.broker_response_code() == Some(17)
                {
                    Ok(None)
                } else {
                    Err(format!(
                        "name server {} did not answer: {chain}",
                        self.name_server
                    ))
                }
            }
        }
    }

    /// [`RouteClient::route`] for `action`, its failure as an [`MqError`].
    async fn route_for(
        &self,
        wire: &str,
        action: &(dyn Fn() -> String + Sync),
    ) -> Result<Option<TopicRouteData>, MqError> {
        self.route(wire)
            .await
            .map_err(|why| MqError::new(action(), &std::io::Error::other(why)))
    }

    /// Whether the name server answers a route request for `wire` (a topic
    /// it knows no broker for is an answer too).
    pub async fn name_server_answers(&self, wire: &str) -> Result<(), String> {
        self.route(wire).await.map(|_| ())
    }

    /// Asks the name server for `wire`'s route, then each broker set's
    /// master for the first queue's last offset (a request it answers from
    /// memory). `Err`: the name server did not answer.
    pub async fn probe(&self, wire: &str) -> Result<Probe, String> {
        let Some(route) = self.route(wire).await? else {
            return Ok(Probe {
                topic: wire.to_string(),
                brokers: Vec::new(),
            });
        };
        let mut brokers = Vec::new();
        for broker in &route.broker_datas {
            let name = broker.broker_name().to_string();
            let state = match broker.broker_addrs().get(&MASTER) {
                None => Err("no master registered".to_string()),
                Some(addr) => {
                    let queue =
                        MessageQueue::from_parts(wire.to_string(), broker.broker_name().clone(), 0);
                    self.handle
                        .max_offset(addr.as_str(), &queue, millis(REQUEST_TIMEOUT))
                        .await
                        .map(|_| ())
                        .map_err(|err| format!("{addr} did not answer: {}", error_chain(&err)))
                }
            };
            brokers.push((name, state));
        }
        Ok(Probe {
            topic: wire.to_string(),
            brokers,
        })
    }

    /// Whether the brokers holding `wire` let the credentials' user
    /// consume it in `group`: a query of the group's offset, which ACL 2.0
    /// checks like a subscription. `Err` names the broker, the group, the
    /// topic and the broker's reason. A topic with no route yet, or a
    /// broker that does not answer, is not a refusal: the consumer's own
    /// start and the readiness probe report those.
    pub async fn check_access(&self, group: &str, wire: &str) -> Result<(), String> {
        let Ok(Some(route)) = self.route(wire).await else {
            return Ok(());
        };
        let first_queues = readable_queues(&route, wire, &[])
            .into_iter()
            .filter(|(_, queue)| queue.queue_id() == 0);
        for (addr, queue) in first_queues {
            let mut query = QueryConsumerOffsetRequestHeader::new(group, wire, 0);
            query.set_zero_if_not_found = Some(false);
            let request = create_request_command(RequestCode::QueryConsumerOffset, query);
            let Ok(response) = self
                .handle
                .invoke_remoting(&addr.clone().into(), request, millis(REQUEST_TIMEOUT))
                .await
            else {
                continue;
            };
            if response.code() == NO_PERMISSION {
                return Err(format!(
                    "broker {} ({addr}) refused group {group} on topic {wire}: {}",
                    queue.broker_name(),
                    response
                        .remark()
                        .map_or("no permission", |remark| remark.as_str())
                ));
            }
        }
        Ok(())
    }

    /// Gives `group` an offset at the end of every queue of `wire` where it
    /// has none, so a new group starts with what is published from now on.
    /// Queues where the group has an offset keep it. Returns how many
    /// queues were set.
    ///
    /// Needed because the Java broker answers a group with no offset with
    /// 0 (not "not found") while a queue's first message is still in
    /// memory, and the client then starts there whatever `consume_from`
    /// says: a new group would get the topic's whole recent history. Asked
    /// with `setZeroIfNotFound = false`, the broker tells the two apart.
    pub async fn start_new_group_at_end(&self, group: &str, wire: &str) -> Result<usize, MqError> {
        let action = || format!("start new group {group} at the end of {wire}");
        let Some(route) = self.route_for(wire, &action).await? else {
            // No queue yet: the consumer starts at each queue's beginning,
            // which is now.
            return Ok(0);
        };
        let mut set = 0;
        let mut groups_made = std::collections::BTreeSet::new();
        for (addr, queue) in readable_queues(&route, wire, &[]) {
            let queue_id = queue.queue_id();
            let mut query = QueryConsumerOffsetRequestHeader::new(group, wire, queue_id);
            query.set_zero_if_not_found = Some(false);
            match self
                .handle
                .query_consumer_offset(&addr, query, millis(REQUEST_TIMEOUT))
                .await
            {
                Ok(_) => continue,
                Err(err) if err.broker_response_code() == Some(QUERY_NOT_FOUND) => {}
                Err(err) => return Err(MqError::new(action(), &err)),
            }
            // The broker takes an offset only for a group it knows; a new
            // one is made as its first heartbeat would (the defaults).
            if groups_made.insert(addr.clone()) {
                self.make_group(&addr, group)
                    .await
                    .map_err(|why| MqError::new(action(), &std::io::Error::other(why)))?;
            }
            let end = self
                .handle
                .max_offset(&addr, &queue, millis(REQUEST_TIMEOUT))
                .await
                .map_err(|err| MqError::new(action(), &err))?;
            let update = UpdateConsumerOffsetRequestHeader {
                consumer_group: group.to_string().into(),
                topic: wire.to_string().into(),
                queue_id,
                commit_offset: end,
                topic_request_header: None,
            };
            self.handle
                .update_consumer_offset(&addr.into(), update, millis(REQUEST_TIMEOUT))
                .await
                .map_err(|err| MqError::new(action(), &err))?;
            set += 1;
        }
        Ok(set)
    }

    /// Makes subscription group `group` on the broker at `addr`, with the
    /// broker's defaults, unless it has it.
    async fn make_group(&self, addr: &str, group: &str) -> Result<(), String> {
        if self
            .handle
            .subscription_group_config(
                &addr.to_string().into(),
                group.to_string().into(),
                millis(REQUEST_TIMEOUT),
            )
            .await
            .is_ok()
        {
            return Ok(());
        }
        let request = create_remoting_command(RequestCode::UpdateAndCreateSubscriptionGroup)
            .set_body(
                serde_json::json!({ "groupName": group })
                    .to_string()
                    .into_bytes(),
            );
        let response = self
            .handle
            .invoke_remoting(&addr.to_string().into(), request, millis(REQUEST_TIMEOUT))
            .await
            .map_err(|err| format!("create group {group} on {addr}: {}", error_chain(&err)))?;
        if response.code() != 0 {
            return Err(format!(
                "create group {group} on {addr}: code {}: {}",
                response.code(),
                response.remark().map_or("", |remark| remark.as_str())
            ));
        }
        Ok(())
    }

    /// Messages of `wire` waiting for `group`: over every queue whose
    /// master answers, the queue's end minus the group's committed offset
    /// (a queue where the group has none yet counts nothing). Brokers in
    /// `skip` (names) are not asked: a probe found them silent, and each
    /// would cost a timeout.
    pub async fn lag(&self, group: &str, wire: &str, skip: &[String]) -> Result<u64, MqError> {
        let action = || format!("read the lag of group {group} on {wire}");
        let Some(route) = self.route_for(wire, &action).await? else {
            return Ok(0);
        };
        let mut lag = 0u64;
        for (addr, queue) in readable_queues(&route, wire, skip) {
            let mut query = QueryConsumerOffsetRequestHeader::new(group, wire, queue.queue_id());
            query.set_zero_if_not_found = Some(false);
            let committed = match self
                .handle
                .query_consumer_offset(&addr, query, millis(REQUEST_TIMEOUT))
                .await
            {
                Ok(offset) => offset,
                Err(err) if err.broker_response_code() == Some(QUERY_NOT_FOUND) => continue,
                Err(err) => return Err(MqError::new(action(), &err)),
            };
            let end = self
                .handle
                .max_offset(&addr, &queue, millis(REQUEST_TIMEOUT))
                .await
                .map_err(|err| MqError::new(action(), &err))?;
            lag += u64::try_from(end.saturating_sub(committed)).unwrap_or(0);
        }
        Ok(lag)
    }

    pub async fn shutdown(&self) {
        self.handle.shutdown_owned().await;
    }
}

/// Every readable queue of `wire`'s `route` with its broker set's master address,
/// leaving out the broker sets named in `skip` and those with no master.
fn readable_queues(
    route: &TopicRouteData,
    wire: &str,
    skip: &[String],
) -> Vec<(String, MessageQueue)> {
    let mut queues = Vec::new();
    for data in &route.queue_datas {
        let name = data.broker_name();
        if skip.iter().any(|skipped| skipped == name.as_str()) {
            continue;
        }
        let Some(addr) = route
            .broker_datas
            .iter()
            .find(|broker| broker.broker_name() == name)
            .and_then(|broker| broker.broker_addrs().get(&MASTER))
        else {
            continue;
        };
        for queue_id in 0..i32::try_from(data.read_queue_nums()).unwrap_or(0) {
            queues.push((
                addr.to_string(),
                MessageQueue::from_parts(wire.to_string(), name.clone(), queue_id),
            ));
        }
    }
    queues
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_while_one_broker_holding_the_topic_answers_or_none_holds_it_yet() {
        let probe = |states: &[Result<(), &str>]| Probe {
            topic: "t".into(),
            brokers: states
                .iter()
                .enumerate()
                .map(|(i, state)| (format!("broker-{i}"), state.map_err(str::to_string)))
                .collect(),
        };
        assert_eq!(probe(&[Ok(()), Ok(())]).health(), Ok(()));
        assert!(probe(&[Ok(()), Ok(())]).notes().is_empty());
        let one_down = probe(&[Ok(()), Err("refused")]);
        assert_eq!(one_down.health(), Ok(()));
        assert_eq!(
            one_down.notes(),
            vec!["broker broker-1: refused; the other brokers serve".to_string()]
        );
        let all_down = probe(&[Err("refused"), Err("timed out")]);
        let why = all_down.health().unwrap_err();
        assert!(
            why.contains("broker-0: refused") && why.contains("broker-1: timed out"),
            "{why}"
        );
        assert!(all_down.notes().is_empty());
        let unrouted = probe(&[]);
        assert_eq!(unrouted.health(), Ok(()));
        assert!(unrouted.notes()[0].contains("no broker holds it yet"));
    }
}
