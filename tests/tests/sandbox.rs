//! The wasm side without a broker: each kind of plugin misbehaviour becomes
//! the documented outcome, and a failed instance never poisons the next event.

use std::sync::Arc;
use std::time::Duration;

use mqplug::delivery::Delivery;
use mqplug::event::{DEFAULT_MAX_BODY_BYTES, TaskEvent};
use mqplug::outcome::{DeliveryOutcome, HandlerFailure, HandlerOutcome, UndecodablePolicy};
use mqplug::replay::Replayer;
use mqplug::topic::TopicName;
use mqplug::wasm::{
    InstanceMode, Plugin, PluginLoadError, PluginSettings, RuntimeSettings, WasmRuntime,
};
use mqplug_tests::{Recorder, plugins::plugin_path};

fn event(event_type: &str) -> TaskEvent {
    let body = format!(
        r#"{{"event_type":"{event_type}","user_id":123,"tenant_id":"tenant1","app_id":"app1",
            "campaign_id":"campaign-1","campaign_name":"测试活动","event_data":{{"count":1}},
            "timestamp":"2026-11-25T14:19:15+08:00"}}"#
    );
    TaskEvent::decode(body.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap()
}

fn delivery(id: &str, reconsume_times: u32) -> Delivery {
    Delivery {
        message_id: id.into(),
        topic: "marketing_task_completed".into(),
        reconsume_times,
        ..Delivery::default()
    }
}

/// Loads the plugin named by `settings.name` from `plugins/`, reporting to
/// `recorder`.
fn load(settings: PluginSettings, recorder: &Recorder) -> Plugin {
    let runtime = WasmRuntime::new(RuntimeSettings::default()).unwrap();
    let path = plugin_path(&settings.name).unwrap();
    Plugin::load_file(&runtime, settings, &path, recorder.observers()).unwrap()
}

/// An engine whose pool holds at most `instances` component instances.
fn pool_of(instances: u32) -> Arc<WasmRuntime> {
    WasmRuntime::new(RuntimeSettings {
        max_instances: instances,
        ..RuntimeSettings::default()
    })
    .unwrap()
}

/// Loads `plugins/chaos` on `runtime` as the plugin `settings.name`.
fn chaos_on(runtime: &Arc<WasmRuntime>, settings: PluginSettings, recorder: &Recorder) -> Plugin {
    let path = plugin_path("chaos").unwrap();
    Plugin::load_file(runtime, settings, &path, recorder.observers()).unwrap()
}

/// A deadline no slow or busy machine reaches on an event that does not
/// loop or sleep: a test about traps or memory must not see "deadline".
const ROOMY_DEADLINE: Duration = Duration::from_secs(5);

fn chaos(mode: InstanceMode, recorder: &Recorder) -> Plugin {
    chaos_with_deadline(mode, ROOMY_DEADLINE, recorder)
}

fn chaos_with_deadline(mode: InstanceMode, deadline: Duration, recorder: &Recorder) -> Plugin {
    let settings = PluginSettings {
        deadline,
        memory_limit_bytes: 16 * 1024 * 1024,
        instance_mode: mode,
        ..PluginSettings::new("chaos")
    };
    load(settings, recorder)
}

#[test]
fn every_field_reaches_the_plugin_and_its_log_reaches_the_host() {
    let recorder = Recorder::new();
    let plugin = chaos(InstanceMode::Reuse, &recorder);
    let mut delivery = delivery("id-1", 3);
    delivery.tags = Some("USER_REGISTER".into());
    delivery.keys = vec!["k1".into(), "k2".into()];
    delivery.queue_id = 2;
    delivery.queue_offset = 41;
    delivery.born_timestamp = 1_764_080_355_000;
    assert_eq!(
        plugin.handle(&event("USER_REGISTER"), &delivery),
        HandlerOutcome::Accepted
    );
    let logs = recorder.plugin_logs("chaos");
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0].0, "id-1", "log lines carry the message id");
    let seen: serde_json::Value =
        serde_json::from_str(logs[0].1.strip_prefix("seen ").unwrap()).unwrap();
    assert_eq!(
        seen,
        serde_json::json!({
            "event_type": "USER_REGISTER", "user_id": 123, "tenant_id": "tenant1",
            "app_id": "app1", "campaign_id": "campaign-1", "campaign_name": "测试活动",
            "event_data": {"count": 1}, "timestamp": "2026-11-25T14:19:15+08:00",
            "message_id": "id-1", "topic": "marketing_task_completed",
            "tags": "USER_REGISTER", "keys": ["k1", "k2"], "reconsume_times": 3,
            "queue_id": 2, "queue_offset": 41, "born_timestamp": 1_764_080_355_000_i64,
        })
    );
}

#[test]
fn a_handler_error_is_a_rejection_with_its_reason() {
    let plugin = chaos(InstanceMode::Reuse, &Recorder::new());
    assert_eq!(
        plugin.handle(&event("FAIL"), &delivery("a", 0)),
        HandlerOutcome::rejected("chaos: asked to fail")
    );
    assert_eq!(
        plugin.handle(&event("FAIL_ONCE"), &delivery("b", 0)),
        HandlerOutcome::rejected("chaos: failing the first delivery")
    );
    assert_eq!(
        plugin.handle(&event("FAIL_ONCE"), &delivery("b", 1)),
        HandlerOutcome::Accepted
    );
}

#[test]
fn a_panic_is_a_trap_and_the_next_event_gets_a_fresh_store() {
    let plugin = chaos(InstanceMode::Reuse, &Recorder::new());
    for round in 0..3 {
        match plugin.handle(&event("PANIC"), &delivery("p", round)) {
            HandlerOutcome::Failed(HandlerFailure::Trap { detail }) => {
                assert!(detail.contains("unreachable"), "{detail}")
            }
            other => panic!("expected a trap, got {other:?}"),
        }
        assert_eq!(
            plugin.handle(&event("USER_REGISTER"), &delivery("ok", 0)),
            HandlerOutcome::Accepted,
            "the event after a trap must run on a new Store"
        );
    }
}

#[test]
fn an_endless_loop_is_stopped_by_the_deadline() {
    let limit = Duration::from_millis(200);
    let plugin = chaos_with_deadline(InstanceMode::Reuse, limit, &Recorder::new());
    assert_eq!(
        plugin.handle(&event("LOOP"), &delivery("l", 0)),
        HandlerOutcome::Failed(HandlerFailure::Deadline { limit })
    );
    assert_eq!(
        plugin.handle(&event("USER_REGISTER"), &delivery("ok", 0)),
        HandlerOutcome::Accepted
    );
}

#[test]
fn growing_past_the_memory_limit_is_reported_as_such() {
    let plugin = chaos(InstanceMode::Reuse, &Recorder::new());
    match plugin.handle(&event("OOM"), &delivery("m", 0)) {
        HandlerOutcome::Failed(failure @ HandlerFailure::MemoryLimit { .. }) => {
            assert!(failure.to_string().starts_with("memory limit"), "{failure}");
        }
        other => panic!("expected a memory limit failure, got {other:?}"),
    }
    assert_eq!(
        plugin.handle(&event("USER_REGISTER"), &delivery("ok", 0)),
        HandlerOutcome::Accepted
    );
}

#[test]
fn fresh_instance_mode_handles_events_too() {
    let plugin = chaos(InstanceMode::FreshPerEvent, &Recorder::new());
    for id in ["1", "2", "3"] {
        assert_eq!(
            plugin.handle(&event("USER_REGISTER"), &delivery(id, 0)),
            HandlerOutcome::Accepted
        );
    }
    assert!(matches!(
        plugin.handle(&event("PANIC"), &delivery("4", 0)),
        HandlerOutcome::Failed(_)
    ));
}

#[test]
fn the_example_plugin_grants_rewards_and_rejects_a_bad_count() {
    let recorder = Recorder::new();
    let plugin = load(PluginSettings::new("reward-logger"), &recorder);
    assert_eq!(
        plugin.handle(&event("USER_REGISTER"), &delivery("r1", 0)),
        HandlerOutcome::Accepted
    );
    let logs = recorder.plugin_logs("reward-logger");
    assert!(
        logs[0].1.contains("granting 10 points"),
        "unexpected log: {logs:?}"
    );
    let mut bad = event("USER_REGISTER");
    bad.event_data
        .insert("count".into(), serde_json::json!("three"));
    assert!(matches!(
        plugin.handle(&bad, &delivery("r2", 0)),
        HandlerOutcome::Rejected { reason, .. } if reason.contains("count")
    ));
}

#[test]
fn a_file_that_is_not_a_component_is_rejected_at_load_time() {
    let runtime = WasmRuntime::new(RuntimeSettings::default()).unwrap();
    let err = Plugin::load(
        &runtime,
        PluginSettings::new("junk"),
        b"\0asm definitely not",
        Default::default(),
    )
    .err()
    .expect("junk must not load");
    assert!(matches!(err, PluginLoadError::Compile { .. }), "{err}");
    assert!(err.to_string().starts_with("plugin junk:"), "{err}");
}

#[test]
fn a_component_of_another_world_is_rejected_naming_what_is_missing() {
    // A component that exports nothing: valid, but not an mqplug plugin.
    let runtime = WasmRuntime::new(RuntimeSettings::default()).unwrap();
    let empty_component = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    let err = Plugin::load(
        &runtime,
        PluginSettings::new("empty"),
        &empty_component,
        Default::default(),
    )
    .err()
    .expect("an empty component must not load");
    assert!(matches!(err, PluginLoadError::WrongWorld { .. }), "{err}");
    assert!(err.to_string().contains("handler"), "{err}");
}

#[test]
fn replay_gives_the_same_outcomes_as_the_consumer_would() {
    let plugin = load(PluginSettings::new("chaos"), &Recorder::new());
    let replayer = Replayer::new(
        Arc::new(plugin),
        TopicName::new("marketing.task.completed").unwrap(),
        UndecodablePolicy::Retry,
        DEFAULT_MAX_BODY_BYTES,
    );
    let good = serde_json::to_vec(&event("USER_REGISTER")).unwrap();
    let result = replayer.replay(1, &good, 0);
    assert_eq!(result.outcome, DeliveryOutcome::ConsumeSuccess);
    assert_eq!(result.cause, None);
    let result = replayer.replay(2, b"{\"user_id\": 1", 0);
    assert_eq!(result.outcome, DeliveryOutcome::ConsumeRetryLater);
    assert!(result.cause.unwrap().starts_with("undecodable"));
    let failing = serde_json::to_vec(&event("FAIL")).unwrap();
    let result = replayer.replay(3, &failing, 0);
    assert_eq!(result.outcome, DeliveryOutcome::ConsumeRetryLater);
    assert_eq!(
        result.cause.as_deref(),
        Some("handler error: chaos: asked to fail")
    );
}

#[test]
fn the_readme_plugin_is_the_one_built_here_and_it_runs() {
    let source = std::fs::read_to_string(
        mqplug_tests::workspace_root().join("plugins/my-plugin/src/lib.rs"),
    )
    .unwrap();
    // The README's first plugin, and the book's Rust chapter.
    for page in ["README.md", "docs/plugins/rust.md"] {
        let text = std::fs::read_to_string(mqplug_tests::workspace_root().join(page)).unwrap();
        let snippet = text
            .split("`src/lib.rs`:\n\n```rust\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap_or_else(|| panic!("{page} shows a plugin's src/lib.rs"));
        assert_eq!(
            snippet, source,
            "the snippet in {page} and plugins/my-plugin differ"
        );
    }

    let recorder = Recorder::new();
    let plugin = load(PluginSettings::new("my-plugin"), &recorder);
    assert_eq!(
        plugin.handle(&event("USER_REGISTER"), &delivery("x", 0)),
        HandlerOutcome::Accepted
    );
    assert_eq!(
        recorder.plugin_logs("my-plugin")[0].1,
        "USER_REGISTER by user 123, attempt 1"
    );
    let mut no_tenant = event("USER_REGISTER");
    no_tenant.tenant_id.clear();
    assert_eq!(
        plugin.handle(&no_tenant, &delivery("y", 0)),
        HandlerOutcome::rejected("no tenant")
    );
}

#[test]
fn a_plugin_reaches_no_files_environment_arguments_or_network() {
    // Everything the plugin probes is there to be reached: the host has
    // environment variables, and a server really listens on the port it
    // tries, so a granted connection would succeed and fail the test.
    assert!(
        std::env::var_os("PATH").is_some(),
        "the host has an environment"
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut probe = event("PROBE_SANDBOX");
    probe.event_data.insert(
        "port".into(),
        serde_json::Value::from(listener.local_addr().unwrap().port()),
    );
    let plugin = chaos(InstanceMode::Reuse, &Recorder::new());
    assert_eq!(
        plugin.handle(&probe, &delivery("s", 0)),
        HandlerOutcome::Accepted
    );
    assert!(
        listener.accept().is_err(),
        "no connection from the plugin reached the listener"
    );
}

#[test]
fn a_stack_overflow_is_a_trap_and_the_plugin_recovers() {
    let plugin = chaos(InstanceMode::Reuse, &Recorder::new());
    match plugin.handle(&event("STACK_OVERFLOW"), &delivery("so", 0)) {
        HandlerOutcome::Failed(HandlerFailure::Trap { detail }) => {
            // Rust's stack lives in linear memory: overflowing it is an
            // out-of-bounds access, named as a possible stack overflow.
            assert!(detail.contains("stack"), "{detail}")
        }
        other => panic!("expected a stack overflow trap, got {other:?}"),
    }
    assert_eq!(
        plugin.handle(&event("USER_REGISTER"), &delivery("ok", 0)),
        HandlerOutcome::Accepted
    );
}

#[test]
fn a_plugin_cannot_log_more_than_its_budget() {
    let recorder = Recorder::new();
    let settings = PluginSettings {
        log_lines_per_second: 5,
        ..PluginSettings::new("chaos")
    };
    let plugin = load(settings, &recorder);
    for id in 0..20 {
        // chaos logs one line per event.
        assert_eq!(
            plugin.handle(&event("USER_REGISTER"), &delivery(&id.to_string(), 0)),
            HandlerOutcome::Accepted
        );
    }
    let logged = recorder.plugin_logs("chaos").len();
    // The 20 events take well under a second, but a slow machine may cross
    // into a second window.
    assert!((5..=10).contains(&logged), "{logged} lines got through");
    // The plugin is quiet now; the drop is still reported once its window
    // ends (by the runtime's ticker), every line counted.
    let dropped = 20 - logged as u64;
    assert!(
        recorder.wait_until(Duration::from_secs(30), |r| r.logs_dropped("chaos")
            >= dropped),
        "the drop summary never came: {} of {dropped}",
        recorder.logs_dropped("chaos")
    );
    assert_eq!(recorder.logs_dropped("chaos"), dropped);
}

#[test]
fn a_plugin_cannot_log_more_bytes_than_its_budget() {
    let recorder = Recorder::new();
    let plugin = load(
        PluginSettings {
            log_bytes_per_second: 64 * 1024,
            ..PluginSettings::new("chaos")
        },
        &recorder,
    );
    // Each event's line is about 10 KB: six fit in 64 KiB, the rest not.
    let mut big = event("USER_REGISTER");
    big.campaign_name = "x".repeat(10_000);
    for id in 0..20 {
        assert_eq!(
            plugin.handle(&big, &delivery(&id.to_string(), 0)),
            HandlerOutcome::Accepted
        );
    }
    let logged = recorder.plugin_logs("chaos").len();
    assert!((6..=12).contains(&logged), "{logged} lines got through");
    assert!(
        recorder.wait_until(Duration::from_secs(30), |r| r.logs_dropped("chaos") > 0),
        "the drop summary never came"
    );
}

#[test]
fn a_plugin_log_line_is_cut_at_16_kib() {
    let recorder = Recorder::new();
    let plugin = chaos(InstanceMode::Reuse, &recorder);
    let mut big = event("USER_REGISTER");
    // chaos logs the whole event: a line of over 40 KB, in 3-byte characters.
    big.campaign_name = "活".repeat(40_000 / 3);
    assert_eq!(
        plugin.handle(&big, &delivery("big", 0)),
        HandlerOutcome::Accepted
    );
    let logs = recorder.plugin_logs("chaos");
    let line = &logs[0].1;
    assert!(
        line.ends_with(" [truncated]"),
        "{} bytes, not cut",
        line.len()
    );
    assert!(
        line.len() <= 16 * 1024 + " [truncated]".len(),
        "{}",
        line.len()
    );
}

#[test]
fn out_of_fuel_is_a_deterministic_limit_and_the_plugin_recovers() {
    let runtime = WasmRuntime::new(RuntimeSettings {
        fuel: true,
        ..RuntimeSettings::default()
    })
    .unwrap();
    let settings = PluginSettings {
        // Far past what the loop needs to run out of fuel: fuel stops it.
        deadline: Duration::from_secs(20),
        fuel_per_event: Some(10_000_000),
        ..PluginSettings::new("chaos")
    };
    let plugin = chaos_on(&runtime, settings, &Recorder::new());
    assert_eq!(
        plugin.handle(&event("LOOP"), &delivery("loop", 0)),
        HandlerOutcome::Failed(HandlerFailure::OutOfFuel { limit: 10_000_000 })
    );
    assert_eq!(
        plugin.handle(&event("USER_REGISTER"), &delivery("next", 0)),
        HandlerOutcome::Accepted,
        "a fresh store with a full tank handles the next event"
    );

    // Asking for fuel from a runtime that does not count it is a load error.
    let plain = WasmRuntime::new(RuntimeSettings::default()).unwrap();
    let settings = PluginSettings {
        fuel_per_event: Some(1),
        ..PluginSettings::new("chaos")
    };
    let path = plugin_path("chaos").unwrap();
    let err = Plugin::load_file(&plain, settings, &path, Default::default())
        .err()
        .expect("fuel without fuel counting must not load");
    assert!(
        matches!(err, PluginLoadError::FuelNotEnabled { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("runtime.fuel = true"), "{err}");
}

#[test]
fn a_loaded_plugin_holds_no_instance_until_its_first_event() {
    // Loading instantiates once to prove the plugin can run, then lets the
    // instance go: a host of many idle plugins holds none of their memory.
    let runtime = pool_of(4);
    let recorder = Recorder::new();
    let plugins: Vec<Plugin> = (0..6)
        .map(|i| {
            chaos_on(
                &runtime,
                PluginSettings::new(format!("idle-{i}")),
                &recorder,
            )
        })
        .collect();
    assert_eq!(runtime.pool_usage().component_instances, 0);
    assert!(plugins.iter().all(|p| p.memory_at_instantiation() > 0));
    assert_eq!(
        plugins[0].handle(&event("OK"), &delivery("first", 0)),
        HandlerOutcome::Accepted
    );
    // Reused from now on (the default instance mode).
    assert_eq!(runtime.pool_usage().component_instances, 1);
}

#[test]
fn a_plugin_that_fails_every_event_gives_back_its_pool_slots_and_starves_no_one() {
    // A small pool: a leak of one slot per failure would exhaust it within
    // the first few rounds, and instantiation would then fail.
    let runtime = pool_of(4);
    let recorder = Recorder::new();
    let failing = chaos_on(
        &runtime,
        PluginSettings {
            deadline: Duration::from_millis(50),
            memory_limit_bytes: 16 * 1024 * 1024,
            ..PluginSettings::new("failing")
        },
        &recorder,
    );
    let healthy = chaos_on(&runtime, PluginSettings::new("healthy"), &recorder);
    assert_eq!(
        healthy.handle(&event("OK"), &delivery("warm", 0)),
        HandlerOutcome::Accepted
    );
    // The failing plugin's first failure drops the instance it made.
    assert!(matches!(
        failing.handle(&event("PANIC"), &delivery("first", 0)),
        HandlerOutcome::Failed(HandlerFailure::Trap { .. })
    ));
    let idle = runtime.pool_usage();
    assert_eq!(idle.component_instances, 1, "{idle:?}");

    let kinds = ["PANIC", "OOM", "STACK_OVERFLOW", "PANIC", "LOOP"];
    for round in 0..200u32 {
        let kind = kinds[round as usize % kinds.len()];
        match failing.handle(&event(kind), &delivery("bad", round)) {
            HandlerOutcome::Failed(
                HandlerFailure::Trap { .. }
                | HandlerFailure::MemoryLimit { .. }
                | HandlerFailure::Deadline { .. },
            ) => {}
            other => panic!("round {round} ({kind}): {other:?}"),
        }
        assert_eq!(
            healthy.handle(&event("OK"), &delivery("good", round)),
            HandlerOutcome::Accepted,
            "round {round}: the healthy plugin was starved"
        );
    }
    // Every failed instance was dropped and its slots returned: what is live
    // now is the healthy plugin's idle instance.
    assert_eq!(runtime.pool_usage(), idle);
}

#[test]
fn an_instance_that_cannot_be_created_is_a_host_failure_and_the_next_event_recovers() {
    // A pool of one component instance, held by a busy handler: a second
    // event at the same time cannot get an instance of its own.
    let runtime = pool_of(1);
    let recorder = Recorder::new();
    let plugin = Arc::new(chaos_on(&runtime, PluginSettings::new("chaos"), &recorder));
    let busy = std::thread::spawn({
        let plugin = plugin.clone();
        move || {
            // Busy long enough for the test to see it started and send its
            // second event on a slow machine, within the 5 s deadline.
            let mut event = event("BUSY");
            event.event_data.insert("ms".into(), 3000.into());
            plugin.handle(&event, &delivery("busy", 0))
        }
    });
    assert!(recorder.wait_until(Duration::from_secs(30), |r| {
        r.plugin_logs("chaos").iter().any(|(id, _)| id == "busy")
    }));
    match plugin.handle(&event("OK"), &delivery("second", 0)) {
        HandlerOutcome::Failed(HandlerFailure::Host { detail }) => {
            assert!(detail.contains("instance"), "{detail}")
        }
        other => panic!("expected a host failure, got {other:?}"),
    }
    assert_eq!(busy.join().unwrap(), HandlerOutcome::Accepted);
    // The slot is free again: the same event now succeeds.
    assert_eq!(
        plugin.handle(&event("OK"), &delivery("second", 1)),
        HandlerOutcome::Accepted
    );
}

/// An event for the chaos plugin's `SLEEP` mode: `std::thread::sleep` for
/// `ms` milliseconds (a clock subscription, then a blocking WASI wait).
fn sleep_event(ms: u64) -> TaskEvent {
    let mut sleep = event("SLEEP");
    sleep
        .event_data
        .insert("ms".into(), serde_json::Value::from(ms));
    sleep
}

/// Runs `plugin.handle` on a thread of its own and waits at most `patience`
/// for the outcome; `None` if it is still running.
fn handle_within(
    plugin: &Arc<Plugin>,
    event: TaskEvent,
    id: &str,
    patience: Duration,
) -> Option<HandlerOutcome> {
    let (sender, outcome) = std::sync::mpsc::channel();
    let plugin = plugin.clone();
    let delivery = delivery(id, 0);
    std::thread::spawn(move || {
        let _ = sender.send(plugin.handle(&event, &delivery));
    });
    outcome.recv_timeout(patience).ok()
}

#[test]
fn a_plugin_sleeping_past_its_deadline_ends_at_the_deadline_and_the_next_event_runs() {
    let recorder = Recorder::new();
    let plugin = Arc::new(load(
        PluginSettings {
            deadline: Duration::from_secs(2),
            ..PluginSettings::new("chaos")
        },
        &recorder,
    ));
    // The plugin asks for an hour. A host whose deadline stopped only running
    // wasm would still be waiting when this test gives up, a minute later.
    let outcome = handle_within(
        &plugin,
        sleep_event(3_600_000),
        "sleeper",
        Duration::from_secs(60),
    )
    .expect("the sleep was not cut at the 2 s deadline");
    assert!(
        matches!(
            outcome,
            HandlerOutcome::Failed(HandlerFailure::Deadline { limit }) if limit == Duration::from_secs(2)
        ),
        "{outcome:?}"
    );
    assert_eq!(
        mqplug::outcome::delivery_outcome(&outcome),
        DeliveryOutcome::ConsumeRetryLater
    );
    assert_eq!(
        plugin.handle(&event("USER_REGISTER"), &delivery("next", 0)),
        HandlerOutcome::Accepted
    );
}

#[test]
fn a_short_sleep_within_the_deadline_is_kept() {
    let recorder = Recorder::new();
    let plugin = Arc::new(load(
        PluginSettings {
            deadline: Duration::from_secs(20),
            ..PluginSettings::new("chaos")
        },
        &recorder,
    ));
    let outcome = handle_within(&plugin, sleep_event(50), "napper", Duration::from_secs(60));
    assert_eq!(outcome, Some(HandlerOutcome::Accepted));
    assert!(
        recorder
            .plugin_logs("chaos")
            .iter()
            .any(|(id, line)| id == "napper" && line == "slept")
    );
}

#[test]
fn plugin_text_is_escaped_and_bounded_in_logs_and_error_reasons() {
    let recorder = Recorder::new();
    // Room for a 40 MiB string in the plugin's memory.
    let plugin = load(
        PluginSettings {
            memory_limit_bytes: 200 * 1024 * 1024,
            ..PluginSettings::new("chaos")
        },
        &recorder,
    );
    let forged =
        "done\n2026-11-27T05:00:00.000000Z  INFO mqplug: FORGED admin login accepted\x1b[0m";
    let mut echo = event("ECHO");
    echo.campaign_name = forged.into();
    // 40 MiB and more of error reason.
    let repeat = 40 * 1024 * 1024 / forged.len() + 1;
    echo.event_data
        .insert("repeat".into(), serde_json::Value::from(repeat));
    let outcome = plugin.handle(&echo, &delivery("echo", 0));
    let HandlerOutcome::Rejected { reason, .. } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.len() <= 16 * 1024 + " [truncated]".len(),
        "{}",
        reason.len()
    );
    assert!(reason.ends_with(" [truncated]"));
    assert!(
        !reason.contains(['\n', '\x1b']),
        "reason keeps raw control characters"
    );
    assert!(reason.starts_with("done\\n2026-11-27"), "{}", &reason[..40]);

    let logs = recorder.plugin_logs("chaos");
    let line = &logs
        .iter()
        .find(|(id, line)| id == "echo" && line.starts_with("done"))
        .expect("the echo line")
        .1;
    assert_eq!(
        line,
        "done\\n2026-11-27T05:00:00.000000Z  INFO mqplug: FORGED admin login accepted\\u{1b}[0m"
    );
}

#[test]
fn a_plugin_that_keeps_header_sets_is_stopped_at_its_share_of_host_resources() {
    const LIMIT: usize = 16 * 1024 * 1024;
    let settings = PluginSettings {
        deadline: ROOMY_DEADLINE,
        memory_limit_bytes: LIMIT,
        instance_mode: InstanceMode::Reuse,
        ..PluginSettings::new("chaos")
    };
    let plugin = load(settings, &Recorder::new());
    let share = mqplug::wasm::max_host_resources(LIMIT);
    assert_eq!(share, LIMIT / mqplug::wasm::MAX_HEADER_SET_BYTES);
    let hoard = |count: usize| {
        let mut hoard = event("HOARD");
        hoard.event_data.insert("count".into(), count.into());
        hoard.event_data.insert("bytes".into(), 1024.into());
        hoard
    };
    // Far more header sets than its share: the call fails as a limit, not
    // a host failure, and the host never holds more than the share.
    match plugin.handle(&hoard(share * 8), &delivery("hoard", 0)) {
        HandlerOutcome::Failed(failure @ HandlerFailure::MemoryLimit { .. }) => {
            let text = failure.to_string();
            assert!(text.contains("host resources"), "{text}");
            assert!(text.contains(&share.to_string()), "{text}");
        }
        other => panic!("expected the resource limit, got {other:?}"),
    }
    // What it held went with its instance: the next event runs, and may
    // keep half its share, twice over on one instance.
    assert_eq!(
        plugin.handle(&event("OK"), &delivery("next", 0)),
        HandlerOutcome::Accepted
    );
    for round in 0..2 {
        assert_eq!(
            plugin.handle(&hoard(share / 2 - 64), &delivery("half", round)),
            HandlerOutcome::Accepted,
            "round {round}"
        );
    }
    // A third half does not fit beside the two kept on this instance.
    assert!(matches!(
        plugin.handle(&hoard(share / 2), &delivery("half", 2)),
        HandlerOutcome::Failed(HandlerFailure::MemoryLimit { .. })
    ));
}

#[test]
fn a_header_set_larger_than_its_limit_is_a_limit_the_host_names() {
    let plugin = chaos(InstanceMode::Reuse, &Recorder::new());
    let mut big = event("HOARD");
    big.event_data.insert("count".into(), 1.into());
    big.event_data.insert(
        "bytes".into(),
        (mqplug::wasm::MAX_HEADER_SET_BYTES * 2).into(),
    );
    match plugin.handle(&big, &delivery("big", 0)) {
        HandlerOutcome::Failed(failure @ HandlerFailure::MemoryLimit { .. }) => {
            let text = failure.to_string();
            assert!(text.contains("header set past its limit"), "{text}");
        }
        other => panic!("expected the header set limit, got {other:?}"),
    }
    assert_eq!(
        plugin.handle(&event("OK"), &delivery("next", 0)),
        HandlerOutcome::Accepted
    );
}
