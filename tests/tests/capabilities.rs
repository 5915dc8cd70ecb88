//! What a plugin's config entry grants, and nothing more: its config values
//! and secrets through `wasi:config/store` (contract 0.2), secrets kept out
//! of the host's log and error texts; and plugins built against contract
//! 0.1 still running beside 0.2 ones.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use mqplug::config::{PluginConfig, SecretSource};
use mqplug::delivery::Delivery;
use mqplug::event::TaskEvent;
use mqplug::outcome::{Disposition, HandlerOutcome};
use mqplug::slot::load_plugin;
use mqplug::wasm::{Plugin, REDACTED, RuntimeSettings, WasmRuntime};
use mqplug_tests::http_server::{Answer, Server};
use mqplug_tests::{Recorder, plugins::plugin_path, workspace_root};

/// The platform's example event from user 7 with `event_data`.
fn event(event_type: &str, event_data: serde_json::Value) -> TaskEvent {
    mqplug_tests::sample_event_with(event_type, 7, event_data)
}

fn delivery(id: &str) -> Delivery {
    Delivery {
        message_id: id.into(),
        topic: "marketing_task_completed".into(),
        ..Delivery::default()
    }
}

fn runtime() -> Arc<WasmRuntime> {
    WasmRuntime::new(RuntimeSettings::default()).unwrap()
}

/// The chaos plugin under `entry`'s grants, loaded as the host loads it.
fn chaos_with(entry: PluginConfig, recorder: &Recorder) -> Result<Plugin, String> {
    load_plugin(&runtime(), &entry, &recorder.observers()).map_err(|err| err.to_string())
}

/// What the plugin logged for message `id`.
fn logged(recorder: &Recorder, id: &str) -> Vec<String> {
    recorder
        .plugin_logs("chaos")
        .into_iter()
        .filter(|(message_id, _)| message_id == id)
        .map(|(_, line)| line)
        .filter(|line| !line.starts_with("seen "))
        .collect()
}

const TOKEN: &str = "tok-5c1e2d9a7f";

/// A chaos entry granted `rewards_url` and the secret `token` (from a file
/// in `dir`).
fn granted_entry(dir: &Path) -> PluginConfig {
    let secret_file = dir.join("token");
    std::fs::write(&secret_file, format!("{TOKEN}\n")).unwrap();
    PluginConfig {
        config: BTreeMap::from([(
            "rewards_url".to_string(),
            "http://127.0.0.1:8080".to_string(),
        )]),
        secrets: BTreeMap::from([(
            "token".to_string(),
            SecretSource {
                env: None,
                file: Some(secret_file),
            },
        )]),
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    }
}

#[test]
fn a_plugin_reads_its_config_values_and_secrets_and_an_unset_key_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::new();
    let plugin = chaos_with(granted_entry(dir.path()), &recorder).unwrap();
    assert_eq!(plugin.contract(), "0.2");
    let keys = serde_json::json!({"keys": ["rewards_url", "token", "absent"]});
    assert_eq!(
        plugin.handle(&event("CONFIG", keys), &delivery("c-1")),
        HandlerOutcome::Accepted
    );
    assert_eq!(
        logged(&recorder, "c-1"),
        [
            "config rewards_url=http://127.0.0.1:8080".to_string(),
            // The plugin got the secret exactly (its trailing newline
            // dropped): the line carried it, and the host redacted it.
            format!("config token={REDACTED}"),
            "config absent=<none>".to_string(),
        ]
    );
}

#[test]
fn a_plugin_granted_nothing_reads_nothing() {
    let recorder = Recorder::new();
    let plugin = chaos_with(
        PluginConfig::new("chaos", plugin_path("chaos").unwrap()),
        &recorder,
    )
    .unwrap();
    let keys = serde_json::json!({"keys": ["rewards_url", "token", "HOME", "PATH"]});
    plugin.handle(&event("CONFIG", keys), &delivery("c-2"));
    assert_eq!(
        logged(&recorder, "c-2"),
        [
            "config rewards_url=<none>",
            "config token=<none>",
            "config HOME=<none>",
            "config PATH=<none>"
        ]
    );
}

#[test]
fn a_secret_never_reaches_the_hosts_log_or_an_error_reason() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::new();
    let plugin = chaos_with(granted_entry(dir.path()), &recorder).unwrap();
    let outcome = plugin.handle(
        &event("LEAK", serde_json::json!({"key": "token"})),
        &delivery("c-3"),
    );
    assert_eq!(
        outcome,
        HandlerOutcome::rejected(format!("leaking {REDACTED} in a reason"))
    );
    assert_eq!(logged(&recorder, "c-3"), [format!("leak {REDACTED}")]);
    let everything = format!(
        "{:?} {:?}",
        recorder.plugin_logs("chaos"),
        plugin.settings()
    );
    assert!(!everything.contains(TOKEN), "{everything}");
}

#[test]
fn a_secret_that_cannot_be_read_refuses_the_load_naming_where_it_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Recorder::new();
    let unset = "MQPLUG_TEST_SECRET_THAT_IS_NEVER_SET";
    assert!(std::env::var_os(unset).is_none());
    let from_env = PluginConfig {
        secrets: BTreeMap::from([(
            "token".to_string(),
            SecretSource {
                env: Some(unset.into()),
                file: None,
            },
        )]),
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let err = chaos_with(from_env, &recorder).err().unwrap();
    assert!(
        err.contains("secret \"token\"") && err.contains(unset),
        "{err}"
    );
    let missing_file = dir.path().join("nowhere");
    let from_file = PluginConfig {
        secrets: BTreeMap::from([(
            "token".to_string(),
            SecretSource {
                env: None,
                file: Some(missing_file.clone()),
            },
        )]),
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let err = chaos_with(from_file, &recorder).err().unwrap();
    assert!(
        err.contains("secret \"token\"") && err.contains(&missing_file.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_plugin_built_against_contract_0_1_runs_beside_0_2_plugins() {
    let recorder = Recorder::new();
    let runtime = runtime();
    // reward-logger as built against wit/v0.1/plugin.wit, kept unchanged.
    let old = workspace_root().join("tests/fixtures/reward-logger-contract-0.1.0.wasm");
    let old = Plugin::load_file(
        &runtime,
        mqplug::wasm::PluginSettings::new("old"),
        &old,
        recorder.observers(),
    )
    .unwrap();
    let new = Plugin::load_file(
        &runtime,
        mqplug::wasm::PluginSettings::new("new"),
        &plugin_path("reward-logger").unwrap(),
        recorder.observers(),
    )
    .unwrap();
    assert_eq!((old.contract(), new.contract()), ("0.1", "0.2"));
    let granted = event("USER_REGISTER", serde_json::json!({"count": 1}));
    for plugin in [&old, &new] {
        assert_eq!(
            plugin.handle(&granted, &delivery("r-1")),
            HandlerOutcome::Accepted
        );
    }
    let bad = event("USER_REGISTER", serde_json::json!({"count": "many"}));
    for plugin in [&old, &new] {
        assert!(
            matches!(
                plugin.handle(&bad, &delivery("r-2")),
                HandlerOutcome::Rejected { .. }
            ),
            "{}",
            plugin.name()
        );
    }
    for name in ["old", "new"] {
        assert!(
            recorder
                .plugin_logs(name)
                .iter()
                .any(|(id, line)| id == "r-1" && line.contains("user 7")),
            "{name}: {:?}",
            recorder.plugin_logs(name)
        );
    }
}

fn http_event(url: &str, method: &str, body: Option<&str>) -> TaskEvent {
    event(
        "HTTP",
        serde_json::json!({"url": url, "method": method, "body": body}),
    )
}

/// The chaos plugin granted `origins`, with a `deadline` (and a request
/// timeout far past it).
fn chaos_granted(
    origins: &[String],
    networks: &[&str],
    deadline: std::time::Duration,
    recorder: &Recorder,
) -> Plugin {
    let entry = PluginConfig {
        allowed_outbound_hosts: origins.to_vec(),
        allowed_outbound_networks: networks.iter().map(|n| n.to_string()).collect(),
        deadline_ms: deadline.as_millis() as u64,
        http_timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    chaos_with(entry, recorder).unwrap()
}

const SECOND: std::time::Duration = std::time::Duration::from_secs(1);
/// The request timeout of [`chaos_granted`]: 60 times its 1 s deadline.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[test]
fn a_granted_request_reaches_the_server_with_the_granted_authority() {
    let server = Server::start(Answer::Ok("granted"));
    let recorder = Recorder::new();
    let plugin = chaos_granted(&[server.origin()], &[], 10 * SECOND, &recorder);
    let url = format!("{}/grants?user=7", server.origin());
    let outcome = plugin.handle(
        &http_event(&url, "POST", Some(r#"{"points":10}"#)),
        &delivery("h-1"),
    );
    assert_eq!(outcome, HandlerOutcome::Accepted);
    assert_eq!(logged(&recorder, "h-1"), ["http 200 granted"]);
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let (head, body) = &requests[0];
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("POST /grants?user=7 HTTP/1.1"), "{head}");
    assert!(lower.contains(&format!("host: {}", server.addr)), "{head}");
    assert!(lower.contains("idempotency-key: h-1"), "{head}");
    assert!(body.contains(r#"{"points":10}"#), "{body}");
}

#[test]
fn a_request_goes_out_whole_with_its_length_never_in_chunks() {
    let server = Server::start(Answer::Ok("granted"));
    let recorder = Recorder::new();
    let plugin = chaos_granted(&[server.origin()], &[], 10 * SECOND, &recorder);
    let url = format!("{}/grants", server.origin());
    let requests = [
        ("GET", None),
        ("DELETE", None),
        ("POST", Some(r#"{"points":10}"#)),
    ];
    for (i, (method, body)) in requests.into_iter().enumerate() {
        let outcome = plugin.handle(
            &http_event(&url, method, body),
            &delivery(&format!("w-{i}")),
        );
        assert_eq!(outcome, HandlerOutcome::Accepted, "{method}");
    }
    let requests = server.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for (head, _) in &requests {
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "sent in chunks: {head}"
        );
    }
    // A request without a body says nothing about one, whatever its method
    // (hyper assumes none for a GET; a DELETE it would send in chunks).
    for (i, method) in ["GET", "DELETE"].into_iter().enumerate() {
        let (head, body) = &requests[i];
        assert!(
            head.starts_with(&format!("{method} /grants HTTP/1.1")),
            "{head}"
        );
        assert!(
            !head.to_ascii_lowercase().contains("content-length"),
            "{head}"
        );
        assert_eq!(body, "");
    }
    let (post, body) = &requests[2];
    assert!(
        post.to_ascii_lowercase().contains("content-length: 13"),
        "{post}"
    );
    assert_eq!(body, r#"{"points":10}"#);
}

#[test]
fn requests_outside_the_grants_are_refused_as_errors_the_handler_sees() {
    let server = Server::start(Answer::Ok("never"));
    let recorder = Recorder::new();
    let metrics = mqplug::metrics::Metrics::new();
    let entry = PluginConfig {
        allowed_outbound_hosts: vec![server.origin()],
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let observers = recorder.observers().with(metrics.observer());
    let plugin = load_plugin(&runtime(), &entry, &observers).unwrap();
    let other_port = format!("http://127.0.0.1:{}/", server.addr.port() + 1);
    let other_host = format!("http://127.0.0.2:{}/", server.addr.port());
    for (i, url) in [other_port, other_host].iter().enumerate() {
        let outcome = plugin.handle(&http_event(url, "GET", None), &delivery(&format!("d-{i}")));
        match outcome {
            HandlerOutcome::Rejected { reason, .. } => {
                assert!(reason.contains("HttpRequestDenied"), "{url}: {reason}")
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    // Nothing granted at all: refused too.
    let bare = chaos_with(
        PluginConfig::new("chaos", plugin_path("chaos").unwrap()),
        &recorder,
    )
    .unwrap();
    let outcome = bare.handle(
        &http_event(&format!("{}/", server.origin()), "GET", None),
        &delivery("d-3"),
    );
    assert!(
        matches!(outcome, HandlerOutcome::Rejected { ref reason, .. } if reason.contains("HttpRequestDenied")),
        "{outcome:?}"
    );
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    let text = metrics.render(&[]);
    assert!(
        text.contains("mqplug_outbound_requests_total{plugin=\"chaos\",result=\"refused\"} 2"),
        "{text}"
    );
}

#[test]
fn a_name_that_resolves_to_an_internal_address_is_refused_unless_its_network_is_granted() {
    let server = Server::start(Answer::Ok("inside"));
    let recorder = Recorder::new();
    let by_name = format!("http://localhost:{}", server.addr.port());
    let url = format!("{by_name}/");
    let refused = chaos_granted(std::slice::from_ref(&by_name), &[], 10 * SECOND, &recorder);
    let outcome = refused.handle(&http_event(&url, "GET", None), &delivery("n-1"));
    assert!(
        matches!(outcome, HandlerOutcome::Rejected { ref reason, .. } if reason.contains("DestinationIpProhibited")),
        "{outcome:?}"
    );
    assert!(server.requests().is_empty());
    let allowed = chaos_granted(
        &[by_name],
        &["127.0.0.0/8", "::1/128"],
        10 * SECOND,
        &recorder,
    );
    assert_eq!(
        allowed.handle(&http_event(&url, "GET", None), &delivery("n-2")),
        HandlerOutcome::Accepted
    );
    assert_eq!(logged(&recorder, "n-2"), ["http 200 inside"]);
}

#[test]
fn a_server_that_never_answers_or_trickles_ends_at_the_deadline_and_the_next_event_runs() {
    for answer in [Answer::Never, Answer::Trickle] {
        let server = Server::start(answer);
        let recorder = Recorder::new();
        let plugin = chaos_granted(&[server.origin()], &[], SECOND, &recorder);
        let url = format!("{}/", server.origin());
        // The request's own timeout (60 s) is far past the deadline (1 s).
        let outcome = plugin.handle(&http_event(&url, "GET", None), &delivery("t-1"));
        assert!(
            matches!(
                outcome,
                HandlerOutcome::Failed(mqplug::outcome::HandlerFailure::Deadline { .. })
            ),
            "{outcome:?}"
        );
        // Which limit ended the wait: the deadline, not the request timeout
        // (not a measurement: the two are 60 times apart).
        let ended = recorder.outbound("chaos");
        assert!(
            ended.iter().all(|(_, took)| *took < REQUEST_TIMEOUT),
            "{ended:?}"
        );
        assert_eq!(
            plugin.handle(
                &event("USER_REGISTER", serde_json::json!({})),
                &delivery("t-2")
            ),
            HandlerOutcome::Accepted
        );
    }
}

#[test]
fn a_response_over_the_size_cap_is_an_error_the_handler_sees() {
    let server = Server::start(Answer::Large(64 * 1024));
    let recorder = Recorder::new();
    let entry = PluginConfig {
        allowed_outbound_hosts: vec![server.origin()],
        http_max_response_bytes: 1024,
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let plugin = chaos_with(entry, &recorder).unwrap();
    let outcome = plugin.handle(
        &http_event(&format!("{}/", server.origin()), "GET", None),
        &delivery("s-1"),
    );
    assert!(
        matches!(outcome, HandlerOutcome::Rejected { ref reason, .. } if reason.contains("reading the response")),
        "{outcome:?}"
    );
}

#[test]
fn requests_past_the_in_flight_cap_are_refused() {
    let server = Server::start(Answer::Never);
    let recorder = Recorder::new();
    let entry = PluginConfig {
        allowed_outbound_hosts: vec![server.origin()],
        http_max_in_flight: 1,
        deadline_ms: 3_000,
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let plugin = Arc::new(chaos_with(entry, &recorder).unwrap());
    let url = format!("{}/", server.origin());
    let first = {
        let (plugin, url) = (plugin.clone(), url.clone());
        std::thread::spawn(move || plugin.handle(&http_event(&url, "GET", None), &delivery("f-1")))
    };
    // The first request holds the only place once the server has it.
    while server.requests().is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = plugin.handle(&http_event(&url, "GET", None), &delivery("f-2"));
    assert!(
        matches!(second, HandlerOutcome::Rejected { ref reason, .. } if reason.contains("ConnectionLimitReached")),
        "{second:?}"
    );
    assert!(matches!(
        first.join().unwrap(),
        HandlerOutcome::Failed(mqplug::outcome::HandlerFailure::Deadline { .. })
    ));
}

fn publish_event(topic: &str, then: &str) -> TaskEvent {
    event(
        "PUBLISH",
        serde_json::json!({"topic": topic, "count": 3, "then": then}),
    )
}

#[test]
fn follow_ups_are_held_until_ok_and_only_to_granted_topics() {
    let recorder = Recorder::new();
    let entry = PluginConfig {
        allowed_topics: vec!["marketing.reward.granted".into()],
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let plugin = chaos_with(entry, &recorder).unwrap();
    let (outcome, outbox) = plugin.handle_with_outbox(
        &publish_event("marketing.reward.granted", "ok"),
        &delivery("p-1"),
    );
    assert_eq!(outcome, HandlerOutcome::Accepted);
    assert_eq!(outbox.len(), 3);
    assert!(
        outbox
            .iter()
            .all(|m| m.topic.wire() == "marketing_reward_granted"
                && m.tag.as_deref() == Some("FOLLOW_UP"))
    );
    assert_eq!(outbox[1].body, br#"{"for":"p-1","i":1}"#.to_vec());
    // A handler that fails after publishing publishes nothing, and the next
    // event's outbox starts empty.
    let (outcome, outbox) = plugin.handle_with_outbox(
        &publish_event("marketing.reward.granted", "err"),
        &delivery("p-2"),
    );
    assert!(
        matches!(outcome, HandlerOutcome::Rejected { .. }),
        "{outcome:?}"
    );
    assert!(outbox.is_empty());
    let (_, outbox) = plugin.handle_with_outbox(
        &publish_event("marketing.reward.granted", "ok"),
        &delivery("p-3"),
    );
    assert_eq!(outbox.len(), 3, "not the failed event's leftovers");
    // A topic not granted: an error the handler sees.
    let (outcome, outbox) = plugin.handle_with_outbox(
        &publish_event("marketing.task.completed", "ok"),
        &delivery("p-4"),
    );
    assert!(
        matches!(outcome, HandlerOutcome::Rejected { ref reason, .. } if reason.contains("marketing.task.completed is not in this plugin's allowed_topics")),
        "{outcome:?}"
    );
    assert!(outbox.is_empty());
}

/// A follow-up RocketMQ could not carry as given is refused at `publish`
/// with the reason, and nothing reaches the outbox: a control character in a
/// tag or key would forge message properties (the client joins them with
/// U+0001 and U+0002), a space splits a key in two, and an empty body fails
/// in the client on every retry.
#[test]
fn a_follow_up_that_would_forge_properties_or_that_rocketmq_refuses_is_refused_at_publish() {
    let entry = PluginConfig {
        allowed_topics: vec!["marketing.reward.granted".into()],
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let plugin = chaos_with(entry, &Recorder::new()).unwrap();
    let hostile = [
        (
            serde_json::json!({"tag": "GRANTED\u{1}DELAY\u{2}3"}),
            "the tag `GRANTED\\u{1}DELAY\\u{2}3` has a control character",
        ),
        (
            serde_json::json!({"keys": ["user-7\u{2}TRAN_MSG\u{1}true"]}),
            "has a control character",
        ),
        (
            serde_json::json!({"keys": ["user-7 user-8"]}),
            "has a space",
        ),
        (serde_json::json!({"tag": "A||B"}), "has `||`"),
        (serde_json::json!({"tag": ""}), "the tag is empty"),
        (serde_json::json!({"body": ""}), "the body is empty"),
    ];
    for (i, (parts, why)) in hostile.into_iter().enumerate() {
        let mut data = serde_json::json!({"topic": "marketing.reward.granted", "count": 1});
        data.as_object_mut()
            .unwrap()
            .extend(parts.as_object().unwrap().clone());
        let (outcome, outbox) =
            plugin.handle_with_outbox(&event("PUBLISH", data), &delivery(&format!("h-{i}")));
        assert!(
            matches!(&outcome, HandlerOutcome::Failed(failure) if failure.to_string().contains(why)),
            "{why}: {outcome:?}"
        );
        assert!(outbox.is_empty(), "{why}");
    }
    // The same plugin's ordinary follow-up still goes.
    let (outcome, outbox) = plugin.handle_with_outbox(
        &publish_event("marketing.reward.granted", "ok"),
        &delivery("h-ok"),
    );
    assert_eq!(outcome, HandlerOutcome::Accepted);
    assert_eq!(outbox.len(), 3);
}

/// The Go SDK maps each way a Go handler fails to the contract: a panic is
/// recovered, logged through the host with its message and retried (never
/// a silent trap), `RetryAfter` and a wrapped `DeadLetter` keep their
/// meaning, an ordinary error retries; config reaches the handler.
#[test]
fn a_go_handlers_panics_and_typed_errors_become_the_contracts_outcomes() {
    let recorder = Recorder::new();
    let entry = PluginConfig {
        config: [("greeting".to_string(), "hello".to_string())].into(),
        ..PluginConfig::new(
            "failures",
            mqplug_tests::plugins::go_failures_path().unwrap(),
        )
    };
    let plugin = load_plugin(&runtime(), &entry, &recorder.observers()).unwrap();
    let run = |event_type: &str| {
        plugin.handle(
            &event(event_type, serde_json::json!({})),
            &delivery(event_type),
        )
    };
    match run("PANIC") {
        HandlerOutcome::Rejected {
            reason,
            disposition: Disposition::Retry,
        } => assert!(
            reason.contains("the handler panicked: assignment to entry in nil map"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    let logged = recorder.plugin_logs("failures");
    assert!(
        logged
            .iter()
            .any(|(id, line)| id == "PANIC"
                && line.starts_with("panic: assignment to entry in nil map")),
        "{logged:?}"
    );
    assert!(
        matches!(
            run("RETRY_AFTER"),
            HandlerOutcome::Rejected { ref reason, disposition: Disposition::RetryAfter(_) }
                if reason == "the service said busy"
        ),
        "{:?}",
        run("RETRY_AFTER")
    );
    assert!(
        matches!(
            run("DEAD_LETTER"),
            HandlerOutcome::Rejected { ref reason, disposition: Disposition::DeadLetter }
                if reason == "a poison event"
        ),
        "{:?}",
        run("DEAD_LETTER")
    );
    assert!(matches!(
        run("FAIL"),
        HandlerOutcome::Rejected {
            disposition: Disposition::Retry,
            ..
        }
    ));
    assert_eq!(run("CONFIG"), HandlerOutcome::Accepted);
    assert!(
        recorder
            .plugin_logs("failures")
            .iter()
            .any(|(id, line)| id == "CONFIG" && line == "greeting \"hello\" set true")
    );
    // The instance that recovered from a panic serves the next event.
    assert_eq!(run("OK"), HandlerOutcome::Accepted);
}

/// A Go plugin keeps serving on one instance for thousands of events, each
/// allocating and reading its config: Go's collector runs many cycles, and
/// none may run while the host writes values into the plugin (a cycle's end
/// reads the wall clock, an import the component model forbids there:
/// "cannot leave component instance").
#[test]
fn a_go_plugin_serves_thousands_of_events_on_one_instance_while_its_collector_runs() {
    let recorder = Recorder::new();
    let entry = PluginConfig {
        config: [("greeting".to_string(), "x".repeat(4096))].into(),
        log_lines_per_second: 1_000_000,
        log_bytes_per_second: 1 << 30,
        ..PluginConfig::new(
            "failures",
            mqplug_tests::plugins::go_failures_path().unwrap(),
        )
    };
    let plugin = load_plugin(&runtime(), &entry, &recorder.observers()).unwrap();
    let event = event(
        "CONFIG",
        serde_json::json!({"padding": "y".repeat(16 * 1024)}),
    );
    for i in 0..3_000 {
        let outcome = plugin.handle(&event, &delivery(&format!("m{i}")));
        assert_eq!(outcome, HandlerOutcome::Accepted, "event {i}");
    }
}

/// Keeps what it is asked to send.
#[derive(Default)]
struct Kept(std::sync::Mutex<Vec<(String, usize)>>);

impl mqplug::dispatch::OutboxSender for Kept {
    fn send(
        &self,
        _plugin: &str,
        delivery: &Delivery,
        messages: &[mqplug::wasm::OutgoingMessage],
        _budget: std::time::Duration,
    ) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .push((delivery.message_id.clone(), messages.len()));
        Ok(())
    }
}

#[test]
fn a_dispatcher_over_a_plugin_itself_sends_its_follow_ups() {
    let entry = PluginConfig {
        allowed_topics: vec!["marketing.reward.granted".into()],
        ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
    };
    let plugin = chaos_with(entry, &Recorder::new()).unwrap();
    let kept = Arc::new(Kept::default());
    let dispatcher = mqplug::dispatch::Dispatcher::new(
        "chaos",
        Arc::new(plugin),
        mqplug::outcome::UndecodablePolicy::Retry,
        usize::MAX,
        Default::default(),
    )
    .with_outbox(kept.clone());
    let body = publish_event("marketing.reward.granted", "ok").encode();
    assert_eq!(
        dispatcher.dispatch(&delivery("d-1"), &body),
        mqplug::DeliveryOutcome::ConsumeSuccess
    );
    assert_eq!(*kept.0.lock().unwrap(), [("d-1".to_string(), 3)]);
}

/// The chaos plugin granted `origin`, trusting `ca_pem` (when given) for it.
fn chaos_trusting(origin: &str, ca_pem: Option<&str>, dir: &Path) -> Plugin {
    let http_ca_file = ca_pem.map(|pem| {
        let file = dir.join("ca.pem");
        std::fs::write(&file, pem).unwrap();
        file
    });
    chaos_with(
        PluginConfig {
            allowed_outbound_hosts: vec![origin.to_string()],
            http_ca_file,
            ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
        },
        &Recorder::new(),
    )
    .unwrap()
}

#[test]
fn an_https_origin_is_reached_over_tls_when_its_certificate_is_trusted() {
    let (server, ca) = Server::start_tls(Answer::Ok("granted over tls"));
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/grants", server.origin());
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    let recorder = Recorder::new();
    let plugin = chaos_with(
        PluginConfig {
            allowed_outbound_hosts: vec![server.origin()],
            http_ca_file: Some({
                let file = dir.path().join("ca.pem");
                std::fs::write(&file, &ca).unwrap();
                file
            }),
            ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
        },
        &recorder,
    )
    .unwrap();
    let outcome = plugin.handle(&http_event(&url, "POST", Some("{}")), &delivery("t-1"));
    assert_eq!(outcome, HandlerOutcome::Accepted);
    assert_eq!(logged(&recorder, "t-1"), ["http 200 granted over tls"]);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].0.starts_with("POST /grants"), "{requests:?}");

    // Not trusted (only the system's roots): the handshake fails, an error
    // the handler sees; nothing reaches the server.
    let untrusting = chaos_trusting(&server.origin(), None, dir.path());
    let outcome = untrusting.handle(&http_event(&url, "GET", None), &delivery("t-2"));
    assert!(
        matches!(&outcome, HandlerOutcome::Rejected { reason, .. } if reason.contains("TlsCertificateError")),
        "{outcome:?}"
    );
    // The grant is for https: the same host and port over plain http is not
    // granted.
    let plain = url.replacen("https://", "http://", 1);
    let trusting = chaos_trusting(&server.origin(), Some(&ca), dir.path());
    let outcome = trusting.handle(&http_event(&plain, "GET", None), &delivery("t-3"));
    assert!(
        matches!(&outcome, HandlerOutcome::Rejected { reason, .. } if reason.contains("HttpRequestDenied")),
        "{outcome:?}"
    );
    assert_eq!(
        server.requests().len(),
        1,
        "nothing more reached the server"
    );
}

#[test]
fn an_http_ca_file_that_cannot_be_read_refuses_the_load_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for (file, why) in [
        (dir.path().join("missing.pem"), "missing.pem"),
        (not_pem, "no PEM certificate"),
    ] {
        let err = chaos_with(
            PluginConfig {
                allowed_outbound_hosts: vec!["https://rewards.internal".into()],
                http_ca_file: Some(file),
                ..PluginConfig::new("chaos", plugin_path("chaos").unwrap())
            },
            &Recorder::new(),
        )
        .err()
        .expect("the load is refused");
        assert!(err.contains("http_ca_file") && err.contains(why), "{err}");
    }
}

/// What the host's log keeps in this test binary.
const HOST_LOG: &str = "mqplug=warn";

#[test]
fn the_hosts_line_about_a_refused_request_hides_credentials_query_values_and_secrets() {
    mqplug_tests::host_log(HOST_LOG);
    let dir = tempfile::tempdir().unwrap();
    // Granted a secret, and no origin: every request is refused and logged.
    let plugin = chaos_with(granted_entry(dir.path()), &Recorder::new()).unwrap();
    let urls = [
        format!("http://127.0.0.1:9/redaction-probe/{TOKEN}?api_key=k3y-77&user=7"),
        "http://admin:hunter2@127.0.0.1:9/redaction-probe/userinfo".to_string(),
    ];
    for (i, url) in urls.iter().enumerate() {
        let outcome = plugin.handle(&http_event(url, "GET", None), &delivery(&format!("r-{i}")));
        assert!(
            matches!(outcome, HandlerOutcome::Rejected { .. }),
            "{url}: {outcome:?}"
        );
    }
    let log = mqplug_tests::host_log(HOST_LOG);
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("redaction-probe"))
        .collect();
    assert!(
        lines.iter().any(|line| line.contains(&format!(
            "GET http://127.0.0.1:9/redaction-probe/{REDACTED}?api_key=***&user=***"
        ))),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("GET http://***@127.0.0.1:9/redaction-probe/userinfo")),
        "{lines:#?}"
    );
    for secret in [TOKEN, "k3y-77", "hunter2", "admin:"] {
        assert!(
            !lines.iter().any(|line| line.contains(secret)),
            "{secret} reached the host's log: {lines:#?}"
        );
    }
}
