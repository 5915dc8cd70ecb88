//! Plugins' state through `wasi:keyvalue` and `dedupe`: only the buckets an
//! entry grants, each plugin's its own, within its limits (a breach is an
//! error the handler sees, and counted), durable in the embedded file
//! across a restart, and shared through Redis by hosts on several
//! machines.

use std::sync::Arc;

use mqplug::config::{KeyValueConfig, PluginConfig};
use mqplug::delivery::Delivery;
use mqplug::event::TaskEvent;
use mqplug::observe::KeyValueResult;
use mqplug::outcome::{HandlerFailure, HandlerOutcome};
use mqplug::slot::load_plugin;
use mqplug::wasm::{Plugin, RuntimeSettings, StoreSettings, WasmRuntime};
use mqplug_tests::{LocalRedis, Recorder, plugins::plugin_path};
use serde_json::{Value, json};

fn delivery(id: &str) -> Delivery {
    Delivery {
        message_id: id.into(),
        topic: "marketing_task_completed".into(),
        ..Delivery::default()
    }
}

fn kv_event(data: Value) -> TaskEvent {
    mqplug_tests::sample_event_with("KV", 7, data)
}

fn runtime(store: StoreSettings) -> Arc<WasmRuntime> {
    WasmRuntime::new(RuntimeSettings {
        store,
        ..RuntimeSettings::default()
    })
    .unwrap()
}

fn granted(name: &str, buckets: &[&str]) -> PluginConfig {
    PluginConfig {
        key_value: Some(KeyValueConfig {
            buckets: buckets.iter().map(|b| b.to_string()).collect(),
            max_key_bytes: 64,
            max_value_bytes: 1024,
            max_total_mb: 1,
        }),
        // The limits test makes a thousand calls in well under a second.
        log_lines_per_second: 100_000,
        log_bytes_per_second: 64 * 1024 * 1024,
        ..PluginConfig::new(name, plugin_path("chaos").unwrap())
    }
}

struct Chaos {
    plugin: Plugin,
    recorder: Recorder,
    name: String,
    next: std::cell::Cell<u32>,
}

impl Chaos {
    fn load(runtime: &Arc<WasmRuntime>, entry: PluginConfig) -> Chaos {
        let recorder = Recorder::new();
        let name = entry.name.clone();
        let plugin = load_plugin(runtime, &entry, &recorder.observers()).unwrap();
        Chaos {
            plugin,
            recorder,
            name,
            next: Default::default(),
        }
    }

    /// Runs one `KV` call: `Ok(result)` as the plugin logged it, or the
    /// handler's error.
    fn call(&self, data: Value) -> Result<String, String> {
        let id = format!("m{}", self.next.get());
        self.next.set(self.next.get() + 1);
        match self.plugin.handle(&kv_event(data), &delivery(&id)) {
            HandlerOutcome::Accepted => {
                let logs = self.recorder.plugin_logs(&self.name);
                let line = logs
                    .iter()
                    .filter(|(message, line)| *message == id && line.starts_with("kv "))
                    .map(|(_, line)| line.clone())
                    .next_back()
                    .expect("the plugin logged its call");
                Ok(line.splitn(3, ' ').nth(2).unwrap_or_default().to_string())
            }
            HandlerOutcome::Rejected { reason, .. } => Err(reason),
            HandlerOutcome::Failed(failure) => panic!("the plugin failed: {failure}"),
        }
    }
}

fn op(op: &str, bucket: &str, key: &str) -> Value {
    json!({"op": op, "bucket": bucket, "key": key})
}

fn set(bucket: &str, key: &str, value: &str) -> Value {
    json!({"op": "set", "bucket": bucket, "key": key, "value": value})
}

#[test]
fn a_plugin_keeps_state_in_its_own_buckets_and_reaches_no_other() {
    let runtime = runtime(StoreSettings::Memory);
    let a = Chaos::load(&runtime, granted("team-a", &["seen", "counters"]));
    let b = Chaos::load(&runtime, granted("team-b", &["seen"]));

    assert_eq!(a.call(set("seen", "user:7", "gold")), Ok("ok".into()));
    assert_eq!(a.call(op("get", "seen", "user:7")), Ok("gold".into()));
    assert_eq!(a.call(op("exists", "seen", "user:7")), Ok("true".into()));
    // Another bucket of the same plugin, and the same bucket name of
    // another plugin, are other buckets.
    assert_eq!(a.call(op("get", "counters", "user:7")), Ok("<none>".into()));
    assert_eq!(b.call(op("get", "seen", "user:7")), Ok("<none>".into()));
    assert_eq!(b.call(op("keys", "seen", "")), Ok("0".into()));
    assert_eq!(a.call(op("keys", "seen", "")), Ok("1".into()));
    // Counters, and a claim held by the first claimer's value.
    assert_eq!(a.call(op("increment", "counters", "n")), Ok("1".into()));
    assert_eq!(a.call(op("increment", "counters", "n")), Ok("2".into()));
    let claim =
        |value: &str| json!({"op": "claim", "bucket": "seen", "key": "msg-1", "value": value});
    assert_eq!(a.call(claim("first")), Ok("<none>".into()));
    assert_eq!(a.call(claim("second")), Ok("first".into()));
    assert_eq!(a.call(op("delete", "seen", "user:7")), Ok("ok".into()));
    assert_eq!(a.call(op("get", "seen", "user:7")), Ok("<none>".into()));

    // A bucket the entry does not grant cannot be opened, not even one
    // another plugin has.
    let err = b.call(op("get", "counters", "n")).unwrap_err();
    assert!(err.contains("not granted"), "{err}");
    assert_eq!(
        b.recorder.key_value("team-b").last(),
        Some(&KeyValueResult::Refused)
    );
}

#[test]
fn a_plugin_granted_no_bucket_opens_none() {
    let runtime = runtime(StoreSettings::Memory);
    let chaos = Chaos::load(
        &runtime,
        PluginConfig::new("chaos", plugin_path("chaos").unwrap()),
    );
    let err = chaos.call(set("seen", "k", "v")).unwrap_err();
    assert!(err.contains("not granted"), "{err}");
}

#[test]
fn keys_values_and_totals_over_their_limits_are_errors_the_handler_sees_and_are_counted() {
    let runtime = runtime(StoreSettings::Memory);
    let chaos = Chaos::load(&runtime, granted("chaos", &["b"]));
    let long_key = "k".repeat(65);
    let err = chaos.call(set("b", &long_key, "v")).unwrap_err();
    assert!(
        err.contains("the key is 65 bytes, over the limit of 64"),
        "{err}"
    );
    let err = chaos
        .call(json!({"op": "set", "bucket": "b", "key": "k", "value_len": 1025}))
        .unwrap_err();
    assert!(
        err.contains("the value is 1025 bytes, over the limit of 1024"),
        "{err}"
    );
    // 1 MiB in total, each entry counting its names and the store's
    // overhead besides its key and value: 901 values of 1 KiB fit.
    let mut stored = 0;
    let err = loop {
        let key = format!("k{stored:04}");
        match chaos.call(json!({"op": "set", "bucket": "b", "key": key, "value_len": 1024})) {
            Ok(_) => stored += 1,
            Err(err) => break err,
        }
        assert!(stored < 2000, "no total limit");
    };
    assert!(err.contains("over its limit of 1048576 bytes"), "{err}");
    let entry = mqplug::store::entry_size(
        mqplug::store::key_charge(&mqplug::store::Namespace::new("chaos", "b"), "k0000"),
        1024,
        false,
    );
    assert_eq!(stored, 1048576 / entry);
    // What was refused was not stored, and the plugin carries on.
    assert_eq!(
        chaos.call(op("exists", "b", &format!("k{stored:04}"))),
        Ok("false".into())
    );
    assert_eq!(chaos.call(op("delete", "b", "k0000")), Ok("ok".into()));
    assert_eq!(
        chaos.call(json!({"op": "set", "bucket": "b", "key": "k9999", "value_len": 1024})),
        Ok("ok".into())
    );
    let refused = chaos
        .recorder
        .key_value("chaos")
        .iter()
        .filter(|result| **result == KeyValueResult::Refused)
        .count();
    assert_eq!(refused, 3);
}

#[test]
fn the_embedded_store_keeps_a_plugins_keys_across_a_host_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let runtime = runtime(StoreSettings::Embedded { path: path.clone() });
        let chaos = Chaos::load(&runtime, granted("chaos", &["b"]));
        assert_eq!(
            chaos.call(set("b", "kept", "across restarts")),
            Ok("ok".into())
        );
        assert_eq!(chaos.call(op("increment", "b", "n")), Ok("1".into()));
    }
    let runtime = runtime(StoreSettings::Embedded { path });
    let chaos = Chaos::load(&runtime, granted("chaos", &["b"]));
    assert_eq!(
        chaos.call(op("get", "b", "kept")),
        Ok("across restarts".into())
    );
    assert_eq!(chaos.call(op("increment", "b", "n")), Ok("2".into()));
}

#[test]
fn a_store_that_cannot_be_opened_refuses_the_load_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // A folder where the file should be.
    let path = dir.path().join("state.redb");
    std::fs::create_dir(&path).unwrap();
    let runtime = runtime(StoreSettings::Embedded { path });
    let err = load_plugin(
        &runtime,
        &granted("chaos", &["b"]),
        &Recorder::new().observers(),
    )
    .err()
    .expect("loaded without a store")
    .to_string();
    assert!(
        err.contains("state store") && err.contains("state.redb"),
        "{err}"
    );
}

#[test]
fn hosts_sharing_a_redis_see_each_others_keys_and_claims() {
    let redis = LocalRedis::start().unwrap();
    let settings = StoreSettings::Redis {
        url: redis.url(),
        prefix: "mqplug".into(),
        timeout: std::time::Duration::from_secs(2),
    };
    // Two hosts: two runtimes, each with its own connection to Redis.
    let one = Chaos::load(&runtime(settings.clone()), granted("granter", &["seen"]));
    let two = Chaos::load(&runtime(settings), granted("granter", &["seen"]));
    assert_eq!(one.call(set("seen", "k", "from one")), Ok("ok".into()));
    assert_eq!(two.call(op("get", "seen", "k")), Ok("from one".into()));
    let claim =
        |value: &str| json!({"op": "claim", "bucket": "seen", "key": "msg-9", "value": value});
    assert_eq!(two.call(claim("two")), Ok("<none>".into()));
    assert_eq!(one.call(claim("one")), Ok("two".into()));
    // A host whose effect failed gives back only its own claim: host one's
    // release of a claim that host two holds changes nothing.
    let release =
        |value: &str| json!({"op": "release", "bucket": "seen", "key": "msg-9", "value": value});
    assert_eq!(one.call(release("one")), Ok("false".into()));
    assert_eq!(one.call(claim("one")), Ok("two".into()));
    assert_eq!(two.call(release("two")), Ok("true".into()));
    assert_eq!(one.call(claim("one")), Ok("<none>".into()));
    assert_eq!(one.call(op("increment", "seen", "n")), Ok("1".into()));
    assert_eq!(two.call(op("increment", "seen", "n")), Ok("2".into()));
    assert_eq!(
        redis.command(&["GET", "mqplug:kv:granter:seen:k"]).unwrap(),
        "from one"
    );
}

#[test]
fn a_redis_that_stops_answering_is_an_error_the_handler_sees_and_is_counted() {
    let mut redis = LocalRedis::start().unwrap();
    let url = redis.url();
    let runtime = runtime(StoreSettings::Redis {
        url,
        prefix: "mqplug".into(),
        // Room for the first calls on a busy machine: a stopped Redis
        // refuses the connection at once, whatever the timeout.
        timeout: std::time::Duration::from_secs(2),
    });
    let chaos = Chaos::load(&runtime, granted("chaos", &["b"]));
    assert_eq!(chaos.call(set("b", "k", "v")), Ok("ok".into()));
    redis.stop();
    let err = chaos.call(op("get", "b", "k")).unwrap_err();
    assert!(err.contains("store is unavailable"), "{err}");
    assert_eq!(
        chaos.recorder.key_value("chaos").last(),
        Some(&KeyValueResult::Failed)
    );
}

/// A store that stops answering in the middle of a call holds the handler
/// no longer than its event's deadline: the call ends when the deadline
/// comes, not when the store's own (long) timeout would.
#[test]
fn a_store_call_under_way_ends_at_the_events_deadline_not_the_stores_timeout() {
    let redis = LocalRedis::start().unwrap();
    let runtime = runtime(StoreSettings::Redis {
        url: redis.url(),
        prefix: "mqplug".into(),
        // Far longer than the pause below: without the deadline, the call
        // would wait the pause out and succeed.
        timeout: std::time::Duration::from_secs(120),
    });
    let entry = PluginConfig {
        deadline_ms: 1000,
        ..granted("chaos", &["b"])
    };
    let chaos = Chaos::load(&runtime, entry);
    assert_eq!(chaos.call(set("b", "k", "v")), Ok("ok".into()));
    // Redis holds every client's commands for 30 s: a store that hangs.
    redis.command(&["CLIENT", "PAUSE", "30000", "ALL"]).unwrap();
    let outcome = chaos
        .plugin
        .handle(&kv_event(op("get", "b", "k")), &delivery("slow"));
    // The deadline came during the call: the call failed for it (counted),
    // and the handler, past its deadline, was interrupted.
    assert_eq!(
        chaos.recorder.key_value("chaos").last(),
        Some(&KeyValueResult::Failed),
        "the call waited for the store past the deadline; outcome {outcome:?}"
    );
    assert!(
        matches!(
            &outcome,
            HandlerOutcome::Failed(HandlerFailure::Deadline { .. })
                | HandlerOutcome::Rejected { .. }
        ),
        "{outcome:?}"
    );
}

/// Redis's `used_memory`, in bytes.
fn redis_memory(redis: &LocalRedis) -> u64 {
    let info = redis.command(&["INFO", "memory"]).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|bytes| bytes.trim().parse().ok())
        .expect("INFO memory has used_memory")
}

/// A plugin filling its quota with the smallest expiring keys it can make
/// (one-byte values under short names) takes about its `max_total_mb` of
/// Redis's memory, not many times it: each entry counts its names, the
/// store's overhead and its expiry index rows, not only its key and value.
#[test]
fn a_plugins_quota_bounds_what_redis_really_holds_for_it() {
    let redis = LocalRedis::start().unwrap();
    let runtime = runtime(StoreSettings::Redis {
        url: redis.url(),
        prefix: "mqplug".into(),
        timeout: std::time::Duration::from_secs(10),
    });
    let chaos = Chaos::load(&runtime, granted("tiny", &["b"]));
    let before = redis_memory(&redis);
    // Claims of one byte under keys `k0`, `k1`, ... until the quota refuses.
    let err = chaos
        .call(
            json!({"op": "claim", "bucket": "b", "key": "k", "value": "x",
                     "ttl_ms": 3_600_000, "repeat": 1_000_000}),
        )
        .unwrap_err();
    assert!(err.contains("quota"), "{err}");
    let grown = redis_memory(&redis).saturating_sub(before);
    let quota = 1 << 20;
    assert!(
        grown < 2 * quota,
        "a plugin with a quota of {quota} bytes grew Redis by {grown} bytes"
    );
    eprintln!(
        "redis grew {grown} bytes for a quota of {quota} bytes ({:.2}x)",
        grown as f64 / quota as f64
    );
}

/// A Redis that is down when the host starts does not stop it: plugins
/// load, their calls fail with an error they see, the runtime says the
/// store is unavailable (for `/readyz`), and all of it mends by itself
/// when Redis comes back.
#[test]
fn a_host_starts_with_its_redis_down_and_serves_state_once_it_is_back() {
    let mut redis = LocalRedis::start().unwrap();
    redis.stop();
    let runtime = runtime(StoreSettings::Redis {
        url: redis.url(),
        prefix: "mqplug".into(),
        timeout: std::time::Duration::from_secs(2),
    });
    let chaos = Chaos::load(&runtime, granted("chaos", &["b"]));
    let (kind, health) = runtime.store_health().expect("the store was opened");
    assert_eq!(kind, "redis");
    assert!(health.is_err(), "a store that is down is reported");
    let err = chaos.call(set("b", "k", "v")).unwrap_err();
    assert!(err.contains("store is unavailable"), "{err}");

    redis.restart().unwrap();
    assert_eq!(chaos.call(set("b", "k", "v")), Ok("ok".into()));
    assert_eq!(runtime.store_health(), Some(("redis", Ok(()))));
    redis.stop();
    assert!(chaos.call(op("get", "b", "k")).is_err());
    assert!(runtime.store_health().unwrap().1.is_err());
}
